"""Every runnable example in a docstring runs and prints what it says.

The examples of the small helpers (layer budgets, schedules, drop/grow, layouts...) are
self-contained: they run here, so the docs cannot drift from the code. The module-level
usage sketches name a model, an optimizer or a GPU batch the reader brings; they are listed
in ``SKETCHES`` (each must still exist and still need one of those names). A new docstring
with ``>>>`` examples runs unless it is added there.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil

import pytest

import agpe_compile
import agpe_compile.passes as passes

pytestmark = pytest.mark.shipped_layout_buckets  # the examples show the library as shipped (tests/conftest.py)

SKETCHES = {
    "agpe_compile", "agpe_compile.averaged", "agpe_compile.backend", "agpe_compile.buckets",
    "agpe_compile.controller", "agpe_compile.controller.checkpoint", "agpe_compile.controller.host_sync",
    "agpe_compile.controller.optimizer_state", "agpe_compile.controller.rank_checkpoint",
    "agpe_compile.controller.sparsifier.Sparsifier", "agpe_compile.controller.zero_code", "agpe_compile.conv1d",
    "agpe_compile.explain", "agpe_compile.explain.ExplainReport.golden", "agpe_compile.graphs",
    "agpe_compile.integrations", "agpe_compile.integrations.hf", "agpe_compile.kernels",
    "agpe_compile.kernels.cpu_gather", "agpe_compile.kernels.launch", "agpe_compile.ops.autocast",
    "agpe_compile.ops.masked_weight", "agpe_compile.ops.sparse_linear", "agpe_compile.optim",
    "agpe_compile.state.LayerState", "agpe_compile.state.prepare", "agpe_compile.strip",
    "agpe_compile.zero_weights",
}


def _docstrings():
    found = {}
    finder = doctest.DocTestFinder(exclude_empty=True)
    for package in (agpe_compile, passes):
        # the package's own folder only: run from a checkout (PYTHONPATH), agpe_compile's path also
        # holds the repository root (for passes/), whose folders are no agpe_compile modules
        folder = [os.path.dirname(package.__file__)]
        names = [package.__name__] + [m.name for m in pkgutil.walk_packages(folder, package.__name__ + ".")]
        for name in names:
            module = importlib.import_module(name)
            for test in finder.find(module, name):
                if test.examples and test.name.startswith(name) and test.filename == module.__file__:
                    found[test.name] = test
    return found


DOCSTRINGS = _docstrings()


def test_the_sketch_list_names_real_docstrings():
    assert SKETCHES <= set(DOCSTRINGS), sorted(SKETCHES - set(DOCSTRINGS))


@pytest.mark.parametrize("name", sorted(set(DOCSTRINGS) - SKETCHES))
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write a file (the audit log) write it here
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert runner.run(DOCSTRINGS[name], out=report.append).failed == 0, "".join(report)


@pytest.mark.parametrize("name", sorted(SKETCHES))
def test_a_sketch_needs_what_the_reader_brings(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a sketch that runs on its own belongs with the tested examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert runner.run(DOCSTRINGS[name], out=lambda s: None).failed > 0
