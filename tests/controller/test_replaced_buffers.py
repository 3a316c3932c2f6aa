"""Note [Replaced buffers]: buffers ``model.to(device/dtype)`` or an assignment replaced are
adopted by every public entry outside a compiled call, not only by the next call (helper
audit BL). ``model._apply(clone)`` gives every buffer a new tensor object with the same
values, as a device round trip does."""

import torch
import torch.nn.functional as F

import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.ops.reference import expand_block_mask
from agpe_compile.state import state_of

from .helpers import TinyMLP, batches


def _moved(model):
    model._apply(lambda t: t.clone())  # what .to("cuda") then .to("cpu") does to every buffer
    return model


def _oracle(model, x):
    params = dict(model.named_parameters())
    for name, p in model.named_parameters():
        state = state_of(p)
        if state is not None:
            params[name] = p * expand_block_mask(state.block_mask, state.block_size, p.dtype)
    return torch.func.functional_call(model, params, (x,))


def _masks(model):
    return {name: state.block_mask.clone() for name, state in agpe_compile.layer_states(model).items()}


def test_a_mask_edited_after_a_move_is_the_one_the_next_call_uses():
    torch.manual_seed(0)
    model = TinyMLP()
    agpe_compile.prepare(model, {"block_size": 4})
    _moved(model)
    state = agpe_compile.layer_state(model.fc1)
    assert state.block_mask is model.fc1.weight_block_mask
    state.block_mask[0, :2] = False
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(4, 16)
    assert torch.equal(cmodel(x), _oracle(model, x))
    assert not model.fc1.weight_block_mask[0, :2].any()


def test_an_update_between_a_move_and_the_next_call_stays():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=4, update_interval=2,
                                            end_step=40))
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    for i, (x, y) in enumerate(batches(5)):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i == 3:
            before = _masks(model)
            _moved(model)
        sp.step(loss)
        if i == 3:
            decided = _masks(model)
            assert any(not torch.equal(before[n], decided[n]) for n in before)  # the update changed masks
    assert all(torch.equal(decided[n], m) for n, m in _masks(model).items())  # the next call kept them
    for name, state in sp.layers.items():
        assert state.block_mask is getattr(model, name).weight_block_mask
        inactive = expand_block_mask(~state.block_mask, state.block_size, torch.bool)
        assert not state.weight.detach()[inactive].any(), name


def test_a_sparsifier_created_after_prepare_and_a_move_keeps_its_initial_layout():
    torch.manual_seed(0)
    model = TinyMLP()
    agpe_compile.prepare(model, {"block_size": 4})
    _moved(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=4, update_interval=2,
                                            end_step=40))
    assert sp.densities() == {n: float(getattr(model, n).weight_block_mask.float().mean()) for n in sp.layers}
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x, y = next(batches(1))
    F.cross_entropy(cmodel(x), y).backward()  # raised "above the capacity of its layout bucket" before
    assert sp.global_density < 0.5


def test_a_dtype_round_trip_before_an_update_does_not_count_the_intervals_scores_twice():
    def run(round_trip):
        torch.manual_seed(0)
        model = TinyMLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = Sparsifier(model, opt, AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=2,
                                                end_step=40))
        cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
        for i, (x, y) in enumerate(batches(4)):
            loss = F.cross_entropy(cmodel(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if round_trip and i == 1:
                model.double()
                model.float()
            sp.step(loss)
        return {n: v.clone() for n, v in sp.saliency.values.items()}

    plain, tripped = run(False), run(True)
    for name in plain:
        assert torch.equal(plain[name], tripped[name]), name


def test_strip_folds_an_assigned_mask():
    torch.manual_seed(0)
    model = TinyMLP()
    agpe_compile.prepare(model, {"block_size": 4})
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[0, :3] = False
    model.fc1.weight_block_mask = mask  # design.md: an assignment is adopted
    expected = model.fc1.weight.detach() * expand_block_mask(mask, 4, torch.float32)
    densities = agpe_compile.strip(model)
    assert densities["fc1"] == float(mask.float().mean())
    assert torch.equal(model.fc1.weight.detach(), expected)
