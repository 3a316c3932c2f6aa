"""Prints a sweep's BSR / dense ratios (forward/dX) per block, shape and row count."""
import json
import sys
from collections import defaultdict

rows = json.load(open(sys.argv[1]))["rows"]
table = defaultdict(dict)
for r in rows:
    table[(r["block"], r["n"], r["k"], r["m"])][r["density"]] = (r["fwd_ratio"], r["dx_ratio"])
print("block, N, K, rows | BSR / dense (forward/dX) at each measured density")
for key, v in sorted(table.items()):
    print(key, "  ".join(f"d{d:.2f}: {f:.2f}/{x:.2f}" for d, (f, x) in sorted(v.items())))
