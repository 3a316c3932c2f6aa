"""Optimizer moments of changed blocks are zeroed; everything else is left alone."""

import pytest
import torch

from agpe_compile.controller import zero_optimizer_state
from agpe_compile.controller.optimizer_state import momentum_of


def stepped(kind):
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = {"sgd": lambda: torch.optim.SGD([w], lr=0.1, momentum=0.9),
           "adam": lambda: torch.optim.Adam([w], lr=0.1, amsgrad=True),
           "adamw": lambda: torch.optim.AdamW([w], lr=0.1)}[kind]()
    w.grad = torch.ones(4, 4)
    opt.step()
    return w, opt


@pytest.mark.parametrize("kind,keys", [("sgd", ["momentum_buffer"]),
                                       ("adam", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
                                       ("adamw", ["exp_avg", "exp_avg_sq"])])
def test_zeroes_every_weight_shaped_state_on_the_blocks(kind, keys):
    w, opt = stepped(kind)
    step_before = opt.state[w].get("step")
    touched = zero_optimizer_state(opt, w, torch.tensor([[True, False], [False, False]]), block_size=2)
    assert sorted(touched) == sorted(keys)
    for key in keys:
        value = opt.state[w][key]
        assert not value[:2, :2].any() and value[2:, :].all() and value[:2, 2:].all()
    if step_before is not None:  # per-parameter scalars cannot be reset per block
        assert torch.equal(opt.state[w]["step"], step_before)


@pytest.mark.parametrize("make, key, fresh", [
    (lambda w: torch.optim.Rprop([w], lr=0.01), "step_size", 0.01),
    (lambda w: torch.optim.Rprop([{"params": [torch.nn.Parameter(torch.ones(1))]}, {"params": [w], "lr": 0.03}],
                                 lr=0.01), "step_size", 0.03),
    (lambda w: torch.optim.Adagrad([w], lr=0.1, initial_accumulator_value=0.5), "sum", 0.5),
])
def test_state_that_does_not_start_at_zero_is_reset_to_its_fresh_value(make, key, fresh):
    # Rprop starts step_size at lr (a zeroed one clamps to 1e-6: a regrown block would learn
    # ~1000x slower than a new parameter); Adagrad starts sum at initial_accumulator_value.
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = make(w)
    for _ in range(3):
        w.grad = torch.randn(4, 4)
        opt.step()
    before = opt.state[w][key].clone()
    assert not torch.allclose(before, torch.full_like(before, fresh))
    touched = zero_optimizer_state(opt, w, torch.tensor([[True, False], [False, False]]), block_size=2)
    assert key in touched
    value = opt.state[w][key]
    assert torch.equal(value[:2, :2], torch.full((2, 2), fresh))
    assert torch.equal(value[2:], before[2:]) and torch.equal(value[:2, 2:], before[:2, 2:])
    if "prev" in opt.state[w]:
        assert not opt.state[w]["prev"][:2, :2].any()


def test_no_optimizer_or_no_state_yet():
    w = torch.nn.Parameter(torch.ones(2, 2))
    assert zero_optimizer_state(None, w, torch.tensor([[True]]), 2) == []
    assert zero_optimizer_state(torch.optim.SGD([w], lr=0.1, momentum=0.9), w, torch.tensor([[True]]), 2) == []


def test_momentum_of():
    w, opt = stepped("sgd")
    assert momentum_of(opt, w) is opt.state[w]["momentum_buffer"]
    w, opt = stepped("adam")
    assert momentum_of(opt, w) is opt.state[w]["exp_avg"]
    assert momentum_of(None, w) is None
