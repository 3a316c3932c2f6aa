"""Every use of a masked weight sees W * M (Note [Every use sees W * M] in
passes/decide_layers.py), and the coverage gaps around it: other spellings of x @ W^T,
fused-attention arguments that are not weights, ties across graph breaks, parametrized
and lazy layers, multi-head attention with kdim/vdim."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile.ops.reference import expand_block_mask

B = 8


class Uses(nn.Module):
    """One Linear whose weight is also used in the way ``mode`` names."""

    def __init__(self, mode):
        super().__init__()
        self.enc = nn.Linear(16, 32)
        self.mode = mode

    def forward(self, x):
        w = self.enc.weight
        h = torch.tanh(self.enc(x))
        if self.mode == "tied decoder h @ W":
            return h @ w
        if self.mode == "tied decoder F.linear(h, W.t())":
            return F.linear(h, w.t())
        if self.mode == "einsum + regulariser":
            return torch.einsum("bi,oi->bo", x, w) + (w ** 2).sum()
        if self.mode == "shared transpose":
            wt = w.t()
            return x @ wt + wt.sum()
        raise AssertionError(self.mode)


class Spelling(nn.Module):
    """x @ W^T written ``mode``'s way (the only use of the weight)."""

    def __init__(self, mode):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.mode = mode

    def forward(self, x):
        w, b = self.fc.weight, self.fc.bias
        return {
            "W.mT": lambda: x @ w.mT,
            "swapaxes": lambda: x @ w.swapaxes(0, 1),
            "T.contiguous()": lambda: x @ w.T.contiguous(),
            "F.linear keywords": lambda: F.linear(input=x, weight=w, bias=b),
            "addmm beta=1": lambda: torch.addmm(b, x, w.t(), beta=1),
            "addmm beta=0.5": lambda: torch.addmm(b, x, w.t(), beta=0.5),
            "addmm mat2= alpha=2": lambda: torch.addmm(b, x, mat2=w.t(), alpha=2),
            "addmm mat1= mat2=": lambda: torch.addmm(b, mat1=x, mat2=w.t()),
            "addmm input= mat1= mat2=": lambda: torch.addmm(input=b, mat1=x, mat2=w.t()),
            "Tensor.matmul": lambda: x.matmul(w.t()),
            "Tensor.mm": lambda: x.mm(w.T),
            "Tensor.addmm": lambda: b.addmm(x, w.t()),
            "Tensor.addmm alpha=2": lambda: b.addmm(x, w.t(), alpha=2),
            "einsum": lambda: torch.einsum("bi,oi->bo", x, w),
            "tensordot": lambda: torch.tensordot(x, w, dims=([1], [1])),
            "inner": lambda: torch.inner(x, w),
        }[self.mode]()


def _check_against_oracle(model, layer, x):
    torch._dynamo.reset()
    agpe_compile.prepare(model, {"block_size": B})
    state = agpe_compile.layer_state(layer)
    state.block_mask.copy_(torch.rand(state.grid, generator=torch.Generator().manual_seed(0)) < 0.5)
    state.sync_layout()
    x = x.clone().requires_grad_(True)
    out = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))(x)
    out.sum().backward()
    grad_w, grad_x = layer.weight.grad.clone(), x.grad.clone()
    layer.weight.grad = None
    x.grad = None
    live = expand_block_mask(state.block_mask, B, torch.bool)
    name = next(n for n, p in model.named_parameters() if p is layer.weight)
    expected = torch.func.functional_call(model, {name: layer.weight * live}, (x,))
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w, layer.weight.grad * live, rtol=1e-5, atol=1e-5)
    assert torch.all(grad_w[~live] == 0)
    return agpe_compile.explain(model, x.detach())


@pytest.mark.parametrize("mode", ["tied decoder h @ W", "tied decoder F.linear(h, W.t())", "einsum + regulariser",
                                  "shared transpose"])
def test_a_second_use_of_a_rewritten_weight_is_masked_too(mode):
    model = Uses(mode)
    report = _check_against_oracle(model, model.enc, torch.randn(4, 16))
    (enc,) = [r for r in report.layers if r.name == "enc"]
    assert enc.rewritten and enc.lowering == "masked_weight+sparse_linear"


