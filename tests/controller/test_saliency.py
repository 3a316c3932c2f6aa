"""Saliency EMAs from the backward's buffers; NaN/inf never reach scores or masks."""

import logging

import torch

from agpe_compile.controller import AGPEConfig, SaliencyEMA, Sparsifier
from agpe_compile.controller.saliency import next_ema

from .helpers import batches, make_run


def test_ema_golden_and_fresh_blocks():
    ema = SaliencyEMA(decay=0.5)
    ema.add_layer("fc", (1, 3))
    assert ema.update("fc", torch.tensor([[4.0, 2.0, 0.0]]), steps=2)       # first interval: mean
    assert ema.values["fc"].tolist() == [[2.0, 1.0, 0.0]]
    ema.mark_fresh("fc", torch.tensor([[False, False, True]]))               # block 2 regrown
    assert ema.update("fc", torch.tensor([[0.0, 4.0, 6.0]]), steps=2)
    # 0.5 * 2 + 0.5 * 0 = 1;  0.5 * 1 + 0.5 * 2 = 1.5;  fresh: 3
    assert ema.values["fc"].tolist() == [[1.0, 1.5, 3.0]]
    assert next_ema(torch.tensor([1.0]), torch.tensor([False]), torch.tensor([3.0]), 0.75).tolist() == [1.5]


def test_non_finite_interval_is_skipped_and_logged(caplog):
    ema = SaliencyEMA(decay=0.5)
    ema.add_layer("fc", (1, 2))
    ema.update("fc", torch.tensor([[2.0, 2.0]]), steps=1)
    with caplog.at_level(logging.WARNING):
        assert not ema.update("fc", torch.tensor([[float("inf"), 1.0]]), steps=1)
    assert ema.values["fc"].tolist() == [[2.0, 2.0]]
    assert "fc: saliency sum is not finite; interval skipped" in caplog.text


def test_nan_gradients_skip_scores_and_keep_masks_valid(caplog):
    """A batch with NaN inputs: the backward skips its scores (counters[1]), the controller
    logs it, EMAs stay finite and the update still produces exact, finite masks."""
    config = AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=4, end_step=40,
                        initial_density=0.5)
    model, opt, sp, cmodel, _ = make_run(config)
    with caplog.at_level(logging.WARNING):
        for i, (x, y) in enumerate(batches(8)):
            if i == 2:
                x = torch.full_like(x, float("nan"))
            loss = torch.nn.functional.cross_entropy(cmodel(x), y)
            loss.backward()
            if i != 2:  # a real loop would skip the step too (or a GradScaler would)
                opt.step()
            opt.zero_grad()
            sp.step(loss)
    assert "backward call(s) had non-finite scores; their scores were skipped" in caplog.text
    for name, state in sp.layers.items():
        assert int(state.counters[1]) == 1
        assert torch.isfinite(sp.saliency.values[name]).all()
    assert sp.global_density == 0.5  # exact budget after two updates (steps 4 and 8)
    assert sp.step_count == 8  # each step() call counts, the skipped optimizer step too


def test_non_finite_loss_is_not_feedback(caplog):
    config = AGPEConfig(policy="agpe", block_size=4, update_interval=2, end_step=100)
    _, opt, sp, _, _ = make_run(config)
    with caplog.at_level(logging.WARNING):
        opt.step()  # one training step = one optimizer step (no gradients here: nothing moves)
        sp.step(torch.tensor(float("nan")))
        opt.step()
        sp.step(torch.tensor(1.0))
    assert "training loss over the last interval is not finite" in caplog.text
    assert sp.schedule_state.smoothed_loss is None


def test_saliency_mode_mismatch_between_a_graph_compiled_before_the_sparsifier_and_config_raises():
    import pytest
    import torch.nn.functional as F

    import agpe_compile
    from .helpers import TinyMLP

    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False, "block_size": 4}))
    (x, y), = list(batches(1))
    F.cross_entropy(cmodel(x), y).backward()  # compiled before any Sparsifier: the default, "taylor"
    config = AGPEConfig(policy="agpe", target_sparsity=0.5, block_size=4, update_interval=2, end_step=20,
                        saliency="gradient")
    sp = Sparsifier(model, opt, config)
    assert {s.saliency_mode for s in sp.layers.values()} == {"taylor"}
    with pytest.raises(ValueError, match=r"compiled with saliency 'taylor' but AGPEConfig.saliency is 'gradient': "
                                         r"its graph was compiled before this Sparsifier"):
        for _ in range(config.update_interval):
            F.cross_entropy(cmodel(x), y).backward()
            opt.step()
            sp.step(torch.tensor(1.0))
