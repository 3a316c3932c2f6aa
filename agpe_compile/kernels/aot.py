"""Compile the kernels for a GPU target on a host without a GPU, and report their resources.

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic but not that they
compile for a real chip, nor what they cost there. Triton ships ptxas and cuobjdump, so
the sm_90 binaries can be built and inspected anywhere: shared memory per program (must
fit 227 KB), registers, spills, and whether ``tl.dot`` became Hopper wgmma (``HGMMA``).

Arguments are specialised as the runtime does for contiguous, 16-byte-aligned tensors:
pointers and leading strides divisible by 16, unit inner strides folded to constants.
Run under a plain environment (no ``TRITON_INTERPRET``)::

    $ python -m agpe_compile.kernels.aot --kernels forward,grad_weight --block-sizes 128 --dtypes bf16
    {"kernel": "forward", "block_size": 128, "dtype": "bf16", "shared_bytes": 98312, ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from typing import Optional

import torch

from .configs import KERNELS, KernelConfig, config_for

HOPPER_SHARED_LIMIT = 232448  # bytes of shared memory one program may use on sm_90
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_INDEX_ARGS = {"row_ptr_ptr", "col_idx_ptr", "slot_row_ptr", "live_count_ptr", "col_ptr_ptr",
               "row_idx_ptr", "block_slot_ptr"}


@dataclasses.dataclass(frozen=True)
class CompileReport:
    kernel: str
    block_size: int
    dtype: str
    config: KernelConfig
    shared_bytes: int
    registers: int
    spill_bytes: int  # local memory (register spills) per thread
    wgmma: int  # HGMMA instructions in the SASS
    mma: int  # pre-Hopper HMMA instructions in the SASS


def compile_for_target(
    kernel: str, block_size: int, dtype: str, config: Optional[KernelConfig] = None, arch: int = 90,
    constexprs: Optional[dict] = None,
) -> CompileReport:
    """Compile one kernel variant for ``sm_{arch}`` and read its resource usage.

    ``kernel`` is one of ``KERNELS`` or ``"grad_weight_finish"``; ``constexprs`` overrides
    the defaults (e.g. ``{"SPLIT": 4}`` for the split-K variant of grad_weight)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(kernel)
    cfg = config or config_for(kernel.replace("_finish", ""), block_size, _DTYPES[dtype], interpret=False)
    element = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
    constexprs = {"BLOCK_SIZE": block_size, "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k,
                  "GROUP_M": cfg.group_m, "HAS_BIAS": True, "SALIENCY": 1, "HAS_FLAG": True, "SPLIT": 1,
                  "INPUT_PRECISION": "tf32" if dtype == "fp32" else "ieee", "UPCAST": False, **(constexprs or {})}
    signature, constants, attrs = {}, {}, {}
    strides = [name for name in fn.arg_names if name.startswith("stride_")]
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], constants[name] = "constexpr", constexprs[name]
        elif name in strides and strides.index(name) % 2 == 1:  # inner stride of a (outer, inner) pair
            signature[name], constants[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            signature[name] = ("*i32" if name in _INDEX_ARGS else "*fp32" if name in ("scores_ptr", "ws_ptr")
                               else "*i1" if name == "enabled_ptr" else element)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
        target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    usage, sass = _inspect(compiled.asm["cubin"], os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin"))
    return CompileReport(kernel, block_size, dtype, cfg, compiled.metadata.shared, usage["REG"], usage["LOCAL"],
                         sass.count("HGMMA"), len(re.findall(r"\bHMMA\b", sass)))


def compile_column_sum(dtype: str = "bf16", even_n: bool = True, arch: int = 90) -> dict:
    """Compile the bias-gradient kernel (kernels/column_sum.py) as the launcher configures it
    on a GPU; report shared memory, registers, spills and the widest global load."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .column_sum import column_sum_kernel

    element = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
    signature = {"g_ptr": element, "partial_ptr": "*fp32", "M": "i32", "N": "i32", "rows_per_split": "i32",
                 "stride_gm": "i32", "stride_gn": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                 "EVEN_N": "constexpr"}
    constants = {"stride_gn": 1, "BLOCK_M": 32, "BLOCK_N": 128, "EVEN_N": even_n}
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (5,): [["tt.divisibility", 16]]}
    compiled = triton.compile(ASTSource(fn=column_sum_kernel, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})
    usage, sass = _inspect(compiled.asm["cubin"], os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin"))
    loads = re.findall(r"LDG\.E(?:\.U?(\d+))?", sass)
    return {"shared_bytes": compiled.metadata.shared, "registers": usage["REG"], "spill_bytes": usage["LOCAL"],
            "widest_load_bits": max((int(bits) if bits else 32) for bits in loads) if loads else 0}


def compile_tma(kernel: str = "forward", block_size: int = 128, dtype: str = "bf16", arch: int = 90,
                config: Optional[KernelConfig] = None, device_descriptors: bool = False) -> dict:
    """Compile a TMA candidate (``"forward"``: kernels/forward_tma.py, ``"grad_input"``:
    kernels/grad_input_tma.py, ``"grad_weight"``: kernels/grad_weight_tma.py) with the
    default kernel's configuration; report shared memory, registers, spills, TMA loads
    (UTMALDG) and wgmma (HGMMA)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .forward_tma import forward_tma_device_kernel, forward_tma_kernel
    from .grad_input_tma import grad_input_tma_device_kernel, grad_input_tma_kernel
    from .grad_weight_tma import grad_weight_tma_device_kernel, grad_weight_tma_kernel

    cfg = config or config_for(kernel, block_size, _DTYPES[dtype], interpret=False, tma=True)
    e = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[dtype]
    if kernel == "forward" and device_descriptors:
        fn = forward_tma_device_kernel
        signature = {"x_ptr": f"*{e}", "w_ptr": f"*{e}", "bias_ptr": f"*{e}", "y_ptr": f"*{e}",
                     "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32", "M": "i32", "K": "i32", "N": "i32",
                     "num_block_rows": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
                     "stride_yn": "constexpr"}
        aligned = ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "row_ptr_ptr", "col_idx_ptr", "K", "N", "stride_xm",
                   "stride_wn", "stride_ym")
        extra = {"stride_yn": 1, "HAS_BIAS": True}
    elif kernel == "grad_input" and device_descriptors:
        fn = grad_input_tma_device_kernel
        signature = {"dy_ptr": f"*{e}", "w_ptr": f"*{e}", "dx_ptr": f"*{e}", "col_ptr_ptr": "*i32",
                     "row_idx_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "num_block_cols": "i32",
                     "stride_dym": "i32", "stride_wn": "i32", "stride_dxm": "i32", "stride_dxk": "constexpr"}
        aligned = ("dy_ptr", "w_ptr", "dx_ptr", "col_ptr_ptr", "row_idx_ptr", "N", "K", "stride_dym", "stride_wn",
                   "stride_dxm")
        extra = {"stride_dxk": 1}
    elif kernel == "forward":
        fn = forward_tma_kernel
        signature = {"x_desc": f"tensordesc<{e}[{cfg.block_m},{cfg.block_k}]>",
                     "w_desc": f"tensordesc<{e}[{block_size},{cfg.block_k}]>", "bias_ptr": f"*{e}", "y_ptr": f"*{e}",
                     "row_ptr_ptr": "*i32", "col_idx_ptr": "*i32", "M": "i32", "num_block_rows": "i32",
                     "stride_ym": "i32", "stride_yn": "constexpr"}
        aligned = ("bias_ptr", "y_ptr", "row_ptr_ptr", "col_idx_ptr", "stride_ym")
        extra = {"stride_yn": 1, "HAS_BIAS": True}
    elif kernel == "grad_input":
        fn = grad_input_tma_kernel
        signature = {"dy_desc": f"tensordesc<{e}[{cfg.block_m},{cfg.block_k}]>",
                     "w_desc": f"tensordesc<{e}[{cfg.block_k},{block_size}]>", "dx_ptr": f"*{e}",
                     "col_ptr_ptr": "*i32", "row_idx_ptr": "*i32", "M": "i32", "num_block_cols": "i32",
                     "stride_dxm": "i32", "stride_dxk": "constexpr"}
        aligned = ("dx_ptr", "col_ptr_ptr", "row_idx_ptr", "stride_dxm")
        extra = {"stride_dxk": 1}
    elif kernel == "grad_weight":
        slots = {"w_ptr": f"*{e}", "dw_ptr": f"*{e}", "scores_ptr": "*fp32", "ws_ptr": "*fp32",
                 "slot_row_ptr": "*i32", "col_idx_ptr": "*i32", "live_count_ptr": "*i32"}
        if device_descriptors:
            fn = grad_weight_tma_device_kernel
            signature = {"dy_ptr": f"*{e}", "x_ptr": f"*{e}", **slots, "M": "i32", "N": "i32", "K": "i32",
                         "m_chunk": "i32", "capacity": "i32", "num_block_cols": "i32", "stride_dym": "i32",
                         "stride_xm": "i32"}
            aligned = ("dy_ptr", "x_ptr", "N", "K", "stride_dym", "stride_xm")
        else:
            fn = grad_weight_tma_kernel
            signature = {"dy_desc": f"tensordesc<{e}[{cfg.block_m},{block_size}]>",
                         "x_desc": f"tensordesc<{e}[{cfg.block_m},{block_size}]>", **slots, "M": "i32",
                         "m_chunk": "i32", "capacity": "i32", "num_block_cols": "i32"}
            aligned = ()
        signature.update({"stride_wn": "i32", "stride_wk": "constexpr", "stride_dwn": "i32",
                          "stride_dwk": "constexpr"})
        aligned += ("w_ptr", "dw_ptr", "scores_ptr", "ws_ptr", "slot_row_ptr", "col_idx_ptr", "stride_wn",
                    "stride_dwn")
        extra = {"stride_wk": 1, "stride_dwk": 1, "SALIENCY": 1, "SPLIT": 1}
    else:
        raise ValueError(f"agpe aot: expected kernel 'forward', 'grad_input' or 'grad_weight', got {kernel!r}")
    constants = {"BLOCK_SIZE": block_size, "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
                 "INPUT_PRECISION": "tf32" if dtype == "fp32" else "ieee", "UPCAST": False, **extra}
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    signature.update({name: "constexpr" for name in constants if name not in signature})
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    usage, sass = _inspect(compiled.asm["cubin"], os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin"))
    return {"kernel": kernel, "shared_bytes": compiled.metadata.shared, "registers": usage["REG"],
            "spill_bytes": usage["LOCAL"], "tma_loads": sass.count("UTMALDG"), "wgmma": sass.count("HGMMA")}


def _kernel(name: str):
    if name not in (*KERNELS, "grad_weight_finish"):
        raise ValueError(f"agpe aot: expected kernel in {KERNELS} or 'grad_weight_finish', got {name!r}")
    import importlib

    module = "grad_weight" if name == "grad_weight_finish" else name
    return getattr(importlib.import_module(f".{module}", __package__), f"{name}_kernel")


def _inspect(cubin: bytes, bindir: str):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|LOCAL):(\d+)", usage)}, sass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--block-sizes", default="32,64,128")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    args = parser.parse_args()
    for kernel in args.kernels.split(","):
        for block_size in map(int, args.block_sizes.split(",")):
            for dtype in args.dtypes.split(","):
                report = dataclasses.asdict(compile_for_target(kernel, block_size, dtype))
                print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
