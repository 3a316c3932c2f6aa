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
