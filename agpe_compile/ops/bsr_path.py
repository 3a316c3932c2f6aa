"""The forward and dX of a sparse CPU layer as MKL block-sparse (BSR) products.

Note [CPU block-sparse products]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The CPU dense path (ops/dense_path.py) multiplies the whole weight: at density 0.1 nine
tenths of its FLOPs meet zeros. Blocks of 32 and more have the gathered-block path
(kernels/cpu_gather.py); smaller blocks lose there (batched matmuls of tiny blocks). For
them, and for any layer on the dense path, PyTorch's CPU ``sparse_bsr_tensor @ dense``
(MKL's sparse BLAS) reads only the live blocks: ``Y^T = W_bsr @ X^T`` for the forward and
``dX^T = (W^T)_bsr @ dY^T`` for dX, the BSR values gathered from the dense-shaped weight
each call (W changes every step; one ``index_select`` of the live blocks' b-long row runs,
Note [Gathering live blocks] in dense_path.py). dW has no BSR form: at low density it is
a sampled product of the live blocks' elements (Note [CPU sampled dW], ops/sampled_grad.py).

The choice is made per call on the host from the mask's contents and the row count
(:func:`worth_it`; real CPU tensors only, like the other host decisions of the dense path),
so a traced body, a device tensor or a 16-bit weight (MKL has no bf16/fp16 BSR product)
keeps the dense products. It computes ``X @ (W*M)^T`` from the same terms (only the fp32
summation order differs); like the Triton kernels and the gathered path it never reads an
inactive block, so a NaN or inf stored there does not reach the output, where the masked
reference multiplies it by 0 (NaN), and neither does an infinite input (or dY) entry that
meets only inactive blocks (the dense products give inf * 0 = NaN there). With finite
values every path agrees. Not taken under autocast (MKL has no 16-bit BSR product: a
backward called inside an autocast region reaches the op's dX so), inside a torch.func
transform, or for an autograd caller (inputs that require grad under grad mode; the op's
own implementation runs below autograd, so only direct calls are such callers).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..env import switch
from .mask_cache import derived

# Block sizes whose crossover was measured (benchmarks/results/2026-11-29-cpu-bsr-session31/).
BLOCK_SIZES = (8, 16)
# Set AGPE_CPU_BSR=0 (or false/off/no; before import) to keep the dense products on the CPU at
# every density; a value that is no on/off word is an error (agpe_compile/env.py).
ENABLED = switch("AGPE_CPU_BSR")


def worth_it(x: torch.Tensor, weight: torch.Tensor, block_mask: torch.Tensor, block_size: int,
             bias: Optional[torch.Tensor] = None) -> bool:
    """Whether the BSR products beat the dense ones for a call with input (or dY) ``x``;
    reads the mask on the host: call only where dense_path.host_readable holds."""
    if not ENABLED or block_size not in BLOCK_SIZES or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return False
    if not (_plain(x) and _plain(weight) and weight.is_contiguous()) or x.numel() == 0:
        return False
    if bias is not None and not (_plain(bias) and bias.dtype == torch.float32):
        return False
    if not plain_call(x, weight, bias):
        return False
    live = derived(block_mask, block_size, "live_count", lambda: int(block_mask.sum()))
    rows = x.numel() // x.shape[-1]
    return live <= max_density(rows, weight.numel(), torch.get_num_threads()) * block_mask.numel()


def plain_call(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` runs outside any trace, dispatch mode, torch.func
    transform, CPU autocast region and autograd recording: where a product computed outside
    autograd on real tensors may replace the dense one."""
    if _get_current_dispatch_mode() is not None or torch.compiler.is_compiling():
        return False  # traced or observed by a mode: the dense products, as everywhere else
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False  # inside a torch.func transform (grad of plain tensors, too)
    if torch.is_autocast_enabled("cpu"):
        return False  # MKL has no 16-bit BSR product, which autocast would ask for (helper audit CQ)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False  # an autograd caller: the products below are not differentiable
    return True


