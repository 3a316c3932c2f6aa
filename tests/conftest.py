"""Test-session setup shared by all tiers.

Triton kernels run under the CPU interpreter when no GPU is present; the variable must be
set before triton is first imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_problem():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from agpe_compile.kernels.runtime import interpreter_problem, triton_available
    except ImportError:
        return None
    return interpreter_problem() if triton_available() else None


def pytest_report_header(config):
    problem = _interpreter_problem()
    return [f"agpe: WARNING: {problem}; the tests that run those kernels are skipped"] if problem else []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that needs the Triton interpreter skips, with the reason, where the installed
    triton's interpreter is known not to run our kernels (kernels/runtime.py,
    ``interpreter_problem``); any other error fails as usual."""
    try:
        return (yield)
    except Exception as error:
        from agpe_compile.kernels.runtime import InterpreterUnavailable

        cause = error
        while cause is not None and not isinstance(cause, InterpreterUnavailable):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        pytest.skip(str(cause))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or counters leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def every_bucket_a_layout(monkeypatch):
    """Layouts take every configured bucket, as a block-128 layer's do (on a GPU a crossing
    there changes the kernels' capacity), so that the tests' small CPU layers cross buckets
    and recompile: by default the CPU runs blocks under 32 dense at every density and their
    layouts stay at full capacity (Note [Buckets no path tells apart] in buckets.py)."""
    from agpe_compile.ops import paths

    monkeypatch.setattr(paths, "dense_everywhere_from", lambda block_size: 1.0)
