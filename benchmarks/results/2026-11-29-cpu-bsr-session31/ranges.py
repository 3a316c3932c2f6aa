"""The ranges quoted in agpe_compile/ops/bsr_path.py and docs/benchmarks.md, from the kept
sweeps (both sweeps of a thread count): per layer, (BSR forward + BSR dX) / (dense forward
+ dense dX), the time a training step pays; and the worse of the two products alone."""
import json
import statistics


def rows(files):
    for f in files:
        yield from json.load(open(f))["rows"]


def span(rs):
    if not rs:
        return "none"
    total = [(r["fwd_bsr"] + r["dx_bsr"]) / (r["fwd_dense"] + r["dx_dense"]) for r in rs]
    worse = [max(r["fwd_ratio"], r["dx_ratio"]) for r in rs]
    return (f"layer {min(total):.2f}-{max(total):.2f} (median {statistics.median(total):.2f}); "
            f"worse product {min(worse):.2f}-{max(worse):.2f}; {len(rs)} cells")


def near(r, d):
    return abs(r["density"] - d) <= 0.01


def large(r):
    return r["n"] * r["k"] >= 2**22


one = list(rows(["sweep_t1.json", "sweep_t1_fine.json"]))
two = list(rows(["sweep_t2.json", "sweep_t2_fine.json"]))
for d in (0.05, 0.1, 0.125, 0.15):
    print(f"1 thread, d={d}: {span([r for r in one if near(r, d)])}")
for d in (0.05, 0.08, 0.1, 0.125, 0.15):
    print(f"2 threads, d={d}, weights of 2048 x 2048: {span([r for r in two if near(r, d) and large(r)])}")
    print(f"2 threads, d={d}, smaller weights, <= 256 rows: "
          f"{span([r for r in two if near(r, d) and not large(r) and r['m'] <= 256])}")
    print(f"2 threads, d={d}, smaller weights, > 256 rows: "
          f"{span([r for r in two if near(r, d) and not large(r) and r['m'] > 256])}")
