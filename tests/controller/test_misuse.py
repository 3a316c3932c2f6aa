"""Misuse the Sparsifier should name: an update with no backward through the agpe layers."""

import logging

import torch

from agpe_compile.controller import AGPEConfig

from .helpers import batches, make_run, train


def test_an_update_without_any_backward_warns_once(caplog):
    # Training the module itself instead of the compiled model leaves the saliency at zero.
    model, opt, sp, cmodel, _ = make_run(AGPEConfig(policy="rigl", block_size=4, target_sparsity=0.5,
                                                    update_interval=2, end_step=100))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        for x, y in batches(6):
            torch.nn.functional.cross_entropy(model(x), y).backward()  # the uncompiled module
            opt.step()
            opt.zero_grad()
            sp.step()
    warnings = [r for r in caplog.records if "no backward pass reached the agpe layers" in r.getMessage()]
    assert len(warnings) == 1 and "step 2" in warnings[0].getMessage()


def test_no_warning_when_the_compiled_model_trains(caplog):
    _, opt, sp, cmodel, _ = make_run(AGPEConfig(policy="rigl", block_size=4, target_sparsity=0.5,
                                                update_interval=2, end_step=100))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        train(cmodel, opt, sp, batches(6))
        sp.state_dict()
        _ = sp.flops  # reading the FLOPs between intervals must not confuse the check
        train(cmodel, opt, sp, batches(4, seed=1))
    assert not [r for r in caplog.records if "no backward pass reached" in r.getMessage()]


def test_exclude_holds_for_layers_an_earlier_explain_or_compile_prepared():
    import agpe_compile
    from agpe_compile.controller import Sparsifier

    from .helpers import TinyMLP

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyMLP()
    agpe_compile.explain(model, torch.randn(2, 16), options={"block_size": 4, "inductor": False})
    assert agpe_compile.layer_states(model)  # the backend attached states to every layer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, AGPEConfig(block_size=4, exclude=("fc1",), target_sparsity=0.5, policy="static"))
    assert sorted(sp.layers) == ["fc2", "fc3"]
    assert agpe_compile.layer_state(model.fc1).block_mask.all() and bool((model.fc1.weight != 0).all())
    assert sorted(agpe_compile.prepare(model, {"block_size": 4, "exclude": ["fc1", "fc3"]})) == ["fc2"]
