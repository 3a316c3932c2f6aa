"""The op and the backend on a real GPU: every CUDA path, eager and through Inductor.

* ``agpe::sparse_linear`` fwd+bwd (autograd) at a bucket below the crossover (Triton
  kernels) and at the full bucket (cuBLAS + the fused mask-and-score kernel), eager and
  under ``torch.compile`` (where the triton_op is decomposed and Inductor schedules the
  kernels), against the float64 dense-with-zeros oracle, saliency buffers included.
* a GPT block in bf16 compiled with ``backend="agpe"`` (Inductor) at density 0.25 against
  the eager W*M model.
* the same block under activation checkpointing (the op inside the checkpointed body);
* BlockSparseAdamW against AdamW; zero-code mode shrinking layouts to the kernels.
"""

import pytest
import torch

import agpe_compile
from agpe_compile.layout import DEFAULT_BUCKETS
from agpe_compile.packed_layout import build_packed

from .models import GPTBlock, eager_masked, grads, set_random_masks
from .tolerances import TOLERANCES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BF16 = dict(rtol=TOLERANCES[torch.bfloat16][0], atol=TOLERANCES[torch.bfloat16][1])
SCORES = dict(rtol=1e-2, atol=1e-2)  # fp32 sums of 16384 bf16 products, vs float64
B = 128


