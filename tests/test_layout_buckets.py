"""A layout takes only the buckets some path tells apart (Note [Buckets no path tells apart]
in agpe_compile/buckets.py): crossings between the others recompile nothing and change no
value."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import agpe_compile
from agpe_compile import kernels
from agpe_compile.buckets import layout_buckets, rebucket
from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.layout import DEFAULT_BUCKETS, build_layout
from agpe_compile.ops import paths
from agpe_compile.state import layer_states

from .controller.helpers import TinyMLP, batches
from .models import MLP, aot_backend, set_random_masks

pytestmark = pytest.mark.shipped_layout_buckets  # (the suite's other tests take every bucket: tests/conftest.py)


def test_layout_buckets_per_block_size():
    assert layout_buckets(DEFAULT_BUCKETS, 8) == (1.0,)
    assert layout_buckets(DEFAULT_BUCKETS, 16) == (1.0,)
    assert layout_buckets(DEFAULT_BUCKETS, 32) == (0.05, 0.1, 0.15, 0.25, 0.35, 1.0)
    assert layout_buckets(DEFAULT_BUCKETS, 64) == (0.05, 0.1, 0.15, 0.25, 0.35, 1.0)
    assert layout_buckets(DEFAULT_BUCKETS, 128) == tuple(sorted(DEFAULT_BUCKETS))
    assert layout_buckets((1.0, 0.6, 0.3), 64) == (0.3, 1.0)
    with pytest.raises(ValueError, match="include 1.0"):
        layout_buckets((0.5,), 8)


def _mask(rows, cols, live):
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols, generator=torch.Generator().manual_seed(live))[:live]] = True
    return mask.view(rows, cols)


@pytest.mark.parametrize("block_size", [4, 8, 16, 32, 64, 128])
def test_a_bucket_a_layout_skips_decides_every_path_as_full_capacity(block_size, monkeypatch):
    """Every decision taken from a layout's capacity (the CPU cost model at any row count,
    the CUDA crossovers for each dtype and AGPE_TMA setting, the masking and the zero hook)
    is the same at a skipped bucket's capacity as at full capacity."""
    rows, cols = 8, 8
    kept = layout_buckets(DEFAULT_BUCKETS, block_size)
    skipped = [b for b in DEFAULT_BUCKETS if b not in kept]
    assert (block_size == 128) == (not skipped)
    n, k = rows * block_size, cols * block_size
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for bucket in skipped:
        mask = _mask(rows, cols, int(bucket * rows * cols))
        at_bucket = build_layout(mask, block_size, (bucket, 1.0))
        full = build_layout(mask, block_size, kept)
        assert at_bucket.bucket == bucket and full.bucket == 1.0 and full.capacity == rows * cols
        with FakeTensorMode():
            weight = torch.empty(n, k)
            for m in (1, 8, 512, 8192, 2**20):
                x = torch.empty(m, k)
                assert paths.choose(x, weight, at_bucket) == paths.choose(x, weight, full) == "dense"
        for zero in (False, True):
            assert paths.may_skip_masking(at_bucket, cpu, zero) == paths.may_skip_masking(full, cpu, zero)
            assert paths.may_skip_masking(at_bucket, cuda, zero) == paths.may_skip_masking(full, cuda, zero)
            for persistent in (False, True):
                monkeypatch.setattr(kernels, "persistent_tma_setting", lambda device, dtype: persistent)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    for device in (cpu, cuda):
                        assert (paths.skips_masking(at_bucket, device, zero, dtype)
                                == paths.skips_masking(full, device, zero, dtype))
                    # on CUDA the op runs the kernels below this capacity: neither layout is below it
                    fraction = at_bucket.capacity / (rows * cols)
                    assert fraction >= paths.dense_from(block_size, cuda, dtype)


def _gmp_run(steps=40):
    """GMP to 90% on TinyMLP at block 4 (the CPU runs block 4 dense at every density)."""
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backend = aot_backend()
    sp = Sparsifier(model, opt, AGPEConfig(policy="gmp", target_sparsity=0.9, block_size=4, update_interval=4,
                                           end_step=32), recompile_counter=lambda: backend.graph_count)
    compiled = torch.compile(model, backend=backend)
    losses, buckets = [], set()
    for x, y in batches(steps):
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        losses.append(loss.item())
        buckets.add(tuple(s.layout_bucket for s in sp.layers.values()))
    return model, sp, backend, losses, buckets


def test_a_run_through_every_bucket_compiles_once_and_matches_the_run_that_recompiles(monkeypatch):
    model, sp, backend, losses, buckets = _gmp_run()
    assert sp.densities()["fc1"] == pytest.approx(0.1, abs=0.02)
    assert backend.graph_count == 1 and buckets == {(1.0, 1.0, 1.0)}
    torch._dynamo.reset()
    monkeypatch.setattr(paths, "dense_everywhere_from", lambda block_size: 1.0)  # every bucket a layout
    old_model, old_sp, old_backend, old_losses, old_buckets = _gmp_run()
    assert old_backend.graph_count >= 5 and len(old_buckets) >= 5  # the crossings it recompiled for
    assert losses == old_losses
    for name, value in model.state_dict().items():
        if not name.endswith("block_layout"):  # (the layouts' lengths differ: that is the change)
            assert torch.equal(value, old_model.state_dict()[name]), name
    assert sp.flops.sparse == old_sp.flops.sparse


