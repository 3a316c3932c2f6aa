"""Zero-code mode through the backend: AGPE options in torch.compile, no other change."""

import pytest
import torch

import agpe_compile
from agpe_compile.state import layer_states

from .models import MLP


def test_zero_code_mode_prunes_during_plain_training_loop():
    torch.manual_seed(0)
    model = MLP((32, 64, 16))
    options = {"inductor": False, "block_size": 8, "target_sparsity": 0.75, "policy": "rigl",
               "update_interval": 5, "end_step": 40}
    backend = agpe_compile.AgpeBackend(options)
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 32), torch.randn(16, 16)
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    states = layer_states(model)
    assert len(backend.controllers) == 1
    total = sum(s.block_mask.numel() for s in states.values())
    active = sum(int(s.block_mask.sum()) for s in states.values())
    assert active / total == pytest.approx(0.25, abs=0.05)
    with torch.no_grad():  # eval calls do not tick the controller
        calls = backend.controllers[0].calls
        compiled(x)
        assert backend.controllers[0].calls == calls
    # masked-out blocks never reach the output, even if stale momentum moved their weights
    reference = torch.func.functional_call(model, {
        name: p * agpe_compile.ops.reference.expand_block_mask(states[name.rsplit(".", 1)[0]].block_mask, 8, p.dtype)
        if name.endswith("weight") else p for name, p in model.named_parameters()}, (x,))
    torch.testing.assert_close(compiled(x), reference)


def test_zero_code_bad_option_names_the_field():
    with pytest.raises(ValueError, match="target_sparsity"):
        agpe_compile.AgpeBackend({"target_sparsity": 1.5})
    with pytest.raises(ValueError, match="snfs"):
        agpe_compile.AgpeBackend({"target_sparsity": 0.5, "policy": "snfs"})
