"""BlockSparseAdamW against torch.optim.AdamW (kernel under TRITON_INTERPRET=1 on CPU).

Under the Sparsifier's invariant (inactive blocks: weight, gradient and moments zero) the
two optimizers must produce the same parameters and moments; inactive blocks must never
be written (a NaN planted there must survive), and non-agpe parameters must take AdamW's
own path.
"""

import pytest
import torch

import agpe_compile
from agpe_compile.kernels import block_sparse_adamw_
from agpe_compile.layout import build_layout
from agpe_compile.ops.reference import expand_block_mask

from .models import MLP, set_random_masks

pytest.importorskip("triton")


def _model(seed=0):
    torch.manual_seed(seed)
    model = MLP((64, 96, 48))
    agpe_compile.prepare(model, options={"block_size": 16})
    set_random_masks(model, 0.4, seed=seed)
    return model


def _train(model, optimizer, steps=4):
    states = agpe_compile.layer_states(model)
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 64)
        model(x).square().mean().backward()
        for state in states.values():  # what the op does: masked weight gradients
            state.weight.grad.mul_(expand_block_mask(state.block_mask, 16, state.weight.dtype))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_matches_adamw_under_the_sparsifier_invariant():
    reference, sparse = _model(), _model()
    options = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    adamw = torch.optim.AdamW(reference.parameters(), **options)
    block_sparse = agpe_compile.BlockSparseAdamW(sparse.parameters(), **options)
    _train(reference, adamw)
    _train(sparse, block_sparse)
    assert block_sparse.sparse_updates == 2 * 4  # both layers' weights, every step
    for (name, p), q in zip(reference.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(block_sparse.state[q][key], adamw.state[p][key], rtol=1e-5, atol=1e-7)
        assert float(block_sparse.state[q]["step"]) == 4.0
    for state in agpe_compile.layer_states(sparse).values():  # inactive blocks stay exactly zero
        inactive = ~expand_block_mask(state.block_mask, 16, torch.bool)
        assert not state.weight[inactive].any()
        assert not block_sparse.state[state.weight]["exp_avg"][inactive].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_touches_live_blocks_only(dtype):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 4, generator=g) < 0.5
    em = expand_block_mask(mask, 16, torch.bool)
    p, grad = torch.randn(48, 64, generator=g), torch.randn(48, 64, generator=g)
    m, v = torch.randn(48, 64, generator=g) * 0.1, torch.rand(48, 64, generator=g) * 0.1
    p, grad, m, v = (torch.where(em, t, float("nan")).to(dtype) for t in (p, grad, m, v))
    expected = [t.double().clone() for t in (p, grad, m, v)]
    block_sparse_adamw_(p, grad, m, v, build_layout(mask, 16), lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                        weight_decay=0.05, step=3)
    ep, eg, em1, ev = expected
    ep = ep * (1 - 0.1 * 0.05)
    em1 = em1 + 0.1 * (eg - em1)
    ev = ev * 0.99 + 0.01 * eg * eg
    ep = ep - (0.1 / (1 - 0.9**3)) * em1 / (ev.sqrt() / (1 - 0.99**3) ** 0.5 + 1e-8)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for got, want in ((p, ep), (m, em1), (v, ev)):
        torch.testing.assert_close(got.double()[em], want[em], **tol)
        assert got[~em].isnan().all()  # never read, never written


def test_rejects_unsupported_options_and_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="expected amsgrad=False"):
        agpe_compile.BlockSparseAdamW(model.parameters(), amsgrad=True)
    p = torch.zeros(32, 32)
    layout = build_layout(torch.ones(2, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="step >= 1"):
        block_sparse_adamw_(p, p.clone(), p.clone(), p.clone(), layout, lr=1, beta1=0.9, beta2=0.9, eps=1e-8,
                            weight_decay=0, step=0)
    with pytest.raises(ValueError, match=r"exp_avg \(32, 32\)"):
        block_sparse_adamw_(p, p.clone(), torch.zeros(32, 16), p.clone(), layout, lr=1, beta1=0.9, beta2=0.9,
                            eps=1e-8, weight_decay=0, step=1)


def test_state_dict_round_trip_and_sparsifier_moment_reset():
    model = _model()
    optimizer = agpe_compile.BlockSparseAdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, steps=2)
    clone = agpe_compile.BlockSparseAdamW(model.parameters(), lr=1e-2)
    clone.load_state_dict(optimizer.state_dict())
    weight = model.layers[0].weight
    assert torch.equal(clone.state[weight]["exp_avg"], optimizer.state[weight]["exp_avg"])
    from agpe_compile.controller.optimizer_state import zero_optimizer_state  # the Sparsifier's reset

    blocks = torch.zeros(6, 4, dtype=torch.bool)
    blocks[0, 0] = True
    assert zero_optimizer_state(optimizer, weight, blocks, 16) == ["exp_avg", "exp_avg_sq"]
    assert not optimizer.state[weight]["exp_avg"][:16, :16].any()