@pytest.mark.parametrize("mode", ["W.mT", "swapaxes", "T.contiguous()", "F.linear keywords", "addmm beta=1",
                                  "addmm mat1= mat2=", "addmm input= mat1= mat2=", "Tensor.matmul", "Tensor.mm",
                                  "Tensor.addmm"])
def test_more_spellings_of_x_at_w_transposed_are_linear_sites(mode):
    model = Spelling(mode)
    report = _check_against_oracle(model, model.fc, torch.randn(4, 16))
    assert [(r.name, r.rewritten, r.lowering) for r in report.layers] == [("fc", True, "sparse_linear")]


@pytest.mark.parametrize("mode", ["einsum", "tensordot", "inner", "addmm beta=0.5", "Tensor.addmm alpha=2"])
def test_a_prepared_weight_used_in_an_unknown_form_is_masked(mode):
    model = Spelling(mode)
    report = _check_against_oracle(model, model.fc, torch.randn(4, 16))
    assert [(r.name, r.rewritten, r.lowering) for r in report.layers] == [("fc", True, "masked_weight")]


def test_an_unprepared_weight_in_an_unknown_form_is_left_alone():
    model = Spelling("einsum")
    x = torch.randn(4, 16)
    out = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))(x)
    torch.testing.assert_close(out, x @ model.fc.weight.t())
    # left dense, and listed with the reason (it was in no table before)
    assert [(r.name, r.rewritten, r.reason) for r in agpe_compile.explain(model, x).layers] == [
        ("fc", False, "used by torch.einsum (agpe rewrites nn.Linear, F.linear and x @ W.T as matmul, mm or addmm only)")]


@pytest.mark.parametrize("mode", ["addmm beta=0.5", "addmm mat2= alpha=2", "Tensor.addmm alpha=2", "bilinear"])
def test_other_contractions_of_unprepared_weights_are_listed(mode):
    # Audit AZ F4: torch.bilinear and an addmm with beta != 1 were in no table at all.
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Bilinear(16, 16, 32)

        def forward(self, x):
            return self.fc(x, x)

    model = Spelling(mode) if "addmm" in mode else Bilinear()
    if "addmm" in mode:  # an added 2-D parameter is no contraction weight (re-audit BA F4)
        model.fc.bias = nn.Parameter(torch.zeros(4, 32))
    x = torch.randn(4, 16)
    name = {"addmm beta=0.5": "torch.addmm with beta=0.5", "addmm mat2= alpha=2": "torch.addmm with alpha=2",
            "Tensor.addmm alpha=2": "Tensor.addmm with alpha=2", "bilinear": "torch.bilinear"}[mode]
    assert [(r.name, r.rewritten, r.reason) for r in agpe_compile.explain(model, x).layers] == [
        ("fc", False, f"used by {name} (agpe rewrites nn.Linear, F.linear and x @ W.T as matmul, mm or addmm only)")]


def test_metadata_reads_keep_the_raw_weight():
    class ShapeUse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 32)

        def forward(self, x):
            return self.fc(x) * self.fc.weight.shape[0]

    model = ShapeUse()
    report = _check_against_oracle(model, model.fc, torch.randn(4, 16))
    assert [r.lowering for r in report.layers] == ["sparse_linear"]