def test_block_32_skips_the_buckets_every_device_runs_dense_and_crosses_the_others():
    torch.manual_seed(0)
    model = MLP((64, 64, 32))  # grids 2 x 2 and 1 x 2 at block 32
    states = agpe_compile.prepare(model, options={"block_size": 32})
    backend = aot_backend()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 64)
    compiled(x)
    set_random_masks(model, 0.5, only="layers.0")  # bucket 0.5: the GPU's dense path at block 32 too
    assert rebucket(model) == []
    torch.testing.assert_close(compiled(x), model(x))
    assert backend.graph_count == 1 and states["layers.0"].layout_bucket == 1.0
    set_random_masks(model, 0.25, only="layers.0")  # bucket 0.25: the GPU's kernels
    assert rebucket(model) == ["layers.0"]
    assert states["layers.0"].layout_bucket == 0.25 and states["layers.0"].layout().capacity == 1
    torch.testing.assert_close(compiled(x), model(x))
    assert backend.graph_count == 2
    assert {name: s.layout_bucket for name, s in layer_states(model).items()} == {"layers.0": 0.25, "layers.1": 1.0}


def test_a_checkpoint_at_a_bucket_the_layout_now_skips_loads_and_moves_to_full_capacity(monkeypatch):
    torch.manual_seed(0)
    sparse = MLP((32, 32, 16))
    agpe_compile.prepare(sparse, options={"block_size": 8})
    with monkeypatch.context() as patch:  # saved by a run whose layouts took every bucket
        patch.setattr(paths, "dense_everywhere_from", lambda block_size: 1.0)
        set_random_masks(sparse, 0.25)
        rebucket(sparse)
    assert layer_states(sparse)["layers.0"].layout_bucket == 0.25
    saved = {k: v.clone() for k, v in sparse.state_dict().items()}
    fresh = MLP((32, 32, 16))
    states = agpe_compile.prepare(fresh, options={"block_size": 8})
    backend = aot_backend()
    compiled = torch.compile(fresh, backend=backend)
    x = torch.randn(4, 32)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(compiled(x), sparse(x))
    assert sorted(rebucket(fresh)) == ["layers.0", "layers.1"]
    assert states["layers.0"].layout_bucket == 1.0 and torch.equal(states["layers.0"].layout().to_mask(),
                                                                    saved["layers.0.weight_block_mask"])
    torch.testing.assert_close(compiled(x), sparse(x))


def _steps(model, opt, sp, compiled, data):
    losses = []
    for x, y in data:
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        losses.append(loss.item())
    return losses


def _build():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backend = aot_backend()
    sp = Sparsifier(model, opt, AGPEConfig(policy="rigl", target_sparsity=0.9, block_size=4, update_interval=4,
                                           end_step=32), recompile_counter=lambda: backend.graph_count)
    return model, opt, sp, torch.compile(model, backend=backend), backend


@pytest.mark.parametrize("saved_with_every_bucket", [True, False], ids=["old-to-shipped", "shipped-to-old"])
def test_a_run_resumes_bit_identically_across_the_change(saved_with_every_bucket, monkeypatch):
    """A checkpoint written with every bucket a layout (the code before this rule) resumes
    as shipped, and the reverse, exactly like the run that was never interrupted."""
    shipped = paths.dense_everywhere_from
    data = list(batches(40))
    model, opt, sp, compiled, _ = _build()
    straight = _steps(model, opt, sp, compiled, data)
    torch._dynamo.reset()
    if saved_with_every_bucket:
        monkeypatch.setattr(paths, "dense_everywhere_from", lambda block_size: 1.0)
    model, opt, sp, compiled, _ = _build()
    first = _steps(model, opt, sp, compiled, data[:18])
    saved = {n: s.layout_bucket for n, s in sp.layers.items()}
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}
    torch._dynamo.reset()
    monkeypatch.setattr(paths, "dense_everywhere_from", shipped if saved_with_every_bucket else lambda block_size: 1.0)
    model, opt, sp, compiled, backend = _build()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sp.load_state_dict(checkpoint["sp"])
    assert first + _steps(model, opt, sp, compiled, data[18:]) == straight
    if saved_with_every_bucket:
        assert set(saved.values()) != {1.0} and {s.layout_bucket for s in sp.layers.values()} == {1.0}
        assert backend.graph_count == 1
    else:
        assert set(saved.values()) == {1.0} and {s.layout_bucket for s in sp.layers.values()} != {1.0}
