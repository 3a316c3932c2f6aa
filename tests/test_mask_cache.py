"""Note [Mask-derived tensors] (agpe_compile/ops/mask_cache.py): what the CPU dense path
derives from a block mask is built once per mask contents, and any change to the mask is
seen on the next call."""

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import is_fake

from agpe_compile.ops import dense_path, mask_cache, reference


@pytest.fixture(autouse=True)
def _fresh_cache():
    mask_cache.clear()
    yield
    mask_cache.clear()


def _counting(mask, key="k"):
    builds = []

    def build():
        builds.append(1)
        return mask.shape.numel() if is_fake(mask) else int(mask.sum())

    return builds, lambda: mask_cache.derived(mask, 8, key, build)


def test_built_once_per_mask_contents():
    mask = torch.ones(4, 4, dtype=torch.bool)
    builds, get = _counting(mask)
    assert get() == 16 and get() == 16 and len(builds) == 1
    mask[0, 0] = False
    assert get() == 15 and len(builds) == 2
    mask[0, 0] = True  # back to what it was: built again (one entry per mask, the latest contents)
    assert get() == 16 and len(builds) == 3
    assert mask_cache.derived(mask, 8, "other", lambda: "other") == "other"  # another key, same entry
    assert len(mask_cache._entries) == 1


def test_blocks_under_8_build_every_time():
    # their row masks would hold 2/b of the weight's memory (Note [Mask-derived tensors])
    mask = torch.ones(4, 4, dtype=torch.bool)
    builds = []
    for _ in range(2):
        mask_cache.derived(mask, 4, "k", lambda: builds.append(1))
    assert len(builds) == 2 and len(mask_cache._entries) == 0
    weight = torch.randn(16, 16)
    dense_path.masked_weight(weight, mask, 4)
    dense_path.zero_weight_blocks_(weight, mask, 4)
    assert len(mask_cache._entries) == 0


def _storage_copy(m):
    m.untyped_storage().copy_(torch.zeros_like(m).untyped_storage())


@pytest.mark.parametrize("edit", [
    lambda m: m.view(-1)[3].fill_(False),  # through a view
    lambda m: m.copy_(torch.zeros_like(m)),
    lambda m: m.logical_not_(),
    lambda m: setattr(m, "data", torch.zeros_like(m)),  # new storage, same tensor object
    lambda m: setattr(m, "data", torch.ones(2, 8, dtype=torch.bool)),  # same bytes, another shape
    # writes the version counter does not see (helper audit CM): by contents they are seen
    lambda m: m.data.__setitem__((1, slice(None)), False),
    lambda m: m.data.fill_(False),
    lambda m: m.numpy().__setitem__(2, False),
    _storage_copy,
    lambda m: torch.from_dlpack(m).__setitem__((0, 0), False),
], ids=["view", "copy_", "logical_not_", "data=", "data=reshaped", "data[]", "data.fill_", "numpy",
        "storage", "dlpack"])
def test_every_kind_of_edit_is_seen(edit):
    mask = torch.ones(4, 4, dtype=torch.bool)
    builds, get = _counting(mask)
    get()
    with torch.no_grad():
        edit(mask)
    assert get() == int(mask.sum()) and len(builds) == 2


def test_a_new_tensor_at_a_freed_address_is_not_taken_for_the_old_one():
    # audit CM 3: ``.data =`` twice between calls could land on the first storage's address
    mask = torch.ones(4, 4, dtype=torch.bool)
    builds, get = _counting(mask)
    get()
    for fill in (False, True, False):
        mask.data = torch.full((4, 4), fill)
    assert get() == 0 and len(builds) == 2


def test_fake_tensors_build_each_time_and_inference_tensors_are_cached_by_contents():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.ones(4, 4, dtype=torch.bool)
        builds, get = _counting(fake)
        get(), get()
    assert len(builds) == 2 and len(mask_cache._entries) == 0
    with torch.inference_mode():
        frozen = torch.ones(4, 4, dtype=torch.bool)
    builds, get = _counting(frozen)
    assert get() == 16 and get() == 16 and len(builds) == 1
    with torch.inference_mode():
        frozen[0] = False
    assert get() == 12 and len(builds) == 2


