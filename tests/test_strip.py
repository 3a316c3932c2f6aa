"""agpe_compile.strip: the trained sparse model handed back as a plain model (CPU, fp32)."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile.ops.reference import expand_block_mask
from agpe_compile.state import EXCLUDED_ATTR, STATE_ATTR, layer_states
from tests.models import MLP

BACKEND = {"inductor": False}


def _hooks(model):
    return [(len(m._forward_pre_hooks), len(m._load_state_dict_pre_hooks), len(m._load_state_dict_post_hooks))
            for m in model.modules()]


def _set_masks(model, seed=0):
    """Random masks with inactive blocks whose weights are NOT zero (no Sparsifier): the
    agpe model computes x·(W∘M)ᵀ, the unprepared one x·Wᵀ."""
    gen = torch.Generator().manual_seed(seed)
    for state in layer_states(model).values():
        state.block_mask.copy_(torch.rand(state.grid, generator=gen) < 0.5)
        state.block_mask[0, 0] = True


def test_strip_folds_masks_and_leaves_the_class_own_model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP((32, 64, 48, 16))
    fresh = copy.deepcopy(model)  # the same class, never prepared
    agpe_compile.prepare(model, {"block_size": 8})
    assert "layers.0.weight_saliency" in model._ddp_params_and_buffers_to_ignore  # Note [Data-parallel masks]
    _set_masks(model)
    masks = {name: s.block_mask.clone() for name, s in layer_states(model).items()}
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend(BACKEND))
    x = torch.randn(4, 32)
    expected = compiled(x).detach()
    assert not torch.allclose(model(x), expected)  # eager on the prepared model ignores the masks

    densities = agpe_compile.strip(model)

    assert densities == pytest.approx({name: float(m.float().mean()) for name, m in masks.items()})
    assert sorted(model.state_dict()) == sorted(fresh.state_dict())
    assert _hooks(model) == _hooks(fresh)
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    for module in model.modules():
        assert not [k for k in vars(module) if k.startswith("_agpe")], module
    for param in model.parameters():
        assert not hasattr(param, STATE_ATTR) and not hasattr(param, EXCLUDED_ATTR)
    for i, layer in enumerate(model.layers):
        inactive = ~expand_block_mask(masks[f"layers.{i}"], 8, torch.bool)
        assert torch.all(layer.weight[inactive] == 0)
        assert torch.all(layer.weight[~inactive] == fresh.layers[i].weight[~inactive])
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)
    assert b"agpe_compile" not in pickle.dumps(model)  # torch.save(model) needs no agpe to load
    # The graph compiled before no longer matches the model (its layout buffers are gone):
    # Dynamo recompiles, and the backend refuses the stripped weights instead of making
    # them new, unprepared layers.
    with pytest.raises(Exception, match="finished by agpe_compile.strip"):
        compiled(x)
    assert not layer_states(model)
    torch.testing.assert_close(torch.compile(model, backend="eager")(x), expected, rtol=1e-6, atol=1e-6)


def test_a_stripped_model_prepared_again_trains_sparse_again():
    torch._dynamo.reset()
    model = MLP((32, 64, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    _set_masks(model, seed=4)
    agpe_compile.strip(model)
    torch._dynamo.reset()
    states = agpe_compile.prepare(model, {"block_size": 8})
    assert sorted(states) == ["layers.0", "layers.1"] and all(s.density == 1.0 for s in states.values())
    states["layers.0"].block_mask[0, 0] = False
    x = torch.randn(4, 32)
    y = torch.compile(model, backend=agpe_compile.AgpeBackend(BACKEND))(x)
    y.sum().backward()
    assert int(states["layers.0"].counters[0]) == 4


def test_strip_is_idempotent_and_leaves_copies_alone():
    model = MLP((32, 64, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    _set_masks(model, seed=1)
    twin = copy.deepcopy(model)
    agpe_compile.strip(model)
    assert agpe_compile.strip(model) == {}
    assert sorted(layer_states(twin)) == ["layers.0", "layers.1"]
    assert "layers.0.weight_block_mask" in twin.state_dict()
    assert agpe_compile.strip(nn.Linear(4, 4)) == {}
    with pytest.raises(TypeError, match="nn.Module"):
        agpe_compile.strip(torch.zeros(3))


def test_strip_refuses_while_a_sparsifier_drives_the_layers():
    torch._dynamo.reset()
    model = MLP((32, 64, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(
        target_sparsity=0.5, block_size=8, update_interval=2, end_step=6))
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend(BACKEND))
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        F.mse_loss(compiled(torch.randn(8, 32, generator=gen)), torch.zeros(8, 16)).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"sparsifier.close\(\)"):
        agpe_compile.strip(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    densities = dict(sparsifier.densities())
    assert min(densities.values()) < 1.0
    twin = copy.deepcopy(model)  # driven by nothing; carries the Sparsifier's (inert) load hook
    assert agpe_compile.strip(twin) == pytest.approx(densities)
    assert b"agpe_compile" not in pickle.dumps(twin)
    sparsifier.close()
    assert agpe_compile.strip(model) == pytest.approx(densities)
    assert b"agpe_compile" not in pickle.dumps(model)


def test_strip_stops_zero_code_mode_and_its_graphs_raise_afterwards():
    # Zero-code mode ticks only inside compiled calls, so strip stops its controller itself:
    # Dynamo can keep the compiled function (and the controller) alive after reset(), e.g.
    # in a Hugging Face model's module globals, so "reset and drop the model" was no way out.
    torch._dynamo.reset()
    model = MLP((32, 64, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend(
        {**BACKEND, "block_size": 8, "target_sparsity": 0.5, "update_interval": 2, "end_step": 6}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 32)
    for _ in range(8):
        compiled(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    densities = agpe_compile.strip(model)
    assert set(densities) == {"layers.0", "layers.1"} and all(d < 1.0 for d in densities.values())
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # the global optimizer hook is gone: nothing ticks, nothing changes
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    with pytest.raises(Exception, match="finished by agpe_compile.strip"):
        compiled(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), model(x))


def test_a_graph_compiled_on_backend_made_states_raises_after_strip():
    # Compiled without prepare: the backend made the states (no module buffers, no hook for
    # Dynamo to guard on), so the old graph would be reused; it must not run on them.
    torch._dynamo.reset()
    model = MLP((32, 64, 16))
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({**BACKEND, "block_size": 8}))
    x = torch.randn(4, 32)
    compiled(x)
    agpe_compile.layer_state(model.layers[0]).block_mask[1, 2] = False
    expected = compiled(x).detach()
    assert set(agpe_compile.strip(model)) == {"layers.0", "layers.1"}
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="stripped"):
        compiled(x)


def test_strip_multihead_attention_projection_weights():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    fresh = copy.deepcopy(model)
    agpe_compile.prepare(model, {"block_size": 8})
    assert "self_attn.in_proj_weight" in layer_states(model)
    _set_masks(model, seed=2)
    x = torch.randn(2, 5, 32)
    expected = torch.compile(model, backend=agpe_compile.AgpeBackend(BACKEND))(x).detach()
    agpe_compile.strip(model)
    assert sorted(model.state_dict()) == sorted(fresh.state_dict())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_assigned_weights_keep_their_masks_and_strip_folds_into_them():
    # load_state_dict(assign=True) replaces the Parameters: the layers adopt the new ones, so
    # compiled calls keep masking and strip() zeroes the weights the model now has.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP((32, 64, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    _set_masks(model, seed=3)
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend(BACKEND))
    x = torch.randn(4, 32)
    expected = compiled(x).detach()
    old = model.layers[0].weight
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert model.layers[0].weight is not old
    assert sorted(layer_states(model)) == ["layers.0", "layers.1"]
    torch.testing.assert_close(compiled(x), expected, rtol=1e-6, atol=1e-6)
    agpe_compile.strip(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_a_state_dict_assigned_before_any_call_is_what_strip_folds():
    # load_state_dict(assign=True) replaces the buffers too: strip, with no compiled call in
    # between, folded the fresh model's all-live masks (density 1.0, output 1.57 off W*M)
    torch.manual_seed(0)
    trained = MLP((32, 64, 16))
    agpe_compile.prepare(trained, {"block_size": 8})
    _set_masks(trained, seed=3)
    x = torch.randn(4, 32)
    expected = torch.func.functional_call(trained, {
        f"{name}.weight": s.weight.detach() * expand_block_mask(s.block_mask, 8, torch.float32)
        for name, s in layer_states(trained).items()}, (x,))
    densities = {name: s.density for name, s in layer_states(trained).items()}
    model = MLP((32, 64, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    model.load_state_dict({k: v.clone() for k, v in trained.state_dict().items()}, assign=True)
    assert {name: s.density for name, s in layer_states(model).items()} == densities
    assert agpe_compile.strip(model) == pytest.approx(densities)
    torch.testing.assert_close(model(x), expected.detach(), rtol=1e-6, atol=1e-6)


def test_excluded_layers_stay_excluded_in_copies_and_assigned_loads():
    # the exclusion mark lived on the Parameter only: deepcopy and assign=True dropped it, and the
    # copy's compile rewrote the excluded layer as an agpe layer (a 10-wide head: warned it was
    # "not meant to be dense")
    for head in (16, 10):
        torch._dynamo.reset()
        model = MLP((32, 64, head))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sparsifier = agpe_compile.Sparsifier(model, opt, agpe_compile.AGPEConfig(block_size=8, exclude=("layers.1",)))
        sparsifier.close()
        twin = MLP((32, 64, head))
        agpe_compile.prepare(twin, {"block_size": 8, "exclude": ["layers.1"]})
        twin.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        for other in (copy.deepcopy(model), twin, pickle.loads(pickle.dumps(model))):
            assert hasattr(other.layers[1].weight, EXCLUDED_ATTR)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                torch.compile(other, backend=agpe_compile.AgpeBackend(BACKEND))(torch.randn(2, 32))
            assert sorted(layer_states(other)) == ["layers.0"]
            assert sorted(agpe_compile.strip(other)) == ["layers.0"]
            assert not hasattr(other.layers[1].weight, EXCLUDED_ATTR)
            assert "_agpe_exclusions" not in other.layers[1].__dict__


def test_strip_through_a_compiled_wrapper_removes_the_ddp_ignore_list():
    model = MLP((32, 64, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    assert set(agpe_compile.strip(torch.compile(model, backend="eager"))) == {"layers.0", "layers.1"}
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    assert not layer_states(model)


def _saved_run(tmp_path, model_fn, seed=0):
    """A prepared model with masks whose inactive weights are NOT zero, its state dict saved
    to disk and read back (as a user would have it), and the same model stripped live."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = model_fn()
    fresh = copy.deepcopy(model)
    agpe_compile.prepare(model, {"block_size": 8})
    _set_masks(model, seed=seed)
    path = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "step": 7}, path)
    agpe_compile.strip(model)
    return torch.load(path, weights_only=True), model, fresh


