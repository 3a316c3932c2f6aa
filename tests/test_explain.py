"""``agpe_compile.explain``: it reports without changing the run it is called from (RNG,
Dynamo's shape state, layer states after a failure), its golden text, graph breaks that make
Dynamo skip a frame, and its errors."""

import importlib.util
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agpe_compile
from agpe_compile.state import state_of

from .models import MLP


class _DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc(x))


def test_explain_in_train_mode_leaves_the_global_rng_unchanged():
    torch.manual_seed(0)
    model = _DropoutNet()
    agpe_compile.prepare(model, {"block_size": 16})
    before = torch.get_rng_state()
    agpe_compile.explain(model, torch.ones(4, 32))
    assert torch.equal(torch.get_rng_state(), before)
    after_explain = torch.rand(3)
    torch.set_rng_state(before)
    assert torch.equal(torch.rand(3), after_explain)  # the draw a run without explain makes


def _first_line_of_forward(report):
    return report.graphs[0].splitlines()[1]


def test_explain_output_does_not_depend_on_earlier_explain_calls_at_other_batch_sizes():
    model = MLP((32, 64, 32))
    agpe_compile.prepare(model, {"block_size": 16})
    first = agpe_compile.explain(model, torch.randn(4, 32))
    other = agpe_compile.explain(model, torch.randn(8, 32))
    again = agpe_compile.explain(model, torch.randn(4, 32))
    assert again.graphs == first.graphs
    assert "Sym(" not in _first_line_of_forward(other) and '"f32[8, 32]"' in _first_line_of_forward(other)


def _user_graphs(model, *batches):
    records = []
    compiled = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}, on_graph=records.append))
    for batch in batches:
        compiled(torch.randn(batch, 32))
    return [r.rewritten.print_readable(print_output=False) for r in records]


def test_explain_does_not_make_the_users_later_compile_dynamic():
    model = MLP((32, 64, 32))
    agpe_compile.prepare(model, {"block_size": 16})
    agpe_compile.explain(model, torch.randn(4, 32))
    (graph,) = _user_graphs(model, 8)  # Dynamo saw batch 4 before only in explain's compile
    assert "Sym(" not in graph


def test_explain_does_not_see_the_users_dynamic_shapes():
    model = MLP((32, 64, 32))
    agpe_compile.prepare(model, {"block_size": 16})
    expected = agpe_compile.explain(model, torch.randn(4, 32)).graphs
    torch._dynamo.reset()
    graphs = _user_graphs(model, 4, 8)  # the second compile is dynamic: the user's own state
    assert "Sym(" in graphs[-1]
    assert agpe_compile.explain(model, torch.randn(4, 32)).graphs == expected
    graphs = _user_graphs(model, 16)  # still the user's state only: dynamic from before, not changed by explain
    assert "Sym(" in graphs[-1]


_NET_SOURCE = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, x):
        return self.head(F.relu(self.fc1(x)))
"""


def _import_net(path, lines_above):
    path.write_text("\n" * lines_above + textwrap.dedent(_NET_SOURCE))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Net


def test_golden_text_does_not_depend_on_file_lines_or_masks(tmp_path):
    reports = []
    for folder, lines_above in (("a", 0), ("b", 17)):
        (tmp_path / folder).mkdir()
        torch.manual_seed(0)
        model = _import_net(tmp_path / folder / f"net_{folder}.py", lines_above)()
        agpe_compile.prepare(model, {"block_size": 16})
        if folder == "b":
            agpe_compile.layer_state(model.fc1).block_mask[0, 0] = False  # another density
        reports.append(agpe_compile.explain(model, torch.randn(4, 32), options={"exclude": ["head"]}))
    first, second = reports
    assert first.graphs != second.graphs  # file names and line numbers in the comments
    assert first.golden() == second.golden()
    golden = first.golden()
    assert "# File" not in golden and str(tmp_path) not in golden and "density" not in golden
    assert "torch.ops.agpe.sparse_linear.default" in golden
    assert "fc1    64x32  16     0      yes (sparse_linear)" in golden
    assert "head   16x64  -      0      no: excluded by pattern 'head'" in golden


class _LoopWithBreak(nn.Module):
    """A graph break inside the loop over the layers: Dynamo skips the whole frame."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
            torch._dynamo.graph_break()
        return x


