"""Note [Zero inactive weights]: the dense path skips masking W only where the Sparsifier
keeps inactive weights exactly zero, whatever the optimizer or the user does."""

import gc

import pytest
import torch
import torch.nn.functional as F

import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.layout import build_layout
from agpe_compile.ops.paths import skips_masking
from agpe_compile.ops.reference import expand_block_mask
from agpe_compile.state import state_of

from .helpers import TinyMLP, batches


class Meddling(torch.optim.SGD):
    """SGD that then moves EVERY entry, inactive blocks included (like optimizers whose
    preconditioners mix elements): the invariant must survive it."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(0.25)
        return loss


def _masked_reference(model, x):
    params = {}
    for name, p in model.named_parameters():
        state = state_of(p)
        params[name] = p * expand_block_mask(state.block_mask, state.block_size, p.dtype) if state else p
    return torch.func.functional_call(model, params, (x,))


def _run(monkeypatch, optimizer_cls=Meddling, steps=6):
    # the dense reference path on the CPU, so skipping the masking is what runs
    monkeypatch.setattr(agpe_compile.kernels, "choose_cpu_path", lambda *args: "dense")
    torch.manual_seed(0)
    model = TinyMLP()
    opt = optimizer_cls(model.parameters(), lr=0.05)
    # density 0.8 stays in bucket 1.0: the CPU's dense-by-density bucket
    config = AGPEConfig(target_sparsity=0.2, policy="static", block_size=4, buckets=(1.0, 0.5, 0.25),
                        distribution="uniform")
    sp = Sparsifier(model, opt, config)
    graphs = []
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}, on_graph=graphs.append))
    return model, opt, sp, cmodel, graphs


def test_layers_of_the_sparsifier_skip_masking_and_stay_exact_under_a_meddling_optimizer(monkeypatch):
    model, opt, sp, cmodel, graphs = _run(monkeypatch)
    for state in sp.layers.values():
        assert state.zero_inactive and not bool(state.block_mask.all())
        assert skips_masking(state.layout(), state.weight.device, True)
    for x, y in batches(6):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        for state in sp.layers.values():  # the hook re-zeroed what the optimizer moved
            assert not state.weight[expand_block_mask(~state.block_mask, 4, torch.bool)].any()
        torch.testing.assert_close(cmodel(x), _masked_reference(model, x))
    code = graphs[0].rewritten.code
    assert code.count("'taylor', True)") == 3, code  # the promise reaches the op


def test_hand_edited_masks_and_loaded_weights_are_rezeroed(monkeypatch):
    model, opt, sp, cmodel, _ = _run(monkeypatch)
    x = torch.randn(8, 16)
    cmodel(x)
    state = sp.layers["fc2"]
    with torch.no_grad():
        state.block_mask[0, 0] = False  # by hand: the weight there is still nonzero
    torch.testing.assert_close(cmodel(x), _masked_reference(model, x))
    assert not state.weight[:4, :4].any()
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint["fc2.weight"].fill_(1.0)  # nonzero everywhere, inactive blocks included
    model.load_state_dict(checkpoint)
    assert not state.weight[expand_block_mask(~state.block_mask, 4, torch.bool)].any()
    torch.testing.assert_close(cmodel(x), _masked_reference(model, x))


def test_graphs_compiled_under_a_closed_sparsifier_keep_its_promise(monkeypatch):
    """Note [A promise outlives its Sparsifier]: after close() the graph still skips masking W;
    a mask edited by hand then left the block's weight (and momentum) in, and the compiled
    model computed 0.16 off the masked reference on every call, silently (docs audit). The
    wrapper hands the graph W * M; nothing is written into the weight (an in-place zeroing
    broke autograd for weights saved by an earlier op of the step: re-audit)."""
    model, _, sp, cmodel, graphs = _run(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # momentum: steps refill edited blocks
    for x, y in batches(3):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    sp.close()
    state = agpe_compile.layer_state(model.fc2)
    row, col = state.block_mask.nonzero()[0].tolist()
    with torch.no_grad():
        state.block_mask[row, col] = False  # by hand, after close: weights and momentum still there
    for x, y in batches(4, seed=1):
        penalty = 1e-3 * sum(p.square().sum() for p in model.parameters())  # saves the weights first
        out = cmodel(x)
        torch.testing.assert_close(out, _masked_reference(model, x))
        (F.cross_entropy(out, y) + penalty).backward()
        opt.step()
        opt.zero_grad()
    assert len(graphs) == 1  # the same graph, compiled under the promise, served every call
    assert state.weight[row * 4:row * 4 + 4, col * 4:col * 4 + 4].any()  # its own weight: not written
    with torch.no_grad():
        torch.testing.assert_close(cmodel(x), _masked_reference(model, x))


def test_a_sparsifier_dropped_without_close_ends_its_promise(monkeypatch):
    """Note [A dropped Sparsifier]: a Sparsifier garbage-collected without close() left its
    layers promising zero inactive weights; weights then loaded with strict=False, or moved by
    another optimizer, ran unmasked (1.94 and 0.043 off the masked reference, silently)."""
    model, opt, sp, cmodel, graphs = _run(monkeypatch)
    for x, y in batches(2):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
    states = list(sp.layers.values())
    assert all(state.zero_inactive for state in states)
    del sp, opt
    gc.collect()
    assert not any(state.zero_inactive for state in states)
    assert all(state.sparsifier_ref is None for state in states)
    plain = {k: torch.randn_like(v) for k, v in TinyMLP().state_dict().items()}
    model.load_state_dict(plain, strict=False)  # no Sparsifier re-zeroes them now
    x = torch.randn(8, 16)
    with torch.no_grad():
        torch.testing.assert_close(cmodel(x), _masked_reference(model, x))  # the graph compiled under it
        torch._dynamo.reset()
        fresh = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
        torch.testing.assert_close(fresh(x), _masked_reference(model, x))  # a graph compiled after it


def test_without_the_sparsifier_nothing_is_promised(monkeypatch):
    monkeypatch.setattr(agpe_compile.kernels, "choose_cpu_path", lambda *args: "dense")
    model = TinyMLP()
    agpe_compile.prepare(model, {"block_size": 4})
    graphs = []
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}, on_graph=graphs.append))
    state = agpe_compile.layer_state(model.fc1)
    with torch.no_grad():
        state.block_mask[0, 0] = False
    x = torch.randn(4, 16)
    torch.testing.assert_close(cmodel(x), _masked_reference(model, x))  # masked, weights untouched
    assert model.fc1.weight[:4, :4].any()
    assert "True)" not in graphs[0].rewritten.code


def test_only_the_dense_path_by_density_skips_masking():
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[0, :3] = False
    full = build_layout(mask, 128, (1.0, 0.75, 0.5))  # density 0.95: bucket 1.0
    mask[:4] = False
    half = build_layout(mask, 128, (1.0, 0.75, 0.5))  # density 0.45: bucket 0.5
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert skips_masking(full, cuda, True) and skips_masking(full, cpu, True)
    assert not skips_masking(half, cuda, True)  # the GPU's kernels read live blocks only at 0.5
    assert skips_masking(half, cpu, True)  # block 128 at 0.5: the CPU cost model always picks dense
    assert not skips_masking(full, cuda, False)
    three_quarters = build_layout(torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) < 0.7, 128,
                                  (1.0, 0.75, 0.5))
    assert three_quarters.bucket == 0.75
    assert skips_masking(three_quarters, cuda, True)  # at the GPU crossover of block 128
    # the CPU skips where its cost model picks the dense path for every row count
    assert skips_masking(three_quarters, cpu, True)
    quarter = build_layout(torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) < 0.2, 128,
                           (1.0, 0.75, 0.5, 0.25))
    assert quarter.bucket == 0.25 and not skips_masking(quarter, cpu, True)  # gather for large row counts


def test_cpu_skips_masking_exactly_where_the_cost_model_is_always_dense():
    from agpe_compile.kernels import always_dense_from, choose_cpu_path

    for block in (8, 16, 32, 64, 128):
        start = always_dense_from(block)
        for bucket in (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05):
            dense_for_all = all(choose_cpu_path(m, 4096, 4096, bucket, block) == "dense" for m in (1, 64, 8192, 2**20))
            assert dense_for_all == (bucket >= start), (block, bucket)


@pytest.mark.parametrize("contiguous", [True, False])
def test_zeroing_on_the_cpu_clears_nan_and_inf_in_inactive_blocks(contiguous):
    from agpe_compile.zero_weights import zero_inactive_

    layer = torch.nn.Linear(32, 48)
    agpe_compile.prepare(layer, {"block_size": 16})
    state = agpe_compile.layer_state(layer)
    state.block_mask.copy_(torch.tensor([[True, False], [False, True], [True, True]]))
    with torch.no_grad():
        if not contiguous:
            layer.weight.data = layer.weight.data.t().contiguous().t()
        layer.weight[:16, 16:] = float("nan")
        layer.weight[16:32, :16] = float("inf")
        before = layer.weight.detach().clone()
    zero_inactive_(state)
    inactive = ~expand_block_mask(state.block_mask, 16, torch.bool)
    assert torch.all(layer.weight[inactive] == 0)
    assert torch.equal(layer.weight[~inactive], before[~inactive])  # live blocks untouched


def test_zero_kernel_writes_only_inactive_blocks():
    pytest.importorskip("triton")
    from agpe_compile.kernels import zero_inactive_blocks_

    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(3 * 16, 5 * 16).to(dtype)
        expected = weight * expand_block_mask(mask, 16, dtype)
        zero_inactive_blocks_(weight, build_layout(mask, 16))
        assert torch.equal(weight, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dense_path_skips_masking_and_stays_exact_under_inductor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).cuda()
    opt = Meddling(model.parameters(), lr=0.01)
    config = AGPEConfig(target_sparsity=0.2, policy="static", block_size=128, distribution="uniform")
    sp = Sparsifier(model, opt, config)
    for state in sp.layers.values():  # density 0.8 -> bucket 1.0, above the crossover: dense path
        assert skips_masking(state.layout(), state.weight.device, True)
    cmodel = torch.compile(model, backend="agpe")
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(64, 512, generator=gen).cuda()
        loss = cmodel(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        for state in sp.layers.values():
            assert not state.weight[expand_block_mask(~state.block_mask, 128, torch.bool)].any()
        torch.testing.assert_close(cmodel(x), _masked_reference(model, x), rtol=1e-4, atol=1e-4)


def test_explain_says_which_layers_keep_zero_weights():
    model = TinyMLP()
    sparsifier = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            AGPEConfig(target_sparsity=0.5, block_size=4))
    table = str(agpe_compile.explain(model, torch.randn(2, 16)))
    assert table.count("inactive weights kept at zero") == 3, table
    del sparsifier  # Note [A dropped Sparsifier]: nothing keeps them at zero any more
    gc.collect()
    table = str(agpe_compile.explain(model, torch.randn(2, 16)))
    assert table.count("inactive weights kept at zero") == 0, table


def test_an_optimizer_that_replaces_the_sparsifiers_keeps_inactive_weights_zero():
    # The zero-weight promise must survive a new optimizer (a restarted AdamW with momentum
    # over blocks the Sparsifier prunes later): the step hook follows any optimizer holding
    # the layers' weights.
    from agpe_compile.controller import AGPEConfig, Sparsifier

    from .helpers import batches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(model, first, AGPEConfig(policy="gmp", block_size=4, target_sparsity=0.75,
                                                     update_interval=2, end_step=12))
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    replacement = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(14):
        torch.nn.functional.cross_entropy(cmodel(x), y).backward()
        replacement.step()
        replacement.zero_grad()
        sparsifier.step()
    assert sparsifier.global_density < 0.5
    for state in sparsifier.layers.values():
        inactive = ~expand_block_mask(state.block_mask, 4, torch.bool)
        assert torch.all(state.weight[inactive] == 0), state.name


def test_a_replacing_optimizer_gets_the_moments_of_changed_blocks_reset():
    from agpe_compile.controller import AGPEConfig, Sparsifier

    from .helpers import batches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    sparsifier = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            AGPEConfig(policy="gmp", block_size=4, target_sparsity=0.75, update_interval=2,
                                       end_step=12))
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    replacement = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(14):
        torch.nn.functional.cross_entropy(cmodel(x), y).backward()
        replacement.step()
        replacement.zero_grad()
        sparsifier.step()
    for state in sparsifier.layers.values():
        inactive = ~expand_block_mask(state.block_mask, 4, torch.bool)
        assert torch.all(replacement.state[state.weight]["momentum_buffer"][inactive] == 0), state.name


class _Wide(torch.nn.Module):
    """Two 256 x 256 layers at block 32 (8 x 8 grids): at 3 live blocks of 64 the bucket is
    below the CPU's always-dense capacity, so these layers keep masking (do not skip it)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(256, 256)
        self.head = torch.nn.Linear(256, 256)

    def forward(self, x):
        return self.run_head(torch.relu(self.fc1(x)))

    def run_head(self, h):
        return self.head(h)


