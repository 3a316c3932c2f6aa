"""agpe_compile.GraphedStep: a whole training step as one CUDA graph (agpe_compile/graphs.py).

CPU (CI): the address signature that decides re-capture (in-place mask edits keep it, a
bucket crossing changes it) and the errors. GPU: graphed training with Sparsifier mask
updates and bucket crossings matches the same run without graphs step for step, with
exactly one capture per layout; uncapturable set-ups fail loudly.
"""

import pytest
import torch

import agpe_compile
from agpe_compile.graphs import GraphedStep, tensor_signature

from .models import MLP


def test_signature_keeps_in_place_mask_edits_and_sees_a_bucket_crossing():
    model = MLP((64, 128, 64))
    agpe_compile.prepare(model, options={"block_size": 32})
    before = tensor_signature(model)
    state = agpe_compile.layer_state(model.layers[0])
    state.block_mask[0, 0] = False  # in place, same bucket (7/8 live: bucket 1.0)
    state.sync_layout()
    assert tensor_signature(model) == before
    state.block_mask[:2] = False  # 4/8 live: bucket 0.5, a new layout buffer
    assert agpe_compile.rebucket(model) == [state.name]
    after = tensor_signature(model)
    moved = {name for (name, ptr), (_, old) in zip(after, before) if ptr != old}
    assert moved == {"layers.0.weight_block_layout"}


def test_signature_watches_gradients_and_optimizer_state():
    model = MLP((64, 128, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = tensor_signature(model, [optimizer])
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    after = tensor_signature(model, [optimizer])
    assert len(after) > len(before)  # momentum buffers appeared
    assert dict(after)["layers.0.weight.grad"] != 0


def test_graphed_step_needs_a_cuda_model():
    model = MLP((64, 128, 64))
    with pytest.raises(RuntimeError, match="CUDA graphs need a model on a CUDA device"):
        GraphedStep(lambda: None, model)()
    with pytest.raises(TypeError, match="expected a callable step_fn"):
        GraphedStep(None, model)


def _train(graphed: bool, steps: int = 24, block_sparse: bool = False):
    torch.manual_seed(0)
    model = MLP((256, 512, 512, 64)).cuda()
    kind = agpe_compile.BlockSparseAdamW if block_sparse else torch.optim.AdamW
    optimizer = kind(model.parameters(), lr=1e-3, fused=True, capturable=True)
    config = agpe_compile.AGPEConfig(target_sparsity=0.9, policy="gmp", block_size=32, update_interval=2,
                                     end_step=16)
    sparsifier = agpe_compile.Sparsifier(model, optimizer, config)
    backend = agpe_compile.AgpeBackend({"inductor": True})
    cmodel = torch.compile(model, backend=backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(64, 256, device="cuda", generator=g), torch.randn(64, 64, device="cuda", generator=g))
               for _ in range(steps)]
    x, y = torch.empty_like(batches[0][0]), torch.empty_like(batches[0][1])

    def step():
        loss = torch.nn.functional.mse_loss(cmodel(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def eager_step():
        loss = step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    run = GraphedStep(step, model, optimizer) if graphed else eager_step
    losses, layouts = [], set()
    for xb, yb in batches:
        x.copy_(xb)
        y.copy_(yb)
        loss = run()
        losses.append(loss.item())
        sparsifier.step(loss)
        layouts.add(tuple(s.layout_bucket for s in sparsifier.layers.values()))
    masks = {name: s.block_mask.clone() for name, s in sparsifier.layers.items()}
    return losses, masks, model, run, layouts, sparsifier


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_sparse", [False, True], ids=["adamw", "block-sparse-adamw"])
def test_graphed_training_matches_eager_across_mask_updates_and_crossings(block_sparse, caplog):
    import logging

    torch._dynamo.reset()
    eager_losses, eager_masks, eager_model, _, eager_layouts, _ = _train(graphed=False, block_sparse=block_sparse)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        losses, masks, model, graphed, layouts, sparsifier = _train(graphed=True, block_sparse=block_sparse)
    # Note [Optimizer steps a replay runs]: one optimizer step per call, captures and replays alike
    assert not [r for r in caplog.records if "optimizer steps" in r.getMessage()
                or "no optimizer.step() since" in r.getMessage()]
    assert sparsifier._own_optimizer_steps == len(losses)
    assert sparsifier.global_density < 0.2  # the schedule really pruned
    assert len(layouts) >= 3  # ... across several bucket crossings
    # One capture per distinct layout the step ran with (the last one's layout set is
    # recorded after the final step, which never ran with it if it changed there).
    assert graphed.captures <= len(layouts) and graphed.captures >= len(layouts) - 1
    assert graphed.replays == len(losses) - graphed.captures
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-6)
    for name in masks:
        assert torch.equal(masks[name], eager_masks[name]), name
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_block_sparse_adamw_refuses_capture_unless_capturable():
    model = MLP((256, 512, 64)).cuda()
    agpe_compile.prepare(model, options={"block_size": 32})
    cmodel = torch.compile(model, backend="agpe")
    x = torch.randn(32, 256, device="cuda")
    optimizer = agpe_compile.BlockSparseAdamW(model.parameters(), lr=1e-3)  # capturable=False

    def step():
        cmodel(x).square().mean().backward()
        optimizer.step()

    graphed = GraphedStep(step, model, optimizer)
    with pytest.raises(RuntimeError, match="BlockSparseAdamW cannot be captured in a CUDA graph without capturable"):
        graphed()
    assert graphed.graph is None and graphed.captures == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_zero_code_mode_refuses_capture():
    model = MLP((256, 512, 64)).cuda()
    agpe_compile.prepare(model, options={"block_size": 32})
    cmodel = torch.compile(model, backend="agpe",
                           options={"block_size": 32, "target_sparsity": 0.5, "update_interval": 2})
    x = torch.randn(32, 256, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)

    def step():
        cmodel(x).square().mean().backward()
        optimizer.step()

    with pytest.raises(RuntimeError, match="zero-code mode cannot run inside a CUDA graph capture"):
        GraphedStep(step, model, optimizer)()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_zero_code_mode_without_prepare_on_cuda():
    """Was a known bug (IndexError in produce_guards); see Note [Static extra inputs] in backend.py."""
    model = MLP((256, 512, 64)).cuda()
    cmodel = torch.compile(model, backend="agpe",
                           options={"block_size": 32, "target_sparsity": 0.5, "update_interval": 2})
    x = torch.randn(32, 256, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        cmodel(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
