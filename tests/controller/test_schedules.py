"""Fixed schedules are pure functions of the step: golden values worked by hand."""

import dataclasses

import pytest

from agpe_compile.controller import ConstantSchedule, CosineDropFraction, CubicSchedule


def test_constant():
    assert [ConstantSchedule(0.25).density_at(t) for t in (0, 7, 10**9)] == [0.25, 0.25, 0.25]


def test_cubic_gmp_golden():
    # s_t = 0.9 + (0 - 0.9) * (1 - (t - 100) / 400)^3, so density = 0.1 + 0.9 * (1 - p)^3:
    # p = 0.25: 0.1 + 0.9 * 0.421875 = 0.4796875; p = 0.5: 0.1 + 0.9 * 0.125 = 0.2125; ...
    sched = CubicSchedule(1.0, 0.1, begin_step=100, end_step=500)
    got = [sched.density_at(t) for t in (0, 100, 200, 300, 400, 500, 900)]
    assert got == [1.0, 1.0, 0.4796875, 0.2125, 0.1140625, 0.1, 0.1]


def test_cubic_from_a_sparse_start():
    sched = CubicSchedule(0.5, 0.1, begin_step=0, end_step=10)
    # s = 0.9 + (0.5 - 0.9) * 0.5^3 = 0.85 at t = 5
    assert sched.density_at(5) == 0.15


def test_cosine_drop_fraction_golden():
    sched = CosineDropFraction(0.3, end_step=300)
    # 0.15 * (1 + cos(pi * t / 300)): cos = 1, 0.5, -0.5, -1 at t = 0, 100, 200, 300.
    assert [sched.fraction_at(t) for t in (0, 100, 200, 300, 301)] == [0.3, 0.225, 0.075, 0.0, 0.0]


@pytest.mark.parametrize("sched", [ConstantSchedule(0.1), CubicSchedule(1.0, 0.1, 0, 10), CosineDropFraction(0.3, 10)])
def test_schedules_are_frozen_values(sched):
    field = dataclasses.fields(sched)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(sched, field, 0.5)
    assert sched == dataclasses.replace(sched)