@pytest.mark.parametrize("model_fn", [lambda: MLP((32, 64, 48, 16)),
                                      lambda: nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True,
                                                                         dropout=0.0)],
                         ids=["mlp", "mha"])
def test_strip_state_dict_gives_what_strip_gives_without_the_model(tmp_path, model_fn):
    saved, stripped, fresh = _saved_run(tmp_path, model_fn)
    before = {key: value.clone() for key, value in saved["model"].items()}
    plain, densities = agpe_compile.strip_state_dict(saved["model"])
    assert list(plain) == list(stripped.state_dict()) == list(fresh.state_dict())
    for key, value in stripped.state_dict().items():
        assert torch.equal(plain[key], value), key
    assert set(densities) == {key[:-len("_block_mask")] for key in before if key.endswith("_block_mask")}
    for key, value in saved["model"].items():  # the input is left as it was
        assert torch.equal(value, before[key]), key
    fresh.load_state_dict(plain, strict=True)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(fresh(x), stripped(x), rtol=0, atol=0)


def test_strip_state_dict_names_layers_and_keeps_module_versions(tmp_path):
    saved, stripped, fresh = _saved_run(tmp_path, lambda: MLP((32, 64, 48, 16)))
    masks = {key[:-len("_block_mask")]: value for key, value in saved["model"].items() if key.endswith("_block_mask")}
    plain, densities = agpe_compile.strip_state_dict(saved["model"])
    assert densities == {key: pytest.approx(float(m.float().mean())) for key, m in masks.items()}
    assert sorted(densities) == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    assert plain._metadata == saved["model"]._metadata
    # an entry under a wrapper's prefix (DDP "module.", torch.compile "_orig_mod.") keeps it
    wrapped = {f"module.{key}": value for key, value in saved["model"].items()}
    plain_wrapped, _ = agpe_compile.strip_state_dict(wrapped)
    assert {f"module.{key}" for key in plain} == set(plain_wrapped)


