"""Hugging Face GPT-2's Conv1D layers as nn.Linear for agpe, and back after strip()."""

import pytest
import torch
import torch.nn.functional as F

import agpe_compile
from agpe_compile.controller import AGPEConfig

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, n_positions=32, vocab_size=96,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_trains_sparse_after_conversion_and_converts_back_to_its_own_keys():
    model = tiny_gpt2()
    reference = tiny_gpt2()
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    before = model(tokens).logits
    converted = agpe_compile.linear_from_conv1d(model)
    assert converted == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    torch.testing.assert_close(model(tokens).logits, before)  # the same function

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparsifier = agpe_compile.Sparsifier(model, optimizer, AGPEConfig(
        target_sparsity=0.5, block_size=16, policy="gmp", update_interval=2, end_step=8))
    assert sorted(sparsifier.layers) == sorted(converted)  # the tied lm_head stays dense
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    for _ in range(10):
        out = compiled(tokens, labels=tokens)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step(out.loss)
    assert sparsifier.global_density == pytest.approx(0.5, abs=0.05)
    model.eval()
    with torch.no_grad():
        trained = compiled(tokens).logits
    sparsifier.close()
    agpe_compile.strip(model)
    assert agpe_compile.conv1d_from_linear(model) == converted
    torch.testing.assert_close(model(tokens).logits, trained, rtol=1e-4, atol=1e-4)
    reference.load_state_dict(model.state_dict())  # strict: the original keys and shapes
    torch.testing.assert_close(reference(tokens).logits, model(tokens).logits)
    c_fc = model.transformer.h[0].mlp.c_fc
    blocks = c_fc.weight.t().reshape(256 // 16, 16, 64 // 16, 16).abs().sum((1, 3))  # [out, in] blocks
    assert type(c_fc).__name__ == "Conv1D" and 0.2 < float((blocks == 0).float().mean()) < 0.8  # pruned, folded


def test_refusals_change_nothing():
    model = tiny_gpt2()
    agpe_compile.linear_from_conv1d(model)
    agpe_compile.prepare(model, options={"block_size": 16})
    with pytest.raises(RuntimeError, match="still has agpe state; call agpe_compile.strip"):
        agpe_compile.conv1d_from_linear(model)
    assert isinstance(model.transformer.h[0].mlp.c_fc, torch.nn.Linear)

    late = tiny_gpt2()  # a Sparsifier on the unconverted model says what to do
    with pytest.warns(UserWarning, match="call agpe_compile.linear_from_conv1d\\(model\\) before"):
        agpe_compile.Sparsifier(late, None, AGPEConfig(block_size=16))

    prepared = tiny_gpt2()  # prepared (here: an extra linear) before converting: refused, nothing changed
    prepared.transformer.h[0].mlp.add_module("side", torch.nn.Linear(64, 64))
    agpe_compile.prepare(prepared, options={"block_size": 16})
    with pytest.raises(RuntimeError, match="already prepared .*convert first"):
        agpe_compile.linear_from_conv1d(prepared)
    assert type(prepared.transformer.h[0].attn.c_attn).__name__ == "Conv1D"

    tied = tiny_gpt2()
    tied.transformer.h[0].mlp.c_proj.weight = tied.transformer.h[0].attn.c_proj.weight
    with pytest.raises(RuntimeError, match="is shared with"):
        agpe_compile.linear_from_conv1d(tied)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        agpe_compile.linear_from_conv1d("gpt2")
