"""agpe_compile.AveragedModel: torch's SWA / EMA average, following agpe's masks.

torch's own AveragedModel copies every buffer at each update and fails at the first
bucket crossing (a layout buffer changes length); ours copies the agpe state, averages
the rest exactly as torch does, and zeroes the averaged weights on inactive blocks.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel as TorchAveragedModel
from torch.optim.swa_utils import get_ema_avg_fn, get_ema_multi_avg_fn

import agpe_compile
from agpe_compile.controller import AGPEConfig
from agpe_compile.ops.reference import expand_block_mask

from .controller.helpers import TinyMLP, batches, make_run


def gmp_run():
    # gmp at block 4: density 1.0 -> 0.25 over 20 steps, crossing layout buckets on the way
    return make_run(AGPEConfig(block_size=4, target_sparsity=0.75, policy="gmp", update_interval=2, end_step=20),
                    optimizer="adamw")


def test_torchs_averaged_model_fails_at_a_bucket_crossing_and_ours_follows_the_masks():
    model, opt, sp, cmodel, _ = gmp_run()
    theirs = TorchAveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ours = agpe_compile.AveragedModel(cmodel, multi_avg_fn=get_ema_multi_avg_fn(0.9))  # the wrapper is fine
    evaluate = torch.compile(ours, backend=agpe_compile.AgpeBackend({"inductor": False}))
    probe, _ = next(batches(1, seed=5))
    crossed, failed = [], None
    for x, y in batches(24):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        crossed += sp.rebucketed
        ours.update_parameters(model)
        if failed is None:
            try:
                theirs.update_parameters(model)
            except RuntimeError as error:
                failed = str(error)
        with torch.no_grad():  # compiled once, recompiled at crossings: always equal to eager
            torch.testing.assert_close(evaluate(probe), ours(probe))
    assert crossed, "the schedule should cross a layout bucket"
    assert failed is not None and "must match the size" in failed  # torch's own: the reason this exists
    assert sp.global_density < 0.5
    averaged = agpe_compile.layer_states(ours.module)
    for name, state in agpe_compile.layer_states(model).items():
        mine = averaged[name]
        assert torch.equal(mine.block_mask, state.block_mask) and torch.equal(mine.block_layout, state.block_layout)
        assert mine.layout_bucket == state.layout_bucket
        inactive = ~expand_block_mask(state.block_mask, state.block_size, torch.bool)
        assert not mine.weight[inactive].any()  # folded: the average is zero where the model is
        assert mine.weight[~inactive].abs().sum() > 0


@pytest.mark.parametrize("kind", ["swa", "ema_multi", "ema_avg_fn", "buffers"])
def test_the_arithmetic_is_torchs(kind):
    # With the masks all live, the average equals torch's AveragedModel over a plain copy of
    # the same model fed the same weights, to the bit.
    torch.manual_seed(0)
    plain = TinyMLP()
    plain.register_buffer("running", torch.zeros(3))
    prepared = copy.deepcopy(plain)
    agpe_compile.prepare(prepared, options={"block_size": 4})
    options = {"swa": {}, "ema_multi": {"multi_avg_fn": get_ema_multi_avg_fn(0.8)},
               "ema_avg_fn": {"avg_fn": get_ema_avg_fn(0.8)}, "buffers": {"use_buffers": True}}[kind]
    theirs = TorchAveragedModel(plain, **options)
    ours = agpe_compile.AveragedModel(prepared, **options)
    for step in range(4):
        with torch.no_grad():
            for p, q in zip(plain.parameters(), prepared.parameters()):
                p.copy_(torch.randn_like(p))
                q.copy_(p)
            plain.running.fill_(float(step))
            prepared.running.fill_(float(step))
        theirs.update_parameters(plain)
        ours.update_parameters(prepared)
    for p, q in zip(theirs.module.parameters(), ours.module.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(theirs.module.running, ours.module.running)
    assert int(ours.n_averaged) == 4


def test_a_checkpoint_of_the_average_loads_into_a_fresh_one_at_another_bucket():
    model, opt, sp, cmodel, _ = gmp_run()
    ours = agpe_compile.AveragedModel(model)
    for x, y in batches(24):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        ours.update_parameters(model)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    fresh_model = TinyMLP()
    agpe_compile.prepare(fresh_model, options={"block_size": 4})
    fresh = agpe_compile.AveragedModel(fresh_model)
    fresh.load_state_dict(torch.load(buffer))
    x, _ = next(batches(1, seed=7))
    torch.testing.assert_close(fresh(x), ours(x))
    assert int(fresh.n_averaged) == 24


def test_clear_errors():
    with pytest.raises(ValueError, match="no agpe layers"):
        agpe_compile.AveragedModel(TinyMLP())
    prepared = TinyMLP()
    agpe_compile.prepare(prepared, options={"block_size": 4})
    average = agpe_compile.AveragedModel(prepared)
    other = nn.Sequential(nn.Linear(16, 32))
    agpe_compile.prepare(other, options={"block_size": 4})
    with pytest.raises(ValueError, match="differ from the average's"):
        average.update_parameters(other)


def test_an_excluded_layer_stays_dense_in_the_average_and_a_hand_edited_mask_is_followed():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = agpe_compile.Sparsifier(model, opt, AGPEConfig(block_size=4, target_sparsity=0.5, policy="rigl",
                                                         update_interval=2, end_step=20, exclude=("fc2",)))
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    ours = agpe_compile.AveragedModel(model)
    evaluate = torch.compile(ours, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x, _ = next(batches(1, seed=3))
    for step, (xb, yb) in enumerate(batches(6)):
        loss = F.cross_entropy(cmodel(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step(loss)
        ours.update_parameters(model)
        with torch.no_grad():
            torch.testing.assert_close(evaluate(x), ours(x))  # the copy's fc2 is not adopted as a layer
    assert sorted(agpe_compile.layer_states(ours.module)) == ["fc1", "fc3"]
    # a mask edited in place, then the average updated before the model's next call
    fc1 = sp.layers["fc1"]
    live = fc1.block_mask.nonzero()[0].tolist()
    dead = (~fc1.block_mask).nonzero()[0].tolist()
    fc1.block_mask[live[0], live[1]] = False
    fc1.block_mask[dead[0], dead[1]] = True
    ours.update_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(evaluate(x), ours(x))
    assert torch.equal(agpe_compile.layer_states(ours.module)["fc1"].block_layout, fc1.block_layout)


def test_zero_code_mode_on_an_unprepared_model_is_refused_with_the_way_out():
    torch._dynamo.reset()
    model = TinyMLP()
    torch.compile(model, backend="agpe", options={"target_sparsity": 0.5, "block_size": 4, "inductor": False})(
        torch.randn(2, 16))
    assert agpe_compile.layer_states(model)  # the backend gave the layers state, prepare did not
    with pytest.raises(ValueError, match="Call agpe_compile.prepare\\(model, options\\) before torch.compile"):
        agpe_compile.AveragedModel(model)