def test_a_freed_mask_drops_its_entry():
    mask = torch.ones(4, 4, dtype=torch.bool)
    _, get = _counting(mask)
    get()
    assert len(mask_cache._entries) == 1
    del mask, get
    gc.collect()
    assert len(mask_cache._entries) == 0


@pytest.mark.parametrize("cols", [1, 3])
def test_no_derived_tensor_holds_its_mask(cols):
    # one block column: the row mask's reshape was a view of the mask, which kept the mask
    # (and its entry) alive for good
    b = 8
    weight, x, grad_out = torch.randn(2 * b, cols * b), torch.randn(3, cols * b), torch.randn(3, 2 * b)
    mask = torch.tensor([[True] * cols, [False] * cols])
    _dense_path_results(weight, grad_out, x, mask, b)
    dense_path.row_mask(mask, b, torch.bool)
    assert len(mask_cache._entries) == 1
    del mask
    gc.collect()
    assert len(mask_cache._entries) == 0


def _dense_path_results(weight, grad_out, x, mask, block_size):
    """Everything the dense path derives from the mask, as values."""
    zeroed = weight.clone()
    dense_path.zero_weight_blocks_(zeroed, mask, block_size)
    dw, scores, dense_sq = dense_path.grad_weight_and_scores(grad_out, x, weight, mask, block_size,
                                                            torch.tensor(True), "taylor")
    _, few_scores, _ = dense_path.grad_weight_and_scores(grad_out, x, weight, mask, block_size,
                                                         torch.tensor(False), "magnitude")
    return [dense_path.masked_weight(weight, mask, block_size), zeroed, dw, scores, dense_sq, few_scores,
            dense_path.forward(x, weight, None, mask, block_size, False),
            dense_path.grad_input(grad_out, weight, mask, block_size, False)]


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_the_dense_path_follows_a_mask_edited_between_calls(density):
    torch.manual_seed(0)
    b, rows, cols = 8, 6, 5
    weight, x, grad_out = torch.randn(rows * b, cols * b), torch.randn(7, cols * b), torch.randn(7, rows * b)
    mask = torch.rand(rows, cols) < density
    first = _dense_path_results(weight, grad_out, x, mask, b)
    assert len(mask_cache._entries) == 1  # cached
    with torch.no_grad():
        mask[:2] = torch.rand(2, cols) < 0.5  # a hand edit of two block rows
        mask[-1] = True
    second = _dense_path_results(weight, grad_out, x, mask, b)
    mask_cache.clear()
    fresh = _dense_path_results(weight, grad_out, x, mask.clone(), b)
    for got, want in zip(second, fresh):
        assert torch.equal(got, want)  # bit for bit what building anew gives
    assert torch.equal(second[0], reference.masked_weight(weight, mask, b))
    assert not all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("write", ["data[]", "numpy"])
def test_a_compiled_layer_follows_a_mask_written_where_the_version_counter_cannot_see(write):
    # helper audit CM 1-2: the first cache (keyed on the version) computed with the old mask
    import agpe_compile
    from agpe_compile.ops.reference import expand_block_mask

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    agpe_compile.prepare(model, options={"block_size": 8})
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(5, 16)
    compiled(x).sum().backward()  # the all-live mask's tensors are cached
    model.zero_grad()
    mask = agpe_compile.layer_state(model[0]).block_mask
    if write == "data[]":
        mask.data[0, :1] = False
    else:
        mask.numpy()[1, 1:] = False
    out = compiled(x)
    out.sum().backward()
    assert len(mask_cache._entries) >= 1  # the cache was in use
    keep = expand_block_mask(mask, 8, torch.bool)
    hidden = torch.relu(torch.nn.functional.linear(x, model[0].weight * keep, model[0].bias))
    torch.testing.assert_close(out, torch.nn.functional.linear(hidden, model[2].weight, model[2].bias),
                               rtol=0, atol=1e-6)
    assert not model[0].weight.grad[~keep].any()  # no gradient on the blocks made inactive
    torch._dynamo.reset()