def _weights(model):
    return [layer.weight for layer in model.layers]


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_capturable_reads_step_and_lr_on_the_device_and_matches_adamw(tensor_lr):
    # capturable=True: the kernel takes the step count (and a tensor lr) from 0-d tensors
    # on the parameters' device, so a CUDA graph can replay the step (Note in optim.py).
    # Here on the CPU under the interpreter; a scheduler changes lr between steps.
    reference, sparse = _model(), _model()
    options = dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    adamw = torch.optim.AdamW(_weights(reference), lr=1e-2, **options)
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    block_sparse = agpe_compile.BlockSparseAdamW(_weights(sparse), lr=lr, capturable=True, **options)
    for step in range(4):
        _train(reference, adamw, steps=1)
        _train(sparse, block_sparse, steps=1)
        for optimizer in (adamw, block_sparse):  # a schedule: lr halves after each step
            group = optimizer.param_groups[0]
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].mul_(0.5)
            else:
                group["lr"] = group["lr"] * 0.5
    assert block_sparse.sparse_updates == 2 * 4
    for p, q in zip(_weights(reference), _weights(sparse)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(block_sparse.state[q][key], adamw.state[p][key], rtol=1e-5, atol=1e-7)
        step = block_sparse.state[q]["step"]
        assert step.device == q.device and step.dim() == 0 and float(step) == 4.0


def test_capturable_state_loads_from_a_host_checkpoint():
    model = _model()
    plain = agpe_compile.BlockSparseAdamW(_weights(model), lr=1e-2)
    _train(model, plain, steps=2)
    capturable = agpe_compile.BlockSparseAdamW(_weights(model), lr=1e-2, capturable=True)
    capturable.load_state_dict(plain.state_dict())
    assert capturable.param_groups[0]["capturable"] is False  # the saved groups replace ours, as in torch
    capturable.param_groups[0]["capturable"] = True  # what the docstring tells a user to do
    _train(model, capturable, steps=1)
    step = capturable.state[model.layers[0].weight]["step"]
    assert step.dim() == 0 and step.dtype == torch.float32 and float(step) == 3.0


def test_capturable_bias_correction_keeps_double_precision():
    # 1 - beta^t on the device comes from log(beta) in double (kernels/adamw.py): with
    # extreme betas the capturable step matches the host path, which computes it in double.
    host, device = _model(), _model()
    options = dict(lr=1e-2, betas=(0.5, 0.99999), eps=1e-8, weight_decay=0.1)
    plain = agpe_compile.BlockSparseAdamW(_weights(host), **options)
    capturable = agpe_compile.BlockSparseAdamW(_weights(device), capturable=True, **options)
    _train(host, plain, steps=40)
    _train(device, capturable, steps=40)
    for p, q in zip(_weights(host), _weights(device)):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_kernel_takes_a_tensor_lr_with_an_int_step():
    mask = torch.ones(2, 2, dtype=torch.bool)
    layout = build_layout(mask, 16)
    results = []
    for lr in (0.1, torch.tensor(0.1)):
        p, grad = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)), torch.ones(32, 32)
        m, v = torch.zeros(32, 32), torch.zeros(32, 32)
        block_sparse_adamw_(p, grad, m, v, layout, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=2)
        results.append(p)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_groups_added_later_and_bad_capturable_inputs_are_refused_before_the_step_moves():
    model = _model()
    optimizer = agpe_compile.BlockSparseAdamW([model.layers[0].weight], lr=1e-2, capturable=True)
    optimizer.add_param_group({"params": [model.layers[1].weight], "amsgrad": True})
    with pytest.raises(ValueError, match="expected amsgrad=False in every parameter group"):
        _train(model, optimizer, steps=1)
    optimizer = agpe_compile.BlockSparseAdamW(_weights(model), lr=torch.tensor([1e-2]), capturable=True)
    with pytest.raises(ValueError, match="with capturable=True, expected lr as a float or a 0-d tensor"):
        _train(model, optimizer, steps=1)
    assert not any("step" in s for s in optimizer.state.values())  # nothing counted, no state made
    optimizer = agpe_compile.BlockSparseAdamW(_weights(model), lr=torch.tensor(1), capturable=True)
    _train(model, optimizer, steps=1)  # an integer lr tensor is taken as a float
    optimizer = agpe_compile.BlockSparseAdamW(model.parameters(), lr=1e-2, capturable=True)
    with pytest.raises(ValueError, match="capturable=True needs the parameters that take AdamW's own path"):
        _train(model, optimizer, steps=1)  # the biases are on the CPU


def test_kernel_refuses_step_and_lr_tensors_it_cannot_read():
    p = torch.zeros(32, 32)
    layout = build_layout(torch.ones(2, 2, dtype=torch.bool), 16)
    args = (p, p.clone(), p.clone(), p.clone(), layout)
    with pytest.raises(ValueError, match="step as a number or a 0-d floating tensor"):
        block_sparse_adamw_(*args, lr=1, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, step=torch.ones(1))
    with pytest.raises(ValueError, match="lr as a number or a 0-d floating tensor"):
        block_sparse_adamw_(*args, lr=torch.tensor(1), beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, step=1)
    with pytest.raises(ValueError, match="step >= 1"):
        block_sparse_adamw_(*args, lr=1, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0, step=True)