class _Mixing(torch.optim.Optimizer):
    """Not a known elementwise optimizer: its update reaches every entry (like Muon's)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.mean() + 0.01, alpha=-group["lr"])
        return None


def _sparse_wide(optimizer_cls, **kwargs):
    torch.manual_seed(0)
    model = _Wide()
    opt = optimizer_cls(model.parameters(), lr=0.05, **kwargs)
    config = AGPEConfig(target_sparsity=0.95, policy="static", block_size=32, distribution="uniform")
    sp = Sparsifier(model, opt, config)
    for state in sp.layers.values():
        assert not skips_masking(state.layout(), state.weight.device, True)  # what this test is about
    return model, opt, sp


def _inactive_max(sp):
    return {name: float(s.weight[expand_block_mask(~s.block_mask, s.block_size, torch.bool)].abs().max())
            for name, s in sp.layers.items()}


def test_known_elementwise_optimizers_keep_zeros_and_others_do_not():
    from agpe_compile.zero_weights import keeps_zeros

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert keeps_zeros(torch.optim.SGD(params, lr=0.1)) and keeps_zeros(torch.optim.AdamW(params))
    assert not keeps_zeros(torch.optim.LBFGS(params))
    assert not keeps_zeros(Meddling(params, lr=0.1))  # a subclass may change step()
    assert not keeps_zeros(_Mixing(params, lr=0.1))


def test_after_a_step_of_an_optimizer_that_mixes_entries_every_inactive_weight_is_zero():
    # Found by an audit (Muon): the hook re-zeroed only the layers that skip masking, so
    # export, eager calls and a plain model loading the state dict saw nonzero pruned weights.
    model, opt, sp = _sparse_wide(_Mixing)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(8, 256)
    for _ in range(4):
        loss = cmodel(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        assert _inactive_max(sp) == {"fc1": 0.0, "head": 0.0}
        torch.testing.assert_close(model(x), _masked_reference(model, x))  # eager = oracle


def test_a_layer_run_outside_the_compiled_graph_is_rezeroed_after_each_step():
    # A layer inside a torch.compiler.disable region computes eagerly with its raw weight and
    # gets gradient on inactive blocks; plain SGD then moves them (found by an audit).
    model, opt, sp = _sparse_wide(torch.optim.SGD, momentum=0.9)
    model.run_head = torch.compiler.disable(model.run_head)  # the head runs eagerly, its hooks too
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(8, 256)
    for _ in range(4):
        masks = {name: expand_block_mask(s.block_mask, 32, torch.float32) for name, s in sp.layers.items()}
        oracle = F.linear(torch.relu(F.linear(x, model.fc1.weight * masks["fc1"], model.fc1.bias)),
                          model.head.weight * masks["head"], model.head.bias)
        torch.testing.assert_close(cmodel(x), oracle)
        loss = cmodel(x).square().mean()
        loss.backward()
        assert agpe_compile.layer_state(model.head).ran_eagerly and not agpe_compile.layer_state(model.fc1).ran_eagerly
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        assert _inactive_max(sp) == {"fc1": 0.0, "head": 0.0}


def test_lbfgs_gets_no_zero_promise_and_every_closure_call_is_exact():
    # LBFGS evaluates the closure again after moving the weights along its history, which
    # reaches pruned blocks: the graphs must keep masking (found by an audit).
    model, opt, sp = _sparse_wide(torch.optim.LBFGS, max_iter=4, history_size=4)
    monkey_dense = pytest.MonkeyPatch()
    monkey_dense.setattr(agpe_compile.kernels, "choose_cpu_path", lambda *args: "dense")
    try:
        assert not any(s.zero_inactive for s in sp.layers.values())
        cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
        x = torch.randn(8, 256)
        calls = []

        def closure():
            opt.zero_grad()
            out = cmodel(x)
            calls.append(float((out - _masked_reference(model, x)).abs().max()))
            loss = out.square().mean()
            loss.backward()
            return loss

        for _ in range(3):
            loss = opt.step(closure)
            sp.step(loss)
            assert _inactive_max(sp) == {"fc1": 0.0, "head": 0.0}
        assert len(calls) > 3 and max(calls) < 1e-5
    finally:
        monkey_dense.undo()


def test_without_an_optimizer_it_warns_and_grown_blocks_restart_from_zero():
    # Found by an audit: Sparsifier(model, None, ...) with the optimizer made afterwards; momentum
    # moves pruned weights, and a regrown block kept what they drifted to.
    torch.manual_seed(0)
    model = TinyMLP()
    config = AGPEConfig(target_sparsity=0.5, policy="set", block_size=4, update_interval=2, end_step=100,
                        distribution="uniform")
    with pytest.warns(UserWarning, match="without an optimizer"):
        sp = Sparsifier(model, None, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    grown = 0
    for x, y in batches(8):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        before = {name: s.block_mask.clone() for name, s in sp.layers.items()}
        sp.step(loss)
        for name, state in sp.layers.items():
            new = state.block_mask & ~before[name]
            grown += int(new.sum())
            assert not state.weight[expand_block_mask(new, 4, torch.bool)].any(), name
            if sp.step_count % 2 == 0:  # an update zeroes every inactive block (between updates they drift)
                assert not state.weight[expand_block_mask(~state.block_mask, 4, torch.bool)].any(), name
    assert grown > 0


def test_an_eager_step_resets_the_moments_of_inactive_blocks_too():
    # One eager training step (gradient on inactive blocks) with AdamW, then compiled steps:
    # the moments the eager step left there would keep moving the pruned weights.
    model, opt, sp = _sparse_wide(torch.optim.AdamW)
    x = torch.randn(8, 256)
    model(x).square().mean().backward()  # eager
    opt.step()
    opt.zero_grad()
    for name, state in sp.layers.items():
        inactive = expand_block_mask(~state.block_mask, 32, torch.bool)
        assert not opt.state[state.weight]["exp_avg"][inactive].any(), name
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    for _ in range(3):
        loss = cmodel(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        assert _inactive_max(sp) == {"fc1": 0.0, "head": 0.0}


def test_a_layer_run_eagerly_and_stepped_by_a_second_optimizer_is_rezeroed():
    # The first optimizer's step must not clear the mark of a layer only the second one steps.
    torch.manual_seed(0)
    model = _Wide()
    first = torch.optim.AdamW(model.fc1.parameters(), lr=0.05)
    second = torch.optim.AdamW(model.head.parameters(), lr=0.05)
    config = AGPEConfig(target_sparsity=0.95, policy="static", block_size=32, distribution="uniform")
    sp = Sparsifier(model, first, config)
    model.run_head = torch.compiler.disable(model.run_head)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(8, 256)
    for _ in range(3):
        loss = cmodel(x).square().mean()
        loss.backward()
        first.step()
        second.step()
        first.zero_grad()
        second.zero_grad()
        sp.step(loss)
        assert _inactive_max(sp) == {"fc1": 0.0, "head": 0.0}


def test_without_an_optimizer_a_layer_run_eagerly_is_rezeroed_at_each_sparsifier_step():
    # Found by an audit: hand-written updates (no torch.optim) and an eager head.
    torch.manual_seed(0)
    model = _Wide()
    config = AGPEConfig(target_sparsity=0.95, policy="static", block_size=32, distribution="uniform")
    with pytest.warns(UserWarning, match="without an optimizer"):
        sp = Sparsifier(model, None, config)
    model.run_head = torch.compiler.disable(model.run_head)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(8, 256)
    for _ in range(3):
        loss = cmodel(x).square().mean()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
                p.grad = None
        sp.step(loss)
        assert _inactive_max(sp)["head"] == 0.0


def test_an_lbfgs_that_replaces_the_sparsifiers_optimizer_is_warned_about(caplog):
    import logging

    model, opt, sp = _sparse_wide(torch.optim.AdamW)
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=2)
    x = torch.randn(8, 256)

    def closure():
        lbfgs.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        lbfgs.step(closure)
        lbfgs.step(closure)
    said = [r.getMessage() for r in caplog.records if "Give the LBFGS to the Sparsifier" in r.getMessage()]
    assert len(said) == 1


def test_an_optimizer_step_inside_a_compiled_step_runs_the_hook_untraced():
    """Compiling forward + backward + opt.step() made Dynamo trace the step hook: graph
    breaks inside agpe's own code (a .item() in dense_path.all_live) and recompiles of its
    helpers as masks changed. The hook runs eagerly, and inactive weights stay zero."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyMLP()
    opt = Meddling(model.parameters(), lr=0.05)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, policy="gmp", block_size=4, update_interval=2,
                                           end_step=6, buckets=(1.0, 0.5)))

    @torch.compile(backend="agpe", options={"inductor": False})
    def train_step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    breaks = torch._dynamo.utils.counters["graph_break"]
    before = dict(breaks)
    for x, y in batches(8):
        sp.step(train_step(x, y))
        for state in sp.layers.values():
            assert not state.weight[expand_block_mask(~state.block_mask, 4, torch.bool)].any()
    assert sp.global_density < 1.0
    new = [reason for reason, count in breaks.items() if count > before.get(reason, 0)]
    assert not any("agpe_compile" in reason or ".item()" in reason for reason in new), new


