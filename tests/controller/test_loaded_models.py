"""Models that arrive trained: a pruned checkpoint loaded without its agpe buffers
(Hugging Face ``from_pretrained``, a stripped model), pretrained dense weights under a
policy that starts sparse, and a module replaced after the Sparsifier was made."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.ops.reference import expand_block_mask

from .helpers import TinyMLP, batches, make_run, train

LOGGER = "agpe_compile.controller.sparsifier"


def _pruned_plain_state_dict():
    """The state dict of a TinyMLP trained sparse with rigl and stripped: agpe's keys gone,
    the pruned blocks exact zeros (what save_pretrained of a stripped model holds)."""
    config = AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=4, update_interval=2, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(10))
    masks = {n: s.block_mask.clone() for n, s in sp.layers.items()}
    sp.close()
    agpe_compile.strip(model)
    return {k: v.clone() for k, v in model.state_dict().items()}, masks


@pytest.mark.parametrize("policy", ["rigl", "set", "static", "snfs", "agpe", "gmp"])
def test_a_pruned_checkpoint_without_agpe_buffers_starts_from_its_zero_blocks(policy, caplog):
    plain, masks = _pruned_plain_state_dict()
    torch.manual_seed(1)
    model = TinyMLP()
    model.load_state_dict(plain)
    caplog.clear()  # the run that made the checkpoint drew its layout
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        AGPEConfig(policy=policy, target_sparsity=0.75, block_size=4, update_interval=2, end_step=40))
    assert "weight blocks that are all exactly zero" in caplog.text
    assert "random initial layout" not in caplog.text
    for name, state in sp.layers.items():
        weight = plain[f"{name}.weight"]
        nonzero = (weight != 0).view(state.grid[0], 4, state.grid[1], 4).any(3).any(1)
        # every pruned block starts inactive; so does a live one that is all zero (regrown at the last
        # update: it restarts from zero weight), which no checkpoint without masks can tell apart
        assert torch.equal(state.block_mask, nonzero)
        assert not bool((state.block_mask & ~masks[name]).any())
        assert torch.equal(state.weight.detach(), weight)  # nothing drawn, nothing rescaled


def test_a_fresh_model_with_a_layer_initialized_to_zeros_draws_its_layout(caplog):
    torch.manual_seed(0)
    model = TinyMLP()
    with torch.no_grad():
        model.fc2.weight.zero_()  # zero-init projection / LoRA B: every block zero, nothing to infer
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=4))
    assert "all exactly zero" not in caplog.text
    assert "random initial layout was drawn" in caplog.text
    assert all(not bool(s.block_mask.all()) for s in sp.layers.values())


@pytest.mark.parametrize("policy", ["static", "rigl", "agpe"])
def test_a_fresh_model_with_an_identity_initialized_layer_is_not_read_as_pruned(policy, caplog):
    torch.manual_seed(0)
    model = TinyMLP()
    nn.init.eye_(model.fc2.weight)  # off-diagonal blocks all zero; fc1 and fc3 have none
    before = model.fc2.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        AGPEConfig(policy=policy, target_sparsity=0.75, block_size=4))
    assert "all exactly zero" not in caplog.text
    if policy == "agpe":  # starts dense
        assert all(bool(s.block_mask.all()) for s in sp.layers.values())
        assert torch.equal(model.fc2.weight.detach(), before)
    else:  # the config's layout, as for any fresh model
        total = sum(s.block_mask.numel() for s in sp.layers.values())
        assert sum(int(s.block_mask.sum()) for s in sp.layers.values()) == round(0.25 * total)


def test_policy_dense_keeps_every_block_of_a_pruned_checkpoint_live():
    plain, _ = _pruned_plain_state_dict()
    model = TinyMLP()
    model.load_state_dict(plain)
    sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), AGPEConfig(policy="dense", block_size=4))
    assert all(bool(s.block_mask.all()) for s in sp.layers.values())


def test_resuming_rigl_from_a_checkpoint_loaded_without_its_buffers_is_exact():
    config = AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=4, update_interval=2, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(6))
    plain = {k: v.clone() for k, v in model.state_dict().items() if "_agpe" not in k and "weight_" not in k}
    saved = sp.state_dict()
    torch.manual_seed(5)
    resumed = TinyMLP()
    resumed.load_state_dict(plain, strict=False)  # like from_pretrained: agpe keys are not in the class
    sp2 = Sparsifier(resumed, torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9), config)
    sp2.load_state_dict(saved)
    for name in sp.layers:
        assert torch.equal(sp2.layers[name].weight.detach(), sp.layers[name].weight.detach())  # was rescaled
        assert torch.equal(sp2.layers[name].block_mask, sp.layers[name].block_mask)


def test_a_sparse_start_says_it_rescales_the_surviving_weights(caplog):
    torch.manual_seed(0)
    model = TinyMLP()
    before = model.fc2.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        AGPEConfig(policy="set", target_sparsity=0.75, block_size=4))
    assert "scaled by 1/sqrt(its density)" in caplog.text and "rescale_init=False" in caplog.text
    live = expand_block_mask(sp.layers["fc2"].block_mask, 4, torch.bool)
    ratio = model.fc2.weight.detach()[live] / before[live]
    assert torch.allclose(ratio, torch.full_like(ratio, (1 / sp.layers["fc2"].density) ** 0.5))
    caplog.clear()
    torch.manual_seed(0)
    model = TinyMLP()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                   AGPEConfig(policy="set", target_sparsity=0.75, block_size=4, rescale_init=False))
    assert "scaled by" not in caplog.text


@pytest.mark.parametrize("policy", ["set", "agpe"])
def test_the_sparse_start_names_the_dense_start_the_policy_has(policy, caplog):
    # AGPE started sparse by initial_density was told to "use policy 'agpe' ..., which start dense"
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        Sparsifier(TinyMLP(), None, AGPEConfig(policy=policy, target_sparsity=0.75, block_size=4,
                                               initial_density=0.5))
    if policy == "agpe":
        assert "leave initial_density unset (policy 'agpe' then starts dense" in caplog.text
        assert "use policy 'agpe'" not in caplog.text
    else:
        assert "use policy 'agpe' or 'gmp', which start dense and prune by score" in caplog.text


def test_a_module_replaced_after_the_sparsifier_is_refused_at_the_next_update():
    config = AGPEConfig(policy="rigl", target_sparsity=0.5, block_size=4, update_interval=2, end_step=40)
    model, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(1))
    model.fc3 = nn.Linear(32, 8)  # e.g. resize_token_embeddings making a new head
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    with pytest.raises(RuntimeError, match=r"layers \['fc3'\] are no longer part of the model"):
        train(cmodel, opt, sp, batches(1))  # the old head's mask drove nothing: warned as "unused" before


def test_read_zero_blocks_false_draws_a_layout_over_identity_initialized_layers(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    for layer in (model[0], model[2]):
        nn.init.eye_(layer.weight)  # every layer structured: reads as a pruned model
    config = AGPEConfig(policy="rigl", target_sparsity=0.75, block_size=8)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    assert "pass read_zero_blocks=False" in caplog.text
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    for layer in (model[0], model[2]):
        nn.init.eye_(layer.weight)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sp = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), config, read_zero_blocks=False)
    assert "all exactly zero" not in caplog.text and "random initial layout was drawn" in caplog.text
    assert sum(int(s.block_mask.sum()) for s in sp.layers.values()) == 8  # 25% of 2 x 16 blocks
