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


@pytest.fixture(scope="session", autouse=True)
def every_bucket_a_layout():
    """Layouts take every configured bucket, as a block-128 layer's do (on a GPU a crossing
    there changes the kernels' capacity), so that the tests' small CPU layers cross buckets,
    resize their layouts and recompile as the suite was written for. As shipped, the layouts
    of blocks under 32 stay at full capacity (every device runs them dense at every density;
    Note [Buckets no path tells apart] in buckets.py): tests of that behaviour carry
    ``@pytest.mark.shipped_layout_buckets`` (tests/test_layout_buckets.py, the doctests), and
    every example run in a subprocess (tests/test_examples.py) runs as shipped. Session-wide,
    so that module-scoped fixtures (a training run several tests read) take it too."""
    from agpe_compile.ops import paths

    shipped = paths.dense_everywhere_from
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(paths, "dense_everywhere_from", lambda block_size: 1.0)
        yield shipped


@pytest.fixture(autouse=True)
def _shipped_layout_buckets(request, every_bucket_a_layout):
    """``@pytest.mark.shipped_layout_buckets``: this test's layouts as shipped (see above)."""
    if not request.node.get_closest_marker("shipped_layout_buckets"):
        yield
        return
    from agpe_compile.ops import paths

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(paths, "dense_everywhere_from", every_bucket_a_layout)  # the shipped function
        yield