class Biased(nn.Module):
    """Multi-head attention with a learned 2-D additive bias passed as ``attn_mask``."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.rel_bias = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return self.mha(x, x, x, attn_mask=self.rel_bias, need_weights=False)[0]


def test_an_attention_mask_parameter_is_not_a_weight():
    torch._dynamo.reset()
    model = Biased()
    x = torch.randn(2, 8, 16)
    cmodel = torch.compile(model, backend="agpe", options={"inductor": False, "block_size": 8,
                                                           "target_sparsity": 0.5, "update_interval": 1})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.rel_bias.detach().clone()
    for _ in range(4):
        cmodel(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not hasattr(model.rel_bias, "_agpe_state")
    assert (model.rel_bias != 0).all() and not torch.equal(model.rel_bias, before)  # trained, never zeroed
    names = {r.name for r in agpe_compile.explain(model, x).layers}
    assert "rel_bias" not in names and {"mha.in_proj_weight", "mha.out_proj"} <= names


def test_multihead_attention_with_kdim_and_vdim_prepares_its_three_projections():
    model = nn.MultiheadAttention(16, 2, kdim=8, vdim=24, batch_first=True)
    prepared = agpe_compile.prepare(model, {"block_size": 8})
    assert sorted(prepared) == ["k_proj_weight", "out_proj", "q_proj_weight", "v_proj_weight"]
    torch._dynamo.reset()
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 24)
    state = prepared["k_proj_weight"]
    state.block_mask[0, 0] = False
    state.sync_layout()
    out = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))(q, k, v, need_weights=False)[0]
    live = expand_block_mask(state.block_mask, 8, torch.bool)
    with torch.no_grad():
        model.k_proj_weight.mul_(live)  # the oracle: the same module with W * M
    expected = model(q, k, v, need_weights=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class TiedAcrossBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(64, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        h = torch.relu(self.fc(self.wte(idx)))
        torch._dynamo.graph_break()
        return self.head(h)


@pytest.mark.parametrize("prepared", [False, True])
def test_a_head_tied_with_an_embedding_across_a_graph_break_stays_dense(prepared):
    torch._dynamo.reset()
    model = TiedAcrossBreak()
    if prepared:
        agpe_compile.prepare(model, {"block_size": 8})
    cmodel = torch.compile(model, backend="agpe", options={"inductor": False, "block_size": 8, "policy": "gmp",
                                                           "target_sparsity": 0.75, "update_interval": 1,
                                                           "end_step": 3})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    idx = torch.randint(0, 64, (4, 6))
    for _ in range(5):
        cmodel(idx).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not hasattr(model.wte.weight, "_agpe_state")
    assert torch.all(model.wte.weight.abs().sum(1) > 0), "no embedding row may be pruned"
    assert agpe_compile.layer_state(model.fc).density < 1.0  # the untied layer is pruned
    head = [r for r in agpe_compile.explain(model, idx).layers if r.shape == (64, 16)]
    assert head and not any(r.rewritten for r in head)
    assert all("tied" in r.reason for r in head)


def test_a_layer_parametrized_after_prepare_is_refused():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    agpe_compile.prepare(model, {"block_size": 8})
    nn.utils.parametrizations.orthogonal(model[0])
    with pytest.raises(Exception, match="prepared and then parametrized"):
        torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))(torch.randn(2, 16))


def test_a_layer_parametrized_before_prepare_stays_dense():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    nn.utils.parametrizations.orthogonal(model[0])
    assert sorted(agpe_compile.prepare(model, {"block_size": 8})) == ["2"]
    x = torch.randn(2, 16)
    out = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))(x)
    torch.testing.assert_close(out, model(x))
    computed = [r for r in agpe_compile.explain(model, x).layers if not r.rewritten]
    assert computed and computed[0].name == "0 (computed weight)" and computed[0].shape == (16, 16)


def test_lazy_layers_are_named_by_prepare_and_refused_by_the_sparsifier(caplog):
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 16))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        assert sorted(agpe_compile.prepare(model, {"block_size": 8})) == ["2"]
    assert "0 (parameter not materialized yet (lazy module)" in caplog.text
    with pytest.raises(ValueError, match="lazy module whose weight is not materialized"):
        agpe_compile.Sparsifier(model, torch.optim.SGD(model[2].parameters(), lr=0.1),
                                agpe_compile.AGPEConfig(target_sparsity=0.5, block_size=8))
    model(torch.randn(2, 24))  # materialised: now it prepares
    assert sorted(agpe_compile.prepare(model, {"block_size": 8})) == ["0", "2"]


def test_meta_device_models_are_refused_until_materialized():
    # it raised torch's "Tensor.item() cannot be called on meta tensors" from the layout builder
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    for make in (lambda: agpe_compile.prepare(model, {"block_size": 8}),
                 lambda: agpe_compile.Sparsifier(model, None, agpe_compile.AGPEConfig(block_size=8))):
        with pytest.raises(ValueError, match=r"weights of 0, 2 are on the meta device.*to_empty"):
            make()
        assert not agpe_compile.layer_states(model)
    assert sorted(agpe_compile.prepare(model, {"block_size": 8, "exclude": ["0", "2"]})) == []  # nothing to build
    model.to_empty(device="cpu")
    assert sorted(agpe_compile.prepare(model, {"block_size": 8})) == ["0", "2"]


def test_prepare_warns_about_layers_its_block_size_does_not_divide(caplog):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        agpe_compile.prepare(model, {"block_size": 8, "exclude": ["nothing"]})
    assert "2 (shape 10x16 not divisible by block size 8)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        agpe_compile.prepare(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 10)), {"block_size": 8, "exclude": ["1"]})
    assert "stay dense" not in caplog.text  # excluded on purpose: nothing to warn about


class Writes(nn.Module):
    """A forward that writes its weight in place through an alias, then uses it."""

    def __init__(self, mode):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.mode = mode

    def forward(self, x):
        w = self.fc.weight
        with torch.no_grad():
            if self.mode == "data":
                w.data.clamp_(-0.1, 0.1)
            elif self.mode == "detach":
                w.detach().clamp_(-0.1, 0.1)
            elif self.mode == "view":
                w.view(-1)[:8].zero_()
        return self.fc(x)


@pytest.mark.parametrize("mode", ["data", "detach", "view"])
def test_in_place_writes_through_an_alias_reach_the_parameter(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, twin = Writes(mode), Writes(mode)
    twin.load_state_dict(model.state_dict())
    agpe_compile.prepare(model, {"block_size": B})
    x = torch.randn(4, 16)
    out = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))(x)
    expected = twin(x)  # every block live: the eager module is the oracle
    torch.testing.assert_close(model.fc.weight, twin.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(out, expected)


def test_a_weight_read_by_an_in_place_op_on_another_tensor_is_masked():
    class Accumulates(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(16, 32)

        def forward(self, x):
            acc = torch.zeros(32, 16)
            acc.add_(self.enc.weight)
            return self.enc(x) + (acc ** 2).sum()

    model = Accumulates()
    report = _check_against_oracle(model, model.enc, torch.randn(4, 16))
    assert [r.lowering for r in report.layers] == ["masked_weight+sparse_linear"]


def test_unknown_forms_backward_under_inductor(monkeypatch):
    # masked_weight's gradient reaches it transposed through einsum: its fake kernel must
    # promise the strides the real op returns (Inductor checks them).
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    torch._dynamo.reset()
    model = Spelling("einsum")
    agpe_compile.prepare(model, {"block_size": B})
    state = agpe_compile.layer_state(model.fc)
    state.block_mask[0, 0] = False
    state.sync_layout()
    x = torch.randn(4, 16)
    torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": True}))(x).sum().backward()
    live = expand_block_mask(state.block_mask, B, torch.bool)
    assert torch.all(model.fc.weight.grad[~live] == 0) and torch.all(model.fc.weight.grad[live] != 0)


class HeadFirst(nn.Module):
    """A tied head that runs before the embedding lookup, across a graph break."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, h, idx):
        logits = self.head(h)
        torch._dynamo.graph_break()
        return logits.sum() + self.wte(idx).sum()


