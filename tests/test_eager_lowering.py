"""The aot_eager lowering calls agpe's host ops in place (Note [Host ops in place])."""

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import agpe_compile
import agpe_compile.eager_lowering as eager_lowering
from agpe_compile.state import layer_states

from .models import MLP, aot_backend, set_random_masks

FUNCTIONAL = torch.ops.higher_order.auto_functionalized_v2
REWRITE = eager_lowering.call_host_ops_in_place


class TwiceMLP(nn.Module):
    """One layer called twice: its buffers are mutated by two backward calls."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return self.out(F.relu(self.shared(F.relu(self.shared(x)))))


class Attention(nn.Module):
    """nn.MultiheadAttention: its projection weights go through agpe::masked_weight."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        x = x.reshape(2, 3, 16)
        return self.out(self.mha(x, x, x, need_weights=False)[0]).reshape(6, 16)


def _train(make_model, in_place: bool, monkeypatch, steps: int = 3, density: float = 0.5):
    """Grads, buffers and outputs of a few compiled steps, and the graphs aot_eager ran."""
    graphs = []

    def record(gm):
        rewritten = REWRITE(gm) if in_place else 0
        graphs.append(gm.graph)
        return rewritten

    monkeypatch.setattr(eager_lowering, "call_host_ops_in_place", record)
    torch.manual_seed(0)
    model = make_model()
    agpe_compile.prepare(model, options={"block_size": 4})
    set_random_masks(model, density)
    compiled = torch.compile(model, backend=aot_backend())
    outputs, grads = [], []
    for step in range(steps):
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(step))
        loss = compiled(x).square().mean()
        loss.backward()
        outputs.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    buffers = {f"{name}.{b}": getattr(s, b).clone() for name, s in layer_states(model).items()
               for b in ("saliency", "dense_grad_sq", "counters")}
    return outputs, grads, buffers, graphs


def _calls(graph):
    return [n for n in graph.nodes if n.op == "call_function"]


def test_the_backward_calls_the_op_in_place_and_matches_the_functional_form(monkeypatch):
    functional = _train(lambda: MLP((16, 16, 16, 8)), False, monkeypatch)
    in_place = _train(lambda: MLP((16, 16, 16, 8)), True, monkeypatch)
    for old, new in zip(functional[:3], in_place[:3]):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert any(n.target is FUNCTIONAL for g in functional[3] for n in _calls(g))
    for graph in in_place[3]:
        calls = _calls(graph)
        assert not [n for n in calls if n.target is FUNCTIONAL]
        assert not [n for n in calls if n.target is torch.ops.aten.copy_.default]
        assert not [n for n in calls if n.target is torch.ops.agpe.sparse_linear_host.default]
    backward = [n for g in in_place[3] for n in _calls(g) if n.target is eager_lowering._backward_in_place]
    assert len(backward) == 3  # one per layer
    assert all(counters[0] > 0 for name, counters in in_place[2].items() if name.endswith("counters"))


def test_a_layer_called_twice_keeps_the_functional_form_and_the_same_values(monkeypatch):
    functional = _train(TwiceMLP, False, monkeypatch)
    in_place = _train(TwiceMLP, True, monkeypatch)
    for old, new in zip(functional[:3], in_place[:3]):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    backward = in_place[3][-1]
    kept = [n for n in _calls(backward) if n.target is FUNCTIONAL]
    moved = [n for n in _calls(backward) if n.target is eager_lowering._backward_in_place]
    assert len(kept) == 2 and len(moved) == 1  # the shared layer's two calls chain their buffers


def test_masked_weight_layers_run_in_place_too(monkeypatch):
    functional = _train(Attention, False, monkeypatch)
    in_place = _train(Attention, True, monkeypatch)
    for old, new in zip(functional[:3], in_place[:3]):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert any(n.target is FUNCTIONAL for g in functional[3] for n in _calls(g))
    calls = [n for g in in_place[3] for n in _calls(g)]
    assert not [n for n in calls if n.target is FUNCTIONAL or n.target is torch.ops.aten.copy_.default]
    assert len([n for n in calls if n.target is eager_lowering._masked_weight_backward_in_place]) == 2
    assert any(s.abs().sum() > 0 for name, s in in_place[2].items() if name.startswith("mha") and name.endswith("saliency"))


def test_fake_tensors_go_through_the_op():
    """Off real CPU tensors (DDPOptimizer propagates shapes through the graph's pieces on
    fake tensors) the rewritten calls dispatch the op, whose fake implementation runs."""
    torch.manual_seed(0)
    model = MLP((16, 16, 8))
    states = agpe_compile.prepare(model, options={"block_size": 4})
    state = states["layers.0"]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x, grad_out = mode.from_tensor(torch.randn(4, 16)), mode.from_tensor(torch.randn(4, 16))
        fake = {name: mode.from_tensor(t) for name, t in zip(
            ("weight", "bias", "block_mask", "saliency", "dense_grad_sq", "score_dense", "counters", "block_layout"),
            (state.weight.detach(), model.layers[0].bias.detach(), *state.tensors()))}
        y = eager_lowering._forward_direct(x, *fake.values(), 4, "taylor")
        out = eager_lowering._backward_in_place(
            grad_out=grad_out, x=x, weight=fake["weight"], block_mask=fake["block_mask"],
            score_dense=fake["score_dense"], block_layout=fake["block_layout"], block_size=4,
            saliency_mode="taylor", need_input_grad=True, need_weight_grad=True, zero_inactive=False,
            _saliency_base_index=0, _dense_grad_sq_base_index=1, _counters_base_index=2,
            _all_bases=[fake["saliency"], fake["dense_grad_sq"], fake["counters"]])
    assert isinstance(y, FakeTensor) and y.shape == (4, 16)
    assert all(isinstance(t, FakeTensor) for t in out) and out[1].shape == (16, 16)
    assert out[2] is fake["saliency"] and out[4] is fake["counters"]