def _agpe_entries(weight_key, mask):
    from agpe_compile.state import BUFFER_SUFFIXES

    entries = {f"{weight_key}_{suffix}": torch.zeros(1) for suffix in BUFFER_SUFFIXES}
    entries[f"{weight_key}_block_mask"] = mask
    return entries


def test_strip_state_dict_refuses_what_it_cannot_fold():
    weight, mask = torch.ones(16, 16), torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="no agpe layer in this state dict"):
        agpe_compile.strip_state_dict({"fc.weight": weight})
    with pytest.raises(TypeError, match="expected a state dict"):
        agpe_compile.strip_state_dict([weight])
    with pytest.raises(ValueError, match="has no weight 'fc.weight' beside it"):
        agpe_compile.strip_state_dict(_agpe_entries("fc.weight", mask))
    with pytest.raises(ValueError, match="does not tile"):
        agpe_compile.strip_state_dict({"fc.weight": torch.ones(16, 12), **_agpe_entries("fc.weight", mask)})
    with pytest.raises(ValueError, match="2-D bool"):
        agpe_compile.strip_state_dict({"fc.weight": weight, **_agpe_entries("fc.weight", mask.float())})
    overlapping = torch.ones(32, 16)
    with pytest.raises(ValueError, match="'fc.weight_half' shares memory with the agpe weight 'fc.weight'"):
        agpe_compile.strip_state_dict({"fc.weight": overlapping[:16], "fc.weight_half": overlapping[8:24],
                                       **_agpe_entries("fc.weight", torch.tensor([[True, False], [False, True]]))})


