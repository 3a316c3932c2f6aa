"""Fixed schedules: pure, frozen dataclasses; the step counter lives in the caller's state.

* :class:`ConstantSchedule` -- one density for all steps (dense, static, SET, RigL).
* :class:`CubicSchedule` -- Zhu & Gupta's gradual magnitude pruning (GMP),
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0))^3``, in sparsity.
* :class:`CosineDropFraction` -- RigL's swap fraction ``alpha/2 * (1 + cos(pi t / T_end))``.

The adaptive schedule, which needs state and feedback, is in adaptive_schedule.py.

Example::

    >>> CubicSchedule(1.0, 0.1, begin_step=0, end_step=100).density_at(50)
    0.2125
    >>> CosineDropFraction(0.3, end_step=100).fraction_at(50)
    0.15
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
    """The same density at every step.

    >>> ConstantSchedule(0.1).density_at(12345)
    0.1
    """

    density: float

    def density_at(self, step: int) -> float:
        return self.density


@dataclasses.dataclass(frozen=True)
class CubicSchedule:
    """GMP (Zhu & Gupta 2017): sparsity rises fast at first and levels off at the end.

    Before ``begin_step`` the density is ``initial_density``, after ``end_step`` it is
    ``final_density``. Written in sparsity (s = 1 - density) as in the paper.

    >>> sched = CubicSchedule(1.0, 0.2, begin_step=10, end_step=20)
    >>> [sched.density_at(t) for t in (0, 10, 15, 20, 30)]
    [1.0, 1.0, 0.3, 0.2, 0.2]
    """

    initial_density: float
    final_density: float
    begin_step: int
    end_step: int

    def density_at(self, step: int) -> float:
        s_i, s_f = 1.0 - self.initial_density, 1.0 - self.final_density
        progress = min(max((step - self.begin_step) / (self.end_step - self.begin_step), 0.0), 1.0)
        sparsity = s_f + (s_i - s_f) * (1.0 - progress) ** 3
        # Rounding keeps golden values exact and masks stable across platforms' last bits.
        return round(1.0 - sparsity, 12)


@dataclasses.dataclass(frozen=True)
class CosineDropFraction:
    """RigL's fraction of active blocks swapped at an update: cosine decay to 0 at end_step.

    >>> sched = CosineDropFraction(0.3, end_step=100)
    >>> [sched.fraction_at(t) for t in (0, 100, 200)]
    [0.3, 0.0, 0.0]
    """

    initial_fraction: float
    end_step: int

    def fraction_at(self, step: int) -> float:
        if step >= self.end_step:
            return 0.0
        return round(self.initial_fraction / 2 * (1.0 + math.cos(math.pi * step / self.end_step)), 12)