def _op_problem(density, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n, k, m = 1024, 2048, 1000
    rows, cols = n // B, k // B
    mask = torch.zeros(rows * cols, dtype=torch.bool, device="cuda")
    mask[torch.randperm(rows * cols, generator=g, device="cuda")[: round(density * rows * cols)]] = True
    mask = mask.view(rows, cols)
    em = mask.repeat_interleave(B, 0).repeat_interleave(B, 1)
    w = (torch.randn(n, k, generator=g, device="cuda") / k**0.5).to(torch.bfloat16)
    x = torch.randn(4, m // 4, k, generator=g, device="cuda").to(torch.bfloat16)
    dy = (torch.randn(4, m // 4, n, generator=g, device="cuda") / m**0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
    return x, w, bias, mask, em, dy


def _run(fn, x, w, bias, mask, dy, flag):
    rows, cols = mask.shape
    state = [torch.full((rows, cols), 3.0, device="cuda"), torch.full((rows, cols), 5.0, device="cuda"),
             torch.tensor(flag, device="cuda"), torch.zeros(2, dtype=torch.int64, device="cuda")]
    layout, bucket = build_packed(mask, B, DEFAULT_BUCKETS)
    x, w, bias = (t.clone().requires_grad_() for t in (x, w, bias))
    y = fn(x, w, bias, mask, *state, layout.cuda())
    y.backward(dy)
    return bucket, y.detach(), x.grad, w.grad, bias.grad, state


def _eager(x, w, bias, mask, sal, dgs, flag, counters, layout):
    return torch.ops.agpe.sparse_linear(x, w, bias, mask, sal, dgs, flag, counters, layout, B, "taylor")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
# the 0.75 bucket: cuBLAS, except the kernels under AGPE_TMA=persistent (GPU_DENSE_CROSSOVER_PERSISTENT_TMA)
@pytest.mark.parametrize("density, bucket", [(0.25, 0.25), (0.7, 0.75), (0.9, 1.0)],
                         ids=["triton", "bucket075", "cublas"])
@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("tma", ["off", "auto", "persistent"])  # Note [TMA by default]: eager "auto" failed once
def test_op_every_cuda_path(density, bucket, compiled, flag, tma, monkeypatch):
    monkeypatch.setenv("AGPE_TMA", tma)
    # plain Inductor, without agpe's post-grad pass whose key carries AGPE_TMA (Note [Compile
    # caches and the traced kernels]): its AOTAutograd cache would serve the "off" graph to
    # the TMA parameters, which then passed without running their kernels (audit BF)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    x, w, bias, mask, em, dy = _op_problem(density, seed=int(density * 100))
    fn = torch.compile(_eager, fullgraph=True) if compiled else _eager
    got_bucket, y, dx, dw, db, (sal, dgs, _, counters) = _run(fn, x, w, bias, mask, dy, flag)
    assert got_bucket == bucket
    if bucket == 0.75:  # the path this bucket takes follows the setting (GPU_DENSE_CROSSOVER_PERSISTENT_TMA)
        from agpe_compile.layout import build_layout
        from agpe_compile.ops import paths

        hopper = torch.cuda.get_device_capability()[0] == 9
        expected = "triton" if tma == "persistent" and hopper else "dense"
        assert paths.choose(x, w, build_layout(mask, B)) == expected
    wd = torch.where(em, w.double(), 0.0)
    x2, dy2 = x.double().reshape(-1, x.shape[-1]), dy.double().reshape(-1, dy.shape[-1])
    torch.testing.assert_close(y.double(), (x2 @ wd.T + bias.double()).reshape(y.shape), **BF16)
    torch.testing.assert_close(dx.double(), (dy2 @ wd).reshape(x.shape), **BF16)
    dense = dy2.T @ x2
    torch.testing.assert_close(dw.double(), dense * em, **BF16)
    torch.testing.assert_close(db.double(), dy2.sum(0), **BF16)
    assert not dw[~em].any()  # masked blocks exactly zero

    def block_sum(t):
        return t.reshape(mask.shape[0], B, mask.shape[1], B).sum(dim=(1, 3))

    torch.testing.assert_close(sal.double(), 3.0 + block_sum((wd * dense * em).abs()), **SCORES)
    expected_sq = 5.0 + (block_sum(dense.square()) * ~mask if flag else 0.0)
    torch.testing.assert_close(dgs.double(), torch.as_tensor(expected_sq, device="cuda").double()
                               .expand_as(dgs), **SCORES)
    assert counters.tolist() == [x.numel() // x.shape[-1], 0]


def test_gpt_block_through_the_backend_bf16():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTBlock(512, 8).cuda().to(torch.bfloat16)
    agpe_compile.prepare(model, options={"block_size": 64})
    set_random_masks(model, 0.25)
    agpe_compile.rebucket(model)
    compiled = torch.compile(model, backend="agpe")
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    compiled(x).float().square().mean().backward()
    got = grads(model)
    eager_masked(model, x).float().square().mean().backward()
    want = grads(model)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=5e-2, atol=5e-3,
                                   msg=lambda m: f"{name}: {m}")
    states = agpe_compile.layer_states(model)
    assert all(s.layout_bucket == 0.25 for s in states.values())


class _CheckpointedBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = GPTBlock(512, 8)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def test_gpt_block_under_activation_checkpointing_runs_the_kernels_bf16():
    """Note [Weights inside higher-order ops]: the checkpointed block's layers run the op
    (Triton kernels at 0.25), recomputed in the backward, and count their rows."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _CheckpointedBlock().cuda().to(torch.bfloat16)
    agpe_compile.prepare(model, options={"block_size": 64})
    set_random_masks(model, 0.25)
    agpe_compile.rebucket(model)
    compiled = torch.compile(model, backend="agpe")
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    compiled(x).float().square().mean().backward()
    got = grads(model)
    eager_masked(model, x).float().square().mean().backward()
    want = grads(model)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=5e-2, atol=5e-3,
                                   msg=lambda m: f"{name}: {m}")
    states = agpe_compile.layer_states(model)
    assert all(s.layout_bucket == 0.25 for s in states.values())
    assert all(int(s.counters[0]) == 4 * 256 for s in states.values())


def test_a_weight_used_without_its_module_is_compiled_at_full_capacity_bf16():
    # Note [Layouts a graph cannot see change]: F.linear(x, module.weight) next to a normally
    # called layer; the functional one is compiled at full capacity (dense path on CUDA) and
    # stays right as the masks move across buckets, through Inductor.
    import torch.nn.functional as F

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(512, 512)
            self.proj = torch.nn.Linear(512, 512)

        def forward(self, x):
            return F.linear(torch.relu(self.fc(x)), self.proj.weight, self.proj.bias)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Mixed().cuda().to(torch.bfloat16)
    agpe_compile.prepare(model, options={"block_size": 64})
    compiled = torch.compile(model, backend="agpe")
    x = torch.randn(2, 128, 512, device="cuda", dtype=torch.bfloat16)
    for seed, (fc, proj) in enumerate([(1.0, 1.0), (0.5, 0.25), (1.0, 0.5), (0.5, 0.5), (0.25, 1.0)]):
        set_random_masks(model, fc, seed=seed, only="fc")
        set_random_masks(model, proj, seed=seed, only="proj")
        agpe_compile.rebucket(model)
        torch.testing.assert_close(compiled(x).float(), eager_masked(model, x).float(), **BF16)


def test_two_instances_share_one_inductor_graph_with_their_own_masks_bf16():
    # Note [Graphs shared by instances]: the traced CUDA bodies read each call's layouts.
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [GPTBlock(512, 8).cuda().to(torch.bfloat16) for _ in range(2)]
    for seed, model in enumerate(models):
        agpe_compile.prepare(model, options={"block_size": 64})
        set_random_masks(model, 0.25, seed=seed)
        agpe_compile.rebucket(model)
    x = torch.randn(2, 128, 512, device="cuda", dtype=torch.bfloat16)
    for model in models:
        out = torch.compile(model, backend="agpe")(x)
        torch.testing.assert_close(out.float(), eager_masked(model, x).float(), **BF16)


def test_block_sparse_adamw_matches_adamw_bf16():
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPTBlock(512, 8).cuda().to(torch.bfloat16)
        agpe_compile.prepare(model, options={"block_size": 128})
        set_random_masks(model, 0.25)
        models.append(model)
    reference, sparse = models
    options = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    adamw = torch.optim.AdamW(reference.parameters(), foreach=True, **options)
    block_sparse = agpe_compile.BlockSparseAdamW(sparse.parameters(), fused=True, **options)
    x = torch.randn(2, 128, 512, device="cuda", dtype=torch.bfloat16)
    for model, optimizer in ((reference, adamw), (sparse, block_sparse)):
        compiled = torch.compile(model, backend="agpe")
        for _ in range(3):
            compiled(x).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert block_sparse.sparse_updates == 3 * 4
    for (name, p), q in zip(reference.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q.float(), p.float(), rtol=2e-2, atol=2e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.shipped_layout_buckets  # block 64 as shipped: the 0.5 and 0.75 buckets are no layouts
def test_zero_code_mode_shrinks_layouts_to_the_kernels_bf16():
    # Zero-code mode on a prepared model: after the first optimizer step the controller moves
    # the 25%-dense initial layouts to their bucket, below the crossover, so the next compiled
    # call runs the Triton kernels (one extra compile), and training stays finite.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTBlock(512, 8).cuda().to(torch.bfloat16)
    agpe_compile.prepare(model, options={"block_size": 64})
    backend = agpe_compile.AgpeBackend({"block_size": 64, "target_sparsity": 0.75, "policy": "rigl",
                                        "distribution": "uniform", "update_interval": 2, "end_step": 8})
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    for _ in range(6):
        loss = compiled(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    (controller,) = backend.controllers
    assert controller.follows_optimizer and controller.sparsifier.step_count == 6
    states = agpe_compile.layer_states(model).values()
    assert all(s.layout_bucket < agpe_compile.ops.paths.GPU_DENSE_CROSSOVER[64] for s in states)
    assert backend.graph_count == 2


def test_two_calls_then_one_backward_through_the_kernels_bf16():
    # Note [Buffers written by the backward]: D(real) + D(fake) with the Triton kernels
    # writing the scores in the backward of each call.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTBlock(512, 8).cuda().to(torch.bfloat16)
    agpe_compile.prepare(model, options={"block_size": 64})
    set_random_masks(model, 0.25, seed=3)
    agpe_compile.rebucket(model)
    compiled = torch.compile(model, backend="agpe")
    a, b = (torch.randn(2, 128, 512, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    (compiled(a).float().square().mean() + compiled(b).float().mean()).backward()
    got = grads(model)
    (eager_masked(model, a).float().square().mean() + eager_masked(model, b).float().mean()).backward()
    want = grads(model)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=5e-2, atol=5e-3,
                                   msg=lambda m: f"{name}: {m}")
    assert all(int(s.counters[0]) > 0 for s in agpe_compile.layer_states(model).values())


def _closed_sparsifier_then_hand_edit(device, mode, inductor=True):
    """Note [A promise outlives its Sparsifier]: graphs compiled under the zero-weight promise
    (dense path by density: bucket 0.75 >= block 64's crossover) are handed W * M after
    Sparsifier.close(), so a mask edited by hand stays exact; the weights are not written."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = GPTBlock(512, 8).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparsifier = agpe_compile.Sparsifier(model, opt, agpe_compile.AGPEConfig(
        block_size=64, target_sparsity=0.25, policy="static", distribution="uniform"))
    # torch.compile refuses mode= together with options= (even empty): without Inductor the mode
    # travels inside agpe's options (Note [Compile modes] in backend.py)
    if inductor:
        compiled = torch.compile(model, backend="agpe", mode=mode)
    else:
        compiled = torch.compile(model, backend="agpe", options={"inductor": False, **({"mode": mode} if mode else {})})
    x = torch.randn(2, 128, 512, device=device, dtype=dtype)
    for _ in range(2):
        compiled(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        sparsifier.step()
    sparsifier.close()
    state = agpe_compile.layer_state(model.fc1)
    row, col = state.block_mask.nonzero()[0].tolist()
    with torch.no_grad():
        state.block_mask[row, col] = False  # by hand, after close: the block keeps its weight
    for _ in range(3):
        out = compiled(x)
        expected = eager_masked(model, x)
        tolerance = BF16 if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.float(), expected.float(), **tolerance)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert model.fc1.weight[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64].any()  # not written


def test_graphs_compiled_under_a_closed_sparsifier_stay_exact_under_cuda_graphs_bf16():
    # mode="reduce-overhead": parameters are static CUDA-graph inputs, and the wrapper hands
    # the graph a fresh W * M per call (the default mode is covered on the CPU,
    # tests/controller/test_zero_weights.py)
    _closed_sparsifier_then_hand_edit("cuda", "reduce-overhead")
