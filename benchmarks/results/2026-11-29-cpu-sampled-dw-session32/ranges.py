"""Sampled / dense dW ratio ranges per block size and density (rounded to the sweep's targets),
over shapes and row counts: python ranges.py sweep_t1.jsonl [sweep_t2.jsonl ...]"""
import collections
import json
import statistics
import sys

for path in sys.argv[1:]:
    rows = [json.loads(line) for line in open(path)]
    groups = collections.defaultdict(list)
    for r in rows:
        target = min((0.05, 0.1, 0.2, 0.3, 0.5), key=lambda d: abs(d - r["density"]))
        groups[(r["block"], target)].append(r["ratio"])
    print(f"{path}: {rows[0]['threads']} thread(s), {len(rows)} layers")
    for (b, d), ratios in sorted(groups.items()):
        print(f"  block {b:3d} density {d:.2f}: sampled/dense {min(ratios):.2f}-{max(ratios):.2f} "
              f"(median {statistics.median(ratios):.2f}, {len(ratios)} layers)")
