"""Find Inductor kernels that store one value to several outputs: copies of one tensor.

Reads Inductor's generated code (a ``TORCH_LOGS=output_code`` log, plain or gzipped, as
``benchmarks/gpu_session.sh`` writes it) and lists every Triton kernel that stores the same
computed value into more than one output pointer, with how often the graphs launch it.
The ninth session's H200 log had the fc1 GELU backward and the q/k/v gradient
concatenation written four times each, one copy per agpe kernel reading them (Note
[Kernel operands] in agpe_compile/kernels/launch.py); this checks a new log for them.

    python benchmarks/inductor_copies.py runs/gpu/output_code.txt.gz
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re
import sys
from typing import Dict, List, Tuple

_PREFIX = re.compile(r"^V\d{4} [^\]]*\] \[[^\]]*\] \[__output_code\] ?")
_KERNEL = re.compile(r"^\s*def (triton_\w+)\(")
_STORE = re.compile(r"tl\.store\((out_ptr\d+|in_out_ptr\d+) \+ [^,]*, (tmp\d+)")
_LAUNCH = re.compile(r"^\s*(triton_\w+)\.run\(")


def read(path: str) -> List[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        return [_PREFIX.sub("", line.rstrip("\n")) for line in f]


def copies(lines: List[str]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(kernel -> the most outputs one loaded value is stored to, where > 1; kernel -> launches).

    Each definition is looked at on its own (the logs of several graphs reuse kernel names;
    the largest count over the definitions of a name is kept). Kernels that load nothing
    (fills such as ``zeros``) are skipped: writing one constant to several new buffers
    copies nothing."""
    repeated: Dict[str, int] = {}
    launches: Dict[str, int] = collections.Counter()

    def close(kernel, counts, loads):
        if kernel is not None and loads and counts and max(counts.values()) > 1:
            repeated[kernel] = max(repeated.get(kernel, 0), max(counts.values()))

    kernel, counts, loads = None, collections.Counter(), False
    for line in lines:
        match = _KERNEL.match(line)
        if match:
            close(kernel, counts, loads)
            kernel, counts, loads = match.group(1), collections.Counter(), False
            continue
        if kernel is not None and "device_str=" in line:  # the end of the kernel's source
            close(kernel, counts, loads)
            kernel, counts, loads = None, collections.Counter(), False
            continue
        if kernel is not None and "tl.load(" in line:
            loads = True
        match = _STORE.search(line)
        if match and kernel is not None:
            counts[match.group(2)] += 1
            continue
        match = _LAUNCH.match(line)
        if match:
            launches[match.group(1)] += 1
            if kernel is not None:  # the kernel's source ended before the graph's call()
                close(kernel, counts, loads)
                kernel, counts, loads = None, collections.Counter(), False
    close(kernel, counts, loads)
    return repeated, dict(launches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="Inductor output code (TORCH_LOGS=output_code), .gz or plain")
    args = parser.parse_args(argv)
    try:
        lines = read(args.log)
    except OSError as error:
        parser.error(f"log: cannot read {args.log!r}: {error}")
    repeated, launches = copies(lines)
    if not any(_KERNEL.match(line) for line in lines):
        parser.error(f"log: no Triton kernel definitions in {args.log!r}; expected TORCH_LOGS=output_code output")
    if not repeated:
        print("no kernel stores one value to several outputs")
        return 0
    print(f"{'kernel':<70} {'copies':>6} {'launch sites':>12}")
    for name, count in sorted(repeated.items(), key=lambda item: -item[1]):
        print(f"{name:<70} {count:>6} {launches.get(name, 0):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