def test_a_tied_head_compiled_before_its_lookup_is_refused_unless_prepared():
    torch._dynamo.reset()
    h, idx = torch.randn(2, 16), torch.randint(0, 64, (2, 3))
    with pytest.raises(Exception, match="embedding table in this graph"):
        torch.compile(HeadFirst(), backend=agpe_compile.AgpeBackend({"inductor": False, "block_size": 8}))(h, idx)
    torch._dynamo.reset()
    model = HeadFirst()
    agpe_compile.prepare(model, {"block_size": 8})  # finds the tie: the head stays dense
    torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))(h, idx)
    assert not hasattr(model.wte.weight, "_agpe_state")


def test_a_weight_parametrized_after_the_sparsifier_is_refused_at_its_next_step():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(
        target_sparsity=0.5, block_size=8, policy="rigl", update_interval=2))
    nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(RuntimeError, match=r"layers \['0'\] no longer have the weight"):
        sparsifier.step()


def test_an_optimizer_wrapper_is_refused_with_the_way_out():
    class Wrapper:  # accelerate/Lightning style: holds the optimizer, is not one
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups

    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(TypeError, match="wrapper.optimizer"):
        agpe_compile.Sparsifier(model, Wrapper(torch.optim.SGD(model.parameters(), lr=0.1)),
                                agpe_compile.AGPEConfig(target_sparsity=0.5, block_size=8))


