"""Where and how the Triton kernels run: availability, interpreter mode, launch, dot precision.

Nothing here imports triton at module import time (only when asked), so
``agpe_compile.kernels`` imports cleanly on machines without it.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports (the kernels need it; the CPU gather path does not).

    >>> isinstance(triton_available(), bool)
    True
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require_triton() -> None:
    if not triton_available():
        raise RuntimeError(
            "agpe kernels: triton is not installed; use agpe_compile.kernels.cpu_gather or "
            "the reference in agpe_compile.ops on this machine"
        )


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was built under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


class InterpreterUnavailable(RuntimeError):
    """The installed triton's CPU interpreter cannot run these kernels (see
    :func:`interpreter_problem`); compiled GPU kernels are not affected."""


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why this environment's ``TRITON_INTERPRET=1`` cannot run the kernels, or None.

    Known case: triton <= 3.6's interpreter turns a loaded scalar into a Python int with
    ``int()`` of a 1-element array, which numpy >= 2.4 rejects ("only 0-dimensional arrays
    can be converted to Python scalars"); every kernel whose loop bounds come from the
    layout (``range(first, last)``) fails. triton 3.7 fixed it (``.squeeze()``). Seen with
    torch 2.11's triton 3.6.0.
    """
    import numpy
    import triton

    def minor(version: str) -> tuple[int, int]:
        major, minor_, *_ = (version.split("+")[0].split(".") + ["0", "0"])
        return int(major), int("".join(ch for ch in minor_ if ch.isdigit()) or 0)

    if minor(triton.__version__) < (3, 7) and minor(numpy.__version__) >= (2, 4):
        return (
            f"triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run the "
            f"agpe kernels with numpy {numpy.__version__}: it converts loaded loop bounds with "
            f"int() of a 1-element array, which numpy >= 2.4 rejects (fixed in triton 3.7). "
            f"Install numpy<2.4 or triton>=3.7 to run them interpreted; compiled GPU kernels "
            f"are not affected"
        )
    return None


def launcher(kernel, grid, device: torch.device):
    """``kernel[grid]``: through ``wrap_triton`` while traced, so a ``triton_op`` body (or a
    function compiled by Dynamo) records the launch; directly otherwise.

    Outside tracing ``wrap_triton`` would dispatch every launch through a higher-order op,
    host work that made eager launches (the optimizer step, the kernel benchmark) slower
    than the kernels themselves on an H200. torch 2.11's ``wrap_triton`` rejects
    interpreter-mode kernels, so those always launch directly.
    """
    if is_interpreted(kernel):
        return _interpreted(kernel[grid])
    if device.type != "cuda":
        raise ValueError(
            f"agpe kernels: expected CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
            f"imported), got tensors on {device}"
        )
    if not is_tracing():
        return kernel[grid]
    return torch.library.wrap_triton(kernel)[grid]


def _interpreted(launch):
    """``launch`` with the known interpreter incompatibility reported as what it is."""

    def run(*args, **kwargs):
        try:
            return launch(*args, **kwargs)
        except Exception as error:
            problem = interpreter_problem()
            if problem is not None and "only 0-dimensional arrays" in str(error):
                raise InterpreterUnavailable(f"agpe kernels: {problem}") from error
            raise

    return run


def is_tracing() -> bool:
    """Whether a launch now would be recorded rather than run: Dynamo is compiling, or a
    dispatch mode (fake, functional, proxy: make_fx / AOTAutograd) is active."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return torch.compiler.is_compiling() or bool(_get_current_dispatch_mode_stack())


def dot_options(kernel, dtype: torch.dtype) -> dict:
    """The kernels' tl.dot constexprs for inputs of ``dtype``.

    INPUT_PRECISION: fp32 follows ``torch.set_float32_matmul_precision`` (tf32 unless
    "highest"); 16-bit inputs ignore it. UPCAST: bf16 under the interpreter only, which
    multiplies bf16 bit patterns (triton#11584); compiled GPU code never upcasts.
    """
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return {"INPUT_PRECISION": "tf32" if tf32 else "ieee",
            "UPCAST": dtype == torch.bfloat16 and is_interpreted(kernel)}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