def _plain(t: torch.Tensor) -> bool:
    """A real, strided CPU tensor with storage of its own: no subclass, fake, sparse or
    functorch wrapper."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.layout == torch.strided
            and not is_fake(t) and not torch._C._functorch.is_functorch_wrapped_tensor(t))


# Live-block fractions up to which the BSR products beat the dense ones, from
# benchmarks/results/2026-11-29-cpu-bsr-session31/ (2-core AMD EPYC VM, torch 2.13.0+cpu,
# fp32, blocks 8 and 16, weights 1000 x 784 to 2048 x 2048, 32-2048 rows, best of 5;
# ranges.txt). A layer's forward + dX, BSR / dense: one thread 0.45-0.89 at density 0.1
# (median 0.61), 0.57-0.83 at 0.125, 0.60-1.00 at 0.15. Two threads (MKL's dense products
# gain more from the second thread than its BSR ones): weights of 2048 x 2048 0.43-0.88 at
# 0.1, 0.62-0.87 at 0.125; smaller weights up to 256 rows 0.66-1.03 at 0.1 (median 0.75),
# 0.79-1.03 at 0.125; above 256 rows 0.51-0.93 at 0.05, 0.80-1.21 at 0.08. The bounds keep to
# densities where every measured layer won or tied (at most 1.03); 0.11 and 0.055 take in
# layers at 0.1 and 0.05 whose live blocks round up (a 90% target gives 0.10003). More
# threads were not measured (the VM has two cores): there the dense products stay.
_MAX_DENSITY_ONE_THREAD = 0.125
_MAX_DENSITY_TWO_THREADS = {"large": 0.125, "few rows": 0.11, "many rows": 0.055}
_LARGE_WEIGHT = 2**22  # elements: 2048 x 2048
_FEW_ROWS = 256


def max_density(rows: int, weight_numel: int, threads: int) -> float:
    """Live-block fraction up to which the BSR products are faster, for a call of ``rows``
    rows on a weight of ``weight_numel`` elements with ``threads`` intra-op threads."""
    if threads <= 1:
        return _MAX_DENSITY_ONE_THREAD
    if threads > 2:
        return 0.0  # not measured
    if weight_numel >= _LARGE_WEIGHT:
        return _MAX_DENSITY_TWO_THREADS["large"]
    return _MAX_DENSITY_TWO_THREADS["few rows" if rows <= _FEW_ROWS else "many rows"]


def _structure(block_mask: torch.Tensor, block_size: int):
    """BSR indices of W and of W^T and the live blocks' row runs in each order."""
    r, c = block_mask.shape
    b = block_size
    lines = torch.arange(b, device=block_mask.device)
    rows, cols = block_mask.nonzero(as_tuple=True)  # row-major: W's BSR order
    crow = torch.zeros(r + 1, dtype=torch.int64, device=block_mask.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=r), 0)
    runs = ((rows[:, None] * b + lines[None, :]) * c + cols[:, None]).reshape(-1)
    cols_t, rows_t = block_mask.t().nonzero(as_tuple=True)  # column-major: W^T's BSR order
    ccol = torch.zeros(c + 1, dtype=torch.int64, device=block_mask.device)
    ccol[1:] = torch.cumsum(torch.bincount(cols_t, minlength=c), 0)
    runs_t = ((rows_t[:, None] * b + lines[None, :]) * c + cols_t[:, None]).reshape(-1)
    return crow, cols, runs, ccol, rows_t, runs_t


def _bsr(weight: torch.Tensor, block_mask: torch.Tensor, block_size: int, transposed: bool) -> torch.Tensor:
    crow, cols, runs, ccol, rows_t, runs_t = derived(
        block_mask, block_size, "bsr", lambda: _structure(block_mask, block_size))
    b = block_size
    n, k = weight.shape
    blocks = weight.detach().reshape(-1, b).index_select(0, runs_t if transposed else runs).view(-1, b, b)
    if transposed:
        return _sparse_bsr(ccol, rows_t, blocks.transpose(1, 2).contiguous(), (k, n))
    return _sparse_bsr(crow, cols, blocks, (n, k))


def _sparse_bsr(crow, cols, values, shape) -> torch.Tensor:
    # device named: a default device (a torch.device(...) context) must not move it off the CPU
    return torch.sparse_bsr_tensor(crow, cols, values, shape, device=values.device, check_invariants=False)


def _silence_first_warnings() -> None:
    """Build one BSR tensor at import, so its once-per-process warnings never reach the user
    (agpe chose the format, not them): "support is in beta" (torch 2.13), "invariant checks
    are implicitly disabled" (torch 2.11; agpe builds the indices itself). At import, not at
    the first product: ``warnings.catch_warnings`` swaps the process's filters, which another
    thread's first product could otherwise interleave with (helper audit CQ)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (BSR tensor support is in beta|invariant checks are implicitly)")
        cpu = torch.device("cpu")  # named: an import under a default-device context stays on the CPU
        _sparse_bsr(torch.zeros(2, dtype=torch.int64, device=cpu), torch.zeros(1, dtype=torch.int64, device=cpu),
                    torch.zeros(1, 1, 1, device=cpu), (1, 1))


if ENABLED:
    _silence_first_warnings()


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """``F.linear(x, W*M, bias)`` from the live blocks: Y^T = W_bsr @ X^T."""
    n, k = weight.shape
    y_t = _bsr(weight, block_mask, block_size, False) @ x.reshape(-1, k).t()  # [N, M]
    y = torch.empty(y_t.shape[1], n, dtype=x.dtype, device=x.device)
    # (mm's out= with a transposed view runs outside MKL, ~10x slower): one copy, bias on the way
    if bias is None:
        y.copy_(y_t.t())
    else:
        torch.add(y_t.t(), bias, out=y)
    return y.view(*x.shape[:-1], n)


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor, block_mask: torch.Tensor,
               block_size: int) -> torch.Tensor:
    """``dY @ (W*M)`` from the live blocks: dX^T = (W^T)_bsr @ dY^T."""
    n, k = weight.shape
    dx_t = _bsr(weight, block_mask, block_size, True) @ grad_out.reshape(-1, n).t()  # [K, M]
    dx = dx_t.t().contiguous()
    return dx.view(*grad_out.shape[:-1], k)