def test_an_optimizer_subclass_without_torch_hooks_is_refused_too():
    class Accelerated(torch.optim.Optimizer):  # subclasses Optimizer, never calls its __init__
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(TypeError, match="wrapper.optimizer"):
        agpe_compile.Sparsifier(model, Accelerated(torch.optim.SGD(model.parameters(), lr=0.1)),
                                agpe_compile.AGPEConfig(target_sparsity=0.5, block_size=8))


def test_a_parametrization_that_returns_its_input_leaves_the_layer_dense(caplog):
    # module.weight of a switched-off parametrization (forward returns X) IS the
    # parametrization's own parameter: prepare took it in as a layer, and then the compile said
    # "prepared and then parametrized" and Sparsifier.step "parametrized after the Sparsifier
    # was created", both false. Parametrized before: dense, as for any parametrization.
    class Off(nn.Module):
        def forward(self, X):
            return X

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    nn.utils.parametrize.register_parametrization(model[0], "weight", Off())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        sp = agpe_compile.Sparsifier(model, opt, agpe_compile.AGPEConfig(
            target_sparsity=0.5, block_size=8, update_interval=2, end_step=4))
    assert list(sp.layers) == ["2"]
    assert "0 (weight computed by a torch.nn.utils.parametrize parametrization)" in caplog.text
    cmodel = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
    x = torch.randn(4, 16)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agpe_compile"):
        for _ in range(4):
            loss = cmodel(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sp.step(loss)
    assert "does not drive" not in caplog.text  # the parametrization's input is not a stray layer
    assert bool((model[0].parametrizations.weight.original != 0).all())
    rows = {r.name: r for r in agpe_compile.explain(model, x).layers}
    assert not any(r.rewritten for n, r in rows.items() if n.startswith("0"))


def test_prepare_and_the_sparsifier_do_not_run_parametrizations():
    # Reading module.weight runs the parametrization: spectral_norm's power iteration advanced
    # six times at Sparsifier creation, on a layer it leaves dense, so a run with agpe was not
    # the dense run from the same seed.
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(16, 16)), nn.ReLU(),
                             nn.Linear(16, 16))

    model = make()
    u = model[0].parametrizations.weight[0]._u.clone()
    agpe_compile.prepare(model, {"block_size": 8})
    sp = agpe_compile.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), agpe_compile.AGPEConfig(
        target_sparsity=0.5, block_size=8, update_interval=2, end_step=4))
    assert list(sp.layers) == ["2"]
    assert torch.equal(model[0].parametrizations.weight[0]._u, u)


def test_a_parametrized_attention_projection_is_not_read_either():
    # MultiheadAttention's in_proj_weight was read (is it None?) before the parametrization
    # check: spectral_norm advanced 7 times at Sparsifier creation.
    torch.manual_seed(0)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 16)

        def forward(self, x):
            return self.head(self.mha(x, x, x)[0])

    model = Attention()
    nn.utils.parametrizations.spectral_norm(model.mha, "in_proj_weight")
    u = model.mha.parametrizations.in_proj_weight[0]._u.clone()
    sp = agpe_compile.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), agpe_compile.AGPEConfig(
        target_sparsity=0.5, block_size=8, update_interval=2, end_step=4))
    assert sorted(sp.layers) == ["head", "mha.out_proj"]
    assert torch.equal(model.mha.parametrizations.in_proj_weight[0]._u, u)
