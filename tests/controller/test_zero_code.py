"""Zero-code mode: option keys, validation, and the tick driving the same algorithm."""

import pytest
import torch

import agpe_compile
from agpe_compile.controller import (AGPE_OPTION_KEYS, AGPEConfig, Sparsifier, config_from_options,
                                     make_zero_code_controller, split_options)
from agpe_compile.config import BackendConfig

from .helpers import TinyMLP, batches, inactive_elements, train

OPTIONS = {"target_sparsity": 0.75, "policy": "rigl", "block_size": 4, "update_interval": 3, "end_step": 12}


def test_option_keys_and_split():
    assert {"target_sparsity", "policy", "update_interval", "end_step"} <= AGPE_OPTION_KEYS
    assert not AGPE_OPTION_KEYS & {f for f in BackendConfig.__dataclass_fields__}  # no key is claimed twice
    backend, agpe = split_options({**OPTIONS, "inductor": False})
    assert backend == {"block_size": 4, "inductor": False}
    assert agpe == {k: v for k, v in OPTIONS.items() if k != "block_size"}
    assert BackendConfig.from_options(backend).block_size == 4  # what the backend gets is valid for it


def test_config_from_options_validates_through_agpe_config():
    assert config_from_options({"block_size": 4, "inductor": False}) is None  # zero-code mode off
    config = config_from_options({**OPTIONS, "exclude": "fc3", "buckets": [1.0, 0.5]})
    assert config == AGPEConfig(**{**OPTIONS, "exclude": ("fc3",), "buckets": (1.0, 0.5)})
    with pytest.raises(ValueError, match=r"AGPEConfig.target_sparsity got 1.5; expected a number in \[0, 1\)"):
        config_from_options({"target_sparsity": 1.5})
    with pytest.raises(ValueError, match="option 'policy' got 'snfs', which needs the optimizer's momentum"):
        config_from_options({"policy": "snfs"})
    with pytest.raises(ValueError, match="zero-code mode needs at least one of the options"):
        make_zero_code_controller([], {"block_size": 4})


def run_zero_code(steps):
    """Train TinyMLP with the tick before every compiled call (the fallback without an optimizer). Per tick: the score_dense flag
    and the largest |weight| of an inactive block right after the tick."""
    torch.manual_seed(0)
    model = TinyMLP()
    states = list(agpe_compile.prepare(model, options={"block_size": 4}).values())
    tick = make_zero_code_controller(states, OPTIONS, follow_optimizer=False)  # the tick fallback
    initial = {s.name: s.block_mask.clone() for s in states}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    flags, drift = [], []
    for x, y in batches(steps):
        tick()
        flags.append(bool(states[0].score_dense))
        drift.append(max(float(s.weight.detach()[inactive_elements(s)].abs().max()) for s in states))
        train(cmodel, opt, None, [(x, y)])
    return model, tick, initial, flags, drift


def run_explicit(steps):
    """The same algorithm driven by an explicit Sparsifier with no optimizer and no loss."""
    torch.manual_seed(0)
    model = TinyMLP()
    sp = Sparsifier(model, None, AGPEConfig(**OPTIONS))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    for x, y in batches(steps):
        train(cmodel, opt, None, [(x, y)])
        sp.step(None)
    return sp


def test_tick_counts_steps_and_runs_the_same_algorithm():
    _, tick, initial, flags, _ = run_zero_code(13)
    # Tick k processes step k - 1, then raises the flag before step k's backward when k is
    # an update step (3, 6, 9, 12): Note [Zero-code step counting].
    assert flags == [k in (3, 6, 9, 12) for k in range(1, 14)]
    assert tick.sparsifier.step_count == 12 and tick.calls == 13
    masks = {n: s.block_mask for n, s in tick.sparsifier.layers.items()}
    assert any(not torch.equal(masks[n], initial[n]) for n in masks)  # RigL did move blocks
    torch._dynamo.reset()
    sp = run_explicit(12)
    for name, state in sp.layers.items():
        assert torch.equal(state.block_mask, masks[name]), name
    assert tick.sparsifier.global_density == 0.25


def test_inactive_weights_drift_without_optimizer_reset_and_are_re_zeroed_at_updates():
    model, tick, _, _, drift = run_zero_code(14)  # model: keeps the weakly referenced layers alive
    # Ticks 4, 7, 10, 13 processed the update steps 3, 6, 9, 12: inactive weights exactly 0.
    assert [drift[k - 1] for k in (4, 7, 10, 13)] == [0.0] * 4
    # Between updates, stale momentum of blocks pruned at an update moves them (the op
    # masks them, so outputs do not see it): the re-zeroing is needed, not decorative.
    assert max(drift[k - 1] for k in (5, 8, 11, 14)) > 0.0
    state = tick.state_dict()
    assert state["calls"] == 14 and state["sparsifier"]["step"] == 13
    states = list(tick.sparsifier.layers.values())
    resumed = make_zero_code_controller(states, OPTIONS, follow_optimizer=False)
    resumed.load_state_dict(state)
    assert resumed.calls == 14 and resumed.sparsifier.step_count == 13


def test_an_optimizer_step_inside_the_compiled_function_runs_the_controller_untraced():
    """Zero-code's step hook was traced when opt.step() ran inside the compiled function:
    34 graph breaks in agpe's own code (rebucket, .item(), nonzero) and 57 graphs for 1."""
    import torch.nn.functional as F

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = {"inductor": False, "target_sparsity": 0.5, "policy": "gmp", "block_size": 8, "update_interval": 2,
               "end_step": 8}

    @torch.compile(backend="agpe", options=options)
    def train_step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    breaks = torch._dynamo.utils.counters["graph_break"]
    before = dict(breaks)
    for _ in range(12):
        train_step(torch.randn(16, 32), torch.randint(0, 4, (16,)))
    new = [reason for reason, count in breaks.items() if count > before.get(reason, 0)]
    assert not any("agpe_compile" in r or ".item()" in r or "nonzero" in r for r in new), new
    densities = [float(s.block_mask.float().mean()) for s in agpe_compile.layer_states(model).values()]
    assert densities and max(densities) == 0.5  # the controller stepped with the optimizer


@pytest.mark.parametrize("kind", ["block_sparse_adamw", "subclass"])
def test_a_subclass_step_calling_super_step_is_one_training_step(kind):
    # torch wraps the parent's step too once an instance of the parent exists in the process;
    # super().step() then ran the global step post-hooks a second time, and zero-code mode
    # counted 16 training steps for 8 optimizer steps (Note [Nested optimizer steps]).
    from agpe_compile.state import state_of

    class MyAdam(torch.optim.Adam):
        def step(self, closure=None):
            return super().step(closure)

    parent = torch.optim.AdamW if kind == "block_sparse_adamw" else torch.optim.Adam
    parent([torch.zeros(1, requires_grad=True)])  # any instance of the parent class, anywhere
    torch.manual_seed(0)
    model = TinyMLP()
    agpe_compile.prepare(model, {"block_size": 4})
    make = agpe_compile.BlockSparseAdamW if kind == "block_sparse_adamw" else MyAdam
    opt = make(model.parameters(), lr=1e-2)
    cmodel = torch.compile(model, backend="agpe", options={
        "inductor": False, "block_size": 4, "target_sparsity": 0.75, "policy": "gmp", "update_interval": 4,
        "end_step": 16})
    train(cmodel, opt, None, batches(8))
    controller = state_of(model.fc1.weight).controller_ref()
    assert controller.sparsifier.step_count == 8