@pytest.mark.parametrize("how", ["close", "drop"])
def test_sparsifiers_made_on_one_optimizer_leave_no_load_hooks_behind(how):
    # Note [Optimizer state on inactive blocks]: the step hook registers a load_state_dict
    # hook on each optimizer it sees; its handle was not removed with the others, so every
    # Sparsifier made (and closed or dropped) on one optimizer left one more (audit AT)
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = next(iter(batches(1)))
    counts = []
    for _ in range(4):
        sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, policy="rigl", block_size=4, update_interval=5))
        F.cross_entropy(model(x), y).backward()
        opt.step()  # the first step registers the load hook
        opt.zero_grad()
        if how == "close":
            sp.close()
        del sp
        gc.collect()
        counts.append(len(opt._optimizer_load_state_dict_post_hooks))
    assert counts == [0, 0, 0, 0]


class _Wide256(torch.nn.Module):
    """256-wide MLP at block 32: at density 0.125 fc1 and fc2 mask W on the CPU (not the dense
    path by density), so no other rule re-zeroes them after a step."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(256, 256), torch.nn.Linear(256, 256),
                                        torch.nn.Linear(256, 32))

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _wide256_run(variant, optimizer="sgd"):
    torch.manual_seed(0)
    model = _Wide256()
    start = {n: m.weight.detach().clone() for n, m in model.named_children()}
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = agpe_compile.BlockSparseAdamW(model.parameters(), lr=1e-2)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.875, policy="rigl", block_size=32, update_interval=2,
                                            end_step=20, distribution="uniform", drop_fraction=0.5))
    assert not any(skips_masking(s.layout(), s.weight.device, s.zero_inactive) for n, s in sp.layers.items()
                   if n != "fc3")
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    if variant == "noise hook":  # gradient-noise injection on every entry
        gen = torch.Generator().manual_seed(1)
        for m in model.children():
            m.weight.register_hook(lambda grad: grad + 1e-3 * torch.randn(grad.shape, generator=gen))
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(256, 32, generator=gen)
    for _ in range(7):  # the last step is not an update step (updates re-zero every layer)
        x = torch.randn(16, 256, generator=gen)
        loss = F.cross_entropy(cmodel(x), (x @ teacher).argmax(1))
        if variant == "eager penalty":  # L2-SP: a gradient the agpe op did not make
            loss = loss + 1e-2 * sum((m.weight - start[n]).pow(2).sum() for n, m in model.named_children())
        loss.backward()
        if variant == "step first":  # sparsifier.step() between backward and optimizer.step()
            sp.step(loss)
            opt.step()
            opt.zero_grad()
        else:
            opt.step()
            if variant != "no zero_grad":
                opt.zero_grad()
            sp.step(loss)
    return model, opt, sp, cmodel


@pytest.mark.parametrize("variant", ["eager penalty", "noise hook", "no zero_grad", "step first"])
def test_inactive_weights_stay_zero_when_the_gradient_holds_more_than_the_ops(variant):
    # Audit BM F1/F2: an eager weight penalty or a noise hook reached inactive blocks of layers
    # that mask W (their op's gradient is zero there, the weight's whole gradient is not);
    # a gradient still held at an update moved the dropped blocks at the next step
    model, opt, sp, cmodel, = _wide256_run(variant)
    for name, state in sp.layers.items():
        inactive = expand_block_mask(~state.block_mask, state.block_size, torch.bool)
        assert inactive.any() and not state.weight.detach()[inactive].any(), (variant, name)
        if variant in ("no zero_grad", "step first"):  # the dropped blocks' stale gradient was cleared
            assert not opt.state[state.weight]["momentum_buffer"][inactive].any(), (variant, name)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(cmodel(x), model(x))  # the eager module computes what the compiled one does


def test_block_sparse_adamw_steps_are_not_re_zeroed(monkeypatch):
    # its block-sparse step never writes an inactive block (sparse_stepped): no pass over them
    import agpe_compile.zero_weights as zero_weights

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    zeroed = []
    original = zero_weights.zero_inactive_
    monkeypatch.setattr(zero_weights, "zero_inactive_", lambda state: (zeroed.append(state.name), original(state)))
    model, opt, sp, _ = _wide256_run("eager penalty", optimizer="block_sparse")
    assert {id(sp.layers[n].weight) for n in ("fc1", "fc2")} <= opt.sparse_stepped
    # once, at its first step (Note [Optimizer state on inactive blocks]); SGD: at every step
    assert zeroed.count("fc1") == zeroed.count("fc2") == 1, zeroed
    for name, state in sp.layers.items():
        inactive = expand_block_mask(~state.block_mask, state.block_size, torch.bool)
        assert not state.weight.detach()[inactive].any(), name
