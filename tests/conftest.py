"""Test-session setup shared by all tiers.

Triton kernels run under the CPU interpreter when no GPU is present; the variable must be
set before triton is first imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
