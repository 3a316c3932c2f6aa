"""Block 32 on the CPU: the path each rule takes for every row of calib_t{1,2}.jsonl, and the time
it loses against the fastest of the three measured paths.

    python benchmarks/results/2026-11-29-cpu-bsr-block32-session32/rule.py            # calib_t1/_t2.jsonl
    python benchmarks/results/2026-11-29-cpu-bsr-block32-session32/rule.py holdout   # holdout_t1/_t2.jsonl
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from agpe_compile.ops import bsr_path  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def shipped_before(r):  # fa978eb: the cost model's pick; no BSR product at block 32
    return r["pick"]


def shipped_now(r):  # ops/paths.py choose() + dense_path's worth_it at this commit
    numel, threads, m = r["n"] * r["k"], r["threads"], r["m"]
    if r["pick"] == "gather" and bsr_path.replaces_gather(m, numel, r["capacity"], 32, threads):
        return "dense_bsr"
    if r["pick"] == "dense" and r["live"] <= bsr_path.max_density(m, numel, threads, 32):
        return "dense_bsr"
    return r["pick"]


prefix = sys.argv[1] if len(sys.argv) > 1 else "calib"
for threads in (1, 2):
    rows = [json.loads(line) for line in open(os.path.join(HERE, f"{prefix}_t{threads}.jsonl"))]
    rows = [r for r in rows if r["b"] == 32]
    print(f"{threads} thread(s), block 32, {len(rows)} layers")
    for name, rule in (("before", shipped_before), ("now", shipped_now)):
        lost = [r[rule(r)] / min(r["gather"], r["dense"], r["dense_bsr"]) - 1 for r in rows]
        big = [x for x, r in zip(lost, rows) if r["n"] * r["k"] >= 2**19]
        changed = sum(rule(r) != shipped_before(r) for r in rows)
        print(f"  {name:<7} time lost vs the fastest: mean {statistics.mean(lost):6.1%} worst {max(lost):6.1%}; "
              f"weights >= 2^19: mean {statistics.mean(big):6.1%} worst {max(big):6.1%}; path changed on {changed}")
    for r in rows:
        a, b = shipped_before(r), shipped_now(r)
        if a != b:
            print(f"    {r['n']}x{r['k']} m {r['m']} live {r['live']:.3f} cap {r['capacity']:.3f}: {a} {r[a]:.2f} ms "
                  f"-> {b} {r[b]:.2f} ms ({r[b] / r[a]:.2f})")