def test_explain_reports_a_frame_dynamo_skipped_and_why_nothing_was_compiled():
    model = _LoopWithBreak()
    report = agpe_compile.explain(model, torch.randn(4, 32), options={"block_size": 16})
    assert report.graphs == [] and report.layers == []
    assert report.graph_breaks and any("loop" in reason for reason in report.graph_breaks)
    assert report.uncompiled_layers == ["layers.0", "layers.1", "layers.2"]
    text = str(report)
    assert "no linear layers found" not in text
    assert "no graph was compiled" in text and f"{len(report.graph_breaks)} graph break(s)" in text
    # Dynamo now skips the frame without a word: the report says where to look
    again = str(agpe_compile.explain(model, torch.randn(4, 32), options={"block_size": 16}))
    assert "no graph was compiled" in again and "torch._dynamo.reset()" in again


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return torch.relu(self.fc(x))


class _BlocksWithBreak(nn.Module):
    """Dynamo skips the loop's frame and compiles each block's forward as a frame of its own."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return x


def test_explain_reports_the_skipped_frame_of_a_loop_whose_blocks_were_compiled():
    model = _BlocksWithBreak()
    agpe_compile.prepare(model, {"block_size": 16})
    report = agpe_compile.explain(model, torch.randn(4, 32))
    assert report.layers and report.uncompiled_layers == []
    assert any("loop" in reason for reason in report.graph_breaks)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 32)

    def forward(self, x, y):
        a = self.fc1(x)
        torch._dynamo.graph_break()
        return a + self.fc2(y)


def _block_sizes(model):
    return {name: None if state_of(p) is None else state_of(p).block_size
            for name, p in model.named_parameters() if p.dim() == 2}


def test_a_failed_explain_unprepares_the_layers_it_prepared():
    model = _TwoInputs()  # the second graph fails: y has the wrong width
    with pytest.raises(Exception, match="31"):
        agpe_compile.explain(model, torch.randn(4, 32), torch.randn(4, 31), options={"block_size": 8})
    assert _block_sizes(model) == {"fc1.weight": None, "fc2.weight": None}
    agpe_compile.prepare(model, {"block_size": 16})  # refused before: fc1 kept explain's block size 8
    assert _block_sizes(model) == {"fc1.weight": 16, "fc2.weight": 16}


class _ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(32, 32)
        self.fc1 = nn.Linear(32, 64)
        self.head = nn.Linear(64, 32)

    def forward(self, x):
        return self.head(F.relu(self.fc1(self.pre(x))))


def test_a_block_size_clash_is_the_backends_value_error_and_keeps_the_users_layers():
    model = _ThreeLayers()
    agpe_compile.prepare(model.fc1, {"block_size": 32})  # prepared by the user, through a submodule
    said = "option 'block_size' got 16, but layer 'weight' \\('fc1' here\\) was prepared with block size 32"
    with pytest.raises(ValueError, match=said) as info:
        agpe_compile.explain(model, torch.randn(4, 32), options={"block_size": 16})
    assert isinstance(info.value.__cause__, torch._dynamo.exc.BackendCompilerFailed)  # the chain is kept
    assert "AgpeBackend object at" not in str(info.value)
    # pre was prepared by explain's compile (block 16) before fc1 raised: unprepared again
    assert _block_sizes(model) == {"pre.weight": None, "fc1.weight": 32, "head.weight": None}


def test_explain_ignores_a_compile_mode_and_names_a_wrong_one():
    model = MLP((32, 64, 32))
    report = agpe_compile.explain(model, torch.randn(4, 32), options={"mode": "max-autotune", "block_size": 16})
    assert [layer.rewritten for layer in report.layers] == [True, True]
    with pytest.raises(ValueError, match="agpe.explain: options\\['mode'\\] got 'max-autotun'"):
        agpe_compile.explain(model, torch.randn(4, 32), options={"mode": "max-autotun"})