def test_a_mutated_view_keeps_the_functional_form():
    """auto_functionalized_v2 describes a mutated view of a base by its size, stride and
    offset; the in-place call takes whole bases only, so such a node is left as it is."""
    graph = fx.Graph()
    names = ("grad_out", "x", "weight", "block_mask", "saliency", "dense_grad_sq", "score_dense", "counters", "layout")
    p = {name: graph.placeholder(name) for name in names}
    kwargs = dict(grad_out=p["grad_out"], x=p["x"], weight=p["weight"], block_mask=p["block_mask"],
                  score_dense=p["score_dense"], block_layout=p["layout"], block_size=4, saliency_mode="taylor",
                  need_input_grad=True, need_weight_grad=True, zero_inactive=False,
                  _saliency_base_index=0, _saliency_size=(2, 2), _saliency_stride=(2, 1), _saliency_storage_offset=0,
                  _dense_grad_sq_base_index=1, _counters_base_index=2,
                  _all_bases=[p["saliency"], p["dense_grad_sq"], p["counters"]])
    node = graph.call_function(FUNCTIONAL, (torch.ops.agpe.sparse_linear_backward_host.default,), kwargs)
    outs = [graph.call_function(operator.getitem, (node, i)) for i in range(5)]
    for base, value in zip(("saliency", "dense_grad_sq", "counters"), outs[2:]):
        graph.call_function(torch.ops.aten.copy_.default, (p[base], value))
    graph.output((outs[0], outs[1]))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert eager_lowering.call_host_ops_in_place(gm) == 0
    assert node.target is FUNCTIONAL
    del kwargs["_saliency_size"], kwargs["_saliency_stride"], kwargs["_saliency_storage_offset"]
    node.kwargs = kwargs
    assert eager_lowering.call_host_ops_in_place(gm) == 1  # the same node over whole bases is rewritten
    assert node.target is eager_lowering._backward_in_place
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]


class ReadsItsScores(nn.Module):
    """A forward that differentiates through a view of a layer's saliency buffer (helper audit CF)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(16))
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        scores = self.fc1.weight_saliency.reshape(16)
        x = x * self.p
        return self.fc2(F.relu(self.fc1(x * scores + x)))


def test_a_graph_that_reads_a_score_buffer_keeps_the_functional_form(monkeypatch):
    """Its mul's backward reads the saliency after fc1's backward op: in place it would see
    this call's scores (p.grad differed in the 7th digit)."""
    functional = _train(ReadsItsScores, False, monkeypatch)
    in_place = _train(ReadsItsScores, True, monkeypatch)
    for old, new in zip(functional[:3], in_place[:3]):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert in_place[3] == []  # the pass never ran on this graph


def test_a_copy_back_whose_result_is_used_keeps_the_functional_form():
    graph = fx.Graph()
    names = ("grad_out", "weight", "block_mask", "saliency", "dense_grad_sq", "score_dense", "counters")
    p = {name: graph.placeholder(name) for name in names}
    node = graph.call_function(FUNCTIONAL, (torch.ops.agpe.masked_weight_backward.default,), dict(
        grad=p["grad_out"], weight=p["weight"], block_mask=p["block_mask"], score_dense=p["score_dense"],
        block_size=4, saliency_mode="taylor", _saliency_base_index=0, _dense_grad_sq_base_index=1,
        _counters_base_index=2, _all_bases=[p["saliency"], p["dense_grad_sq"], p["counters"]]))
    outs = [graph.call_function(operator.getitem, (node, i)) for i in range(4)]
    copies = [graph.call_function(torch.ops.aten.copy_.default, (p[base], value))
              for base, value in zip(("saliency", "dense_grad_sq", "counters"), outs[1:])]
    graph.output((outs[0], copies[0]))  # the copy's result is read
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert eager_lowering.call_host_ops_in_place(gm) == 0
    assert node.target is FUNCTIONAL


class ScaledByAnArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(16))
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x, scale):
        x = x * self.p
        return self.fc2(F.relu(self.fc1(x * scale.reshape(16) + x)))  # mul's backward reads `scale` after fc1's op


def test_an_argument_that_is_a_score_buffer_at_run_time_is_read_as_of_the_forward(monkeypatch):
    """Compiled with an ordinary argument, later called with fc1's saliency in it (no
    recompile): the wrapper hands the graph a copy (re-audit CG)."""
    results = []
    for in_place in ("0", "1"):
        monkeypatch.setenv("AGPE_EAGER_IN_PLACE", in_place)
        torch.manual_seed(0)
        model = ScaledByAnArgument()
        agpe_compile.prepare(model, options={"block_size": 4})
        compiled = torch.compile(model, backend=aot_backend())
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
        compiled(x, torch.ones(4, 4)).square().mean().backward()
        model.zero_grad()
        compiled(x, model.fc1.weight_saliency).square().mean().backward()
        results.append((model.p.grad.clone(), layer_states(model)["fc1"].saliency.clone()))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_an_argument_whose_memory_cannot_be_read_compiles():
    """A wrapper subclass or a nested tensor has no storage of its own (re-audit CG: the
    guard raised 'Attempted to access the data pointer on an invalid python storage')."""
    from torch.testing._internal.two_tensor import TwoTensor

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, x, t):
            return self.fc(x) + (t * 2).sum()

    torch.manual_seed(0)
    model = Model()
    agpe_compile.prepare(model, options={"block_size": 4})
    compiled = torch.compile(model, backend=aot_backend())
    compiled(torch.randn(6, 16), TwoTensor(torch.randn(3), torch.randn(3))).square().mean().backward()
    assert model.fc.weight.grad is not None
