"""The FX passes on their own: match, non-match (unchanged), idempotence, reasons."""

import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile.config import BackendConfig
from agpe_compile.passes.decide_layers import decide_layers, source_path
from agpe_compile.passes.match_linears import find_linear_sites
from agpe_compile.passes.rewrite_linears import rewrite_linears

from .models import MLP, TiedLM


def passes_on(model, *inputs, then=None, **options):
    """Run the passes on Dynamo's graph inside a backend (Dynamo's placeholder metadata is
    only complete while the backend runs). Returns (gm, code before, decisions, result, then())."""
    captured = []
    config = BackendConfig.from_options({"block_size": 16, **options})

    def capture(gm, example_inputs):
        before = gm.code
        sites, unmatched = find_linear_sites(gm.graph)
        decisions = decide_layers(gm.graph, example_inputs, sites, unmatched, config)
        result = rewrite_linears(gm, decisions, config.saliency)
        extra = then(gm) if then is not None else None
        captured.append((gm, before, decisions, result, extra))
        return gm.forward

    torch.compile(model, backend=capture)(*inputs)
    assert len(captured) == 1
    return captured[0]


def test_match_rewrites_every_linear_and_leaves_dynamo_graph_alone():
    gm, before, decisions, result, _ = passes_on(MLP((32, 32, 16)), torch.randn(4, 32))
    assert result.changed
    assert [d.name for d in decisions] == ["layers.0", "layers.1"]
    targets = [n.target for n in result.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.agpe.sparse_linear.default) == 2
    assert torch._C._nn.linear not in targets
    assert len([n for n in result.gm.graph.nodes if n.op == "placeholder"]) == 5 + 2 * 6
    assert gm.code == before, "Dynamo's own GraphModule must not be mutated"


def test_non_match_leaves_graph_unchanged():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(32))

        def forward(self, x):
            return F.gelu(x * self.scale).sum(-1)

    gm, before, decisions, result, _ = passes_on(NoLinear(), torch.randn(4, 32))
    assert decisions == [] and not result.changed
    assert result.gm.code == before


def test_second_run_changes_nothing():
    _, _, _, first, _ = passes_on(MLP((32, 32, 16)), torch.randn(4, 32))
    sites, unmatched = find_linear_sites(first.gm.graph)
    assert sites == [] and unmatched == []


def test_reasons_for_layers_that_stay_dense():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.ok = nn.Linear(32, 32)
            self.odd = nn.Linear(32, 24)
            self.head = nn.Linear(24, 16)
            self.register_buffer("frozen", torch.randn(32, 32))
            self.left = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            h = F.linear(self.ok(x), self.frozen)
            h = h @ self.left
            return self.head(self.odd(h))

    _, _, decisions, _, _ = passes_on(Mixed(), torch.randn(4, 32), exclude=["head"])
    reasons = {d.name: d.reason for d in decisions}
    assert reasons["ok"] is None
    assert reasons["odd"] == "shape 24x32 not divisible by block size 16"
    assert reasons["head"] == "excluded by pattern 'head'"
    assert reasons["frozen"] == "weight is not a parameter"
    assert reasons["left"] == "used as the right operand without transpose of matmul, not as x @ W.T"


def test_a_graph_input_in_the_weight_position_is_named_as_an_input():
    # ``w @ x.t()`` matches x @ W.T with the roles swapped: the "weight" is the input x.
    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return self.w @ x.t()

    _, _, decisions, _, _ = passes_on(Swapped(), torch.randn(4, 32))
    reasons = {d.name: d.reason for d in decisions}
    assert reasons["x"].startswith("a graph input, not a parameter"), reasons


def test_tied_weight_stays_dense():
    _, _, decisions, _, _ = passes_on(TiedLM(64, 32), torch.randint(0, 64, (2, 5)))
    reasons = {d.name: d.reason for d in decisions}
    assert reasons == {"fc": None, "embed": "weight tied/shared with an embedding"}


def test_source_path_of_nested_parameter():
    placeholders = lambda gm: [source_path(n) for n in gm.graph.nodes if n.op == "placeholder"]
    *_, paths = passes_on(MLP((32, 32, 16)), torch.randn(4, 32), then=placeholders)
    assert "layers.0.weight" in paths and "layers.1.bias" in paths


def test_not_included_by_pattern():
    _, _, decisions, _, _ = passes_on(MLP((32, 32, 16)), torch.randn(4, 32), include=["layers.1"])
    assert [(d.name, d.rewritten) for d in decisions] == [("layers.0", False), ("layers.1", True)]
    assert decisions[0].reason == "not matched by include patterns ['layers.1']"


def test_one_dimensional_and_integer_weights_are_reported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.vec = nn.Parameter(torch.randn(32))

        def forward(self, x):
            return F.linear(x, self.vec)

    _, _, decisions, _, _ = passes_on(Odd(), torch.randn(4, 32))
    assert [(d.name, d.reason) for d in decisions] == [("vec", "weight is 1-D, not 2-D")]
    from agpe_compile.state import skip_reason

    ints = nn.Parameter(torch.ones(32, 32, dtype=torch.int32), requires_grad=False)
    assert skip_reason("w", ints, BackendConfig(), 16) == "weight dtype torch.int32 is not floating point"