def test_strip_state_dict_folds_a_tied_weight_under_every_name_and_passes_the_models_own_masks(tmp_path):
    """Two Linears sharing one weight (one agpe layer, on the first): the live strip zeroes the one
    Parameter both names hold; so does the saved state dict's, under both names. A buffer of
    the model's own named ``*_block_mask`` is not an agpe layer."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
            self.b.weight = self.a.weight
            self.register_buffer("attn_block_mask", torch.tensor([[True, False]]))

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.attn_block_mask.sum()

    torch.manual_seed(0)
    model = Tied()
    fresh = copy.deepcopy(model)
    assert list(agpe_compile.prepare(model, {"block_size": 8})) == ["a"]  # one layer for the shared weight
    _set_masks(model)
    x = torch.randn(4, 32)
    expected = torch.compile(model, backend=agpe_compile.AgpeBackend(BACKEND))(x).detach()
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    saved = torch.load(tmp_path / "tied.pt", weights_only=True)
    assert saved["a.weight"].data_ptr() == saved["b.weight"].data_ptr()  # torch.load keeps the tie
    plain, densities = agpe_compile.strip_state_dict(saved)
    assert list(densities) == ["a.weight"] and plain["a.weight"] is plain["b.weight"]
    assert torch.equal(plain["attn_block_mask"], saved["attn_block_mask"])
    fresh.load_state_dict(plain, strict=True)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)
    agpe_compile.strip(model)
    for key, value in model.state_dict().items():
        assert torch.equal(plain[key], value), key


def test_strip_checkpoint_command_line(tmp_path, capsys):
    from agpe_compile import strip_checkpoint

    saved, stripped, fresh = _saved_run(tmp_path, lambda: MLP((32, 64, 48, 16)))
    out = tmp_path / "plain.pt"
    assert strip_checkpoint.main([str(tmp_path / "run.pt"), str(out), "--key", "model"]) == 0
    assert "folded 3 layer mask(s)" in capsys.readouterr().out
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for key, value in stripped.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(SystemExit):  # the whole checkpoint dict is not a state dict
        strip_checkpoint.main([str(tmp_path / "run.pt"), str(out)])
    assert "no agpe layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        strip_checkpoint.main([str(tmp_path / "run.pt"), str(out), "--key", "optimizer"])
    assert "has no entry 'optimizer'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        strip_checkpoint.main([str(tmp_path / "missing.pt"), str(out)])
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(SystemExit):
        strip_checkpoint.main([str(tmp_path / "notes.txt"), str(out)])
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        strip_checkpoint.main([str(tmp_path / "run.pt"), str(tmp_path / "no" / "such" / "dir" / "x.pt"), "--key", "model"])
    err = capsys.readouterr().err
    assert "cannot write" in err and "does not exist" in err and ".tmp" not in err  # names the folder, not a temp file
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        strip_checkpoint.main([str(tmp_path / "run.pt"), str(tmp_path / "a_file" / "x.pt"), "--key", "model"])
    assert "a_file is not a folder" in capsys.readouterr().err
    # a checkpoint that also holds other Python objects: refused by weights_only, read with --trusted
    torch.save({"model": saved["model"], "args": _Args(3)}, tmp_path / "with_args.pt")
    with pytest.raises(SystemExit):
        strip_checkpoint.main([str(tmp_path / "with_args.pt"), str(out), "--key", "model"])
    assert "pass --trusted" in capsys.readouterr().err
    assert strip_checkpoint.main([str(tmp_path / "with_args.pt"), str(out), "--key", "model", "--trusted"]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["layers.0.weight"], stripped.layers[0].weight)


def test_strip_checkpoint_refuses_to_write_over_its_input(tmp_path, capsys, monkeypatch):
    # `strip_checkpoint run.pt run.pt --key model` replaced the training checkpoint (masks, optimizer,
    # Sparsifier state) by the plain weights, with rc 0 and no message
    import os

    from agpe_compile import strip_checkpoint

    saved, _, _ = _saved_run(tmp_path, lambda: MLP((32, 64, 48, 16)))
    checkpoint = tmp_path / "run.pt"
    original = checkpoint.read_bytes()
    (tmp_path / "sub").mkdir()
    os.symlink(checkpoint, tmp_path / "link.pt")
    os.link(checkpoint, tmp_path / "hard.pt")
    monkeypatch.chdir(tmp_path)
    for given, output in [(str(checkpoint), str(checkpoint)),  # the same path
                          ("run.pt", str(checkpoint)), (str(checkpoint), "run.pt"),  # relative vs absolute
                          ("run.pt", "sub/../run.pt"),
                          (str(checkpoint), str(tmp_path / "link.pt")),  # a symlink to the input
                          (str(tmp_path / "link.pt"), "run.pt"),
                          ("run.pt", "hard.pt")]:  # a hard link: the same file under another name
        with pytest.raises(SystemExit) as exit_info:
            strip_checkpoint.main([given, output, "--key", "model"])
        assert exit_info.value.code == 2, (given, output)
        err = capsys.readouterr().err
        assert f"the output {output} is the input checkpoint {given}" in err, err
        assert "optimizer and Sparsifier state) needed to resume the run" in err, err
        assert checkpoint.read_bytes() == original, (given, output)
        assert os.path.islink(tmp_path / "link.pt")
    assert sorted(os.listdir(tmp_path)) == ["hard.pt", "link.pt", "run.pt", "sub"]  # no temporary file left
    assert list(torch.load(checkpoint, weights_only=True)) == ["model", "step"]
    assert strip_checkpoint.main(["run.pt", "sub/plain.pt", "--key", "model"]) == 0  # another file: written
    assert torch.load(tmp_path / "sub" / "plain.pt", weights_only=True).keys() == \
        agpe_compile.strip_state_dict(saved["model"])[0].keys()


def test_strip_checkpoint_leaves_an_existing_output_whole_when_the_write_fails(tmp_path, capsys, monkeypatch):
    import os

    from agpe_compile import strip_checkpoint

    _saved_run(tmp_path, lambda: MLP((32, 64, 48, 16)))
    out = tmp_path / "plain.pt"
    assert strip_checkpoint.main([str(tmp_path / "run.pt"), str(out), "--key", "model"]) == 0
    os.chmod(out, 0o640)
    before = out.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):  # a full disk: part of the file, then an error
        with open(f, "wb") as handle:
            handle.write(before[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(SystemExit) as exit_info:
        strip_checkpoint.main([str(tmp_path / "run.pt"), str(out), "--key", "model"])
    assert exit_info.value.code == 2
    assert f"cannot write {out}" in capsys.readouterr().err
    assert out.read_bytes() == before  # was the first 100 bytes: torch.save wrote into OUT itself
    assert sorted(os.listdir(tmp_path)) == ["plain.pt", "run.pt"]  # the temporary file is gone
    monkeypatch.setattr(torch, "save", real_save)
    # a written file keeps the mode of the one it replaces, and a symlink as OUT stays a link
    os.symlink(out, tmp_path / "out_link.pt")
    assert strip_checkpoint.main([str(tmp_path / "run.pt"), str(tmp_path / "out_link.pt"), "--key", "model"]) == 0
    assert os.path.islink(tmp_path / "out_link.pt") and os.stat(out).st_mode & 0o777 == 0o640
    assert out.read_bytes() != before[:100] and torch.load(out, weights_only=True)


class _Args:  # a non-tensor object a training script pickles beside its state dict
    def __init__(self, lr):
        self.lr = lr
