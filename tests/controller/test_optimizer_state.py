"""Optimizer moments of changed blocks are zeroed; everything else is left alone."""

import copy

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


def _big():
    import torch.nn.functional as F
    from torch import nn

    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 10)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    return Big()


def _inactive(model, name):
    from agpe_compile.ops.reference import expand_block_mask
    from agpe_compile.state import state_of

    weight = getattr(model, name).weight
    state = state_of(weight)
    return weight, expand_block_mask(~state.block_mask, state.block_size, torch.bool)


@pytest.mark.parametrize("how", ["adopted_masks", "stale_state_in_a_fresh_optimizer"])
def test_optimizer_state_from_before_the_masks_does_not_move_inactive_weights(how):
    # Note [Optimizer state on inactive blocks]: (a) a Sparsifier that adopts hand-set masks
    # over a model whose optimizer has momentum from dense steps, (b) an optimizer created
    # mid-run and loaded with a state saved before the masks changed. The momentum on
    # inactive blocks moved those weights after every step (block 32 at density 0.1 keeps
    # masking on the CPU, so nothing else re-zeroed them): eager calls and export were off.
    import agpe_compile
    import torch.nn.functional as F
    from agpe_compile.controller import AGPEConfig, Sparsifier
    from agpe_compile.state import state_of

    torch.manual_seed(0)
    model = _big()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(256, 10, generator=gen)

    def batch():
        x = torch.randn(64, 256, generator=gen)
        return x, (x @ target).argmax(1)

    if how == "adopted_masks":
        for _ in range(3):  # dense steps: momentum everywhere
            x, y = batch()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        agpe_compile.prepare(model, {"block_size": 32, "exclude": ["fc3"]})
        for name in ("fc1", "fc2"):
            state = state_of(getattr(model, name).weight)
            keep = torch.rand(state.grid, generator=gen) < 0.1
            keep[0, 0] = True
            state.block_mask.copy_(keep)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.9, policy="rigl", block_size=32, update_interval=3,
                                           end_step=20, exclude=("fc3",), distribution="uniform", rescale_init=False))
    compiled = torch.compile(model, backend="agpe", options={"inductor": False})
    worst, saved = 0.0, None
    for step in range(14):
        if step == 4:
            saved = copy.deepcopy(opt.state_dict())
        if how == "stale_state_in_a_fresh_optimizer" and step == 10:  # masks changed at steps 6 and 9
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(saved)
        x, y = batch()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        for name in ("fc1", "fc2"):
            weight, inactive = _inactive(model, name)
            worst = max(worst, float(weight.detach()[inactive].abs().max()))
        opt.zero_grad()
        sp.step(loss)
    assert worst == 0.0


@pytest.mark.parametrize("changed", [0.0, 0.05, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_the_blocks_are_reset_alike_by_index_and_by_mask(changed, layout):
    # optimizer_state._fill_blocks_ writes few changed blocks by index, else the element mask
    # does: either way exactly the changed blocks take the fresh value
    from agpe_compile.ops.reference import expand_block_mask
    gen = torch.Generator().manual_seed(int(changed * 10))
    w = torch.nn.Parameter(torch.randn(6 * 4, 5 * 4, generator=gen))
    opt = torch.optim.Adagrad([w], lr=0.1, initial_accumulator_value=0.25)
    w.grad = torch.randn(w.shape, generator=gen)
    opt.step()
    if layout == "transposed":  # a state tensor of the weight's shape that is not contiguous
        opt.state[w]["sum"] = opt.state[w]["sum"].t().contiguous().t()
    before = opt.state[w]["sum"].clone()
    blocks = torch.rand(6, 5, generator=gen) < changed
    zero_optimizer_state(opt, w, blocks, block_size=4)
    element = expand_block_mask(blocks, 4, torch.bool)
    assert torch.equal(opt.state[w]["sum"], torch.where(element, torch.full_like(before, 0.25), before))