def test_a_trace_with_real_tensors_does_not_bake_in_a_cached_tensor():
    # re-audit CM2: make_fx(tracing_mode="real") was handed the row mask built before the
    # trace, and the graph kept it as a constant
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    weight, first, second = torch.randn(24, 40), torch.rand(3, 5) > 0.4, torch.rand(3, 5) > 0.6
    dense_path.masked_weight(weight, first, 8)  # cached, as a training step would
    graph = make_fx(lambda w, m: dense_path.masked_weight(w, m, 8), tracing_mode="real")(weight, first)
    assert torch.equal(graph(weight, second), reference.masked_weight(weight, second, 8))


def test_only_bool_masks_are_cached():
    # a float mask can carry a negation flag (torch._neg_view) that its bytes do not show
    builds = []
    mask = torch.ones(2, 2)
    for _ in range(2):
        mask_cache.derived(mask, 8, "k", lambda: builds.append(1))
    assert len(builds) == 2 and len(mask_cache._entries) == 0


def _gathered_layer(monkeypatch):
    """A compiled block-32 layer at density 1/4 whose calls take the gathered-block path,
    which reads the layout, not the mask."""
    import agpe_compile
    from agpe_compile import kernels

    monkeypatch.setattr(kernels, "choose_cpu_path", lambda *args: "gather")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128))
    agpe_compile.prepare(model, options={"block_size": 32})
    state = agpe_compile.layer_state(model[0])
    with torch.no_grad():
        state.block_mask.copy_(torch.eye(4, dtype=torch.bool))
    agpe_compile.rebucket(model)
    return model, state, torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))


def test_the_cpu_layout_follows_a_mask_written_where_the_version_counter_cannot_see(monkeypatch):
    from agpe_compile.ops.reference import expand_block_mask

    model, state, compiled = _gathered_layer(monkeypatch)
    x = torch.randn(6, 128)
    compiled(x)
    state.block_mask.data[0, 0] = False  # the version counter does not move
    state.block_mask.numpy()[1, 2] = True
    keep = expand_block_mask(state.block_mask, 32, torch.bool)
    want = torch.nn.functional.linear(x, model[0].weight * keep, model[0].bias)
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_the_layout_is_not_rewritten_while_the_mask_is_unchanged(monkeypatch):
    from agpe_compile import state as state_module

    _, state, compiled = _gathered_layer(monkeypatch)
    x = torch.randn(6, 128)
    compiled(x)
    rewrites = []
    original = state_module.update_layout_
    monkeypatch.setattr(state_module, "update_layout_", lambda *a: rewrites.append(1) or original(*a))
    for _ in range(3):
        compiled(x)
    assert rewrites == []
    state.block_mask.data[0, 0] = False
    compiled(x)
    assert rewrites == [1]
    torch._dynamo.reset()


def test_a_data_write_under_the_zero_promise_is_zeroed_before_the_next_call():
    # the Sparsifier's layers skip masking W (their inactive weights are zero): a block
    # switched off through mask.data had its weights used, unmasked, until the next step
    import agpe_compile
    from agpe_compile.ops.reference import expand_block_mask

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(
        policy="rigl", block_size=8, target_sparsity=0.5, update_interval=50, end_step=200))
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(16, 32)
    loss = compiled(x).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    sparsifier.step(loss)
    mask = agpe_compile.layer_state(model[0]).block_mask
    mask.data[:, 0] = False
    out = compiled(x)
    keep = expand_block_mask(mask, 8, torch.bool)
    assert not model[0].weight.detach()[~keep].any()
    hidden = torch.relu(torch.nn.functional.linear(x, model[0].weight * keep, model[0].bias))
    torch.testing.assert_close(out, torch.nn.functional.linear(hidden, model[2].weight, model[2].bias))
    sparsifier.close()
    torch._dynamo.reset()
