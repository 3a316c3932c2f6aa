"""Replays the smoothed loss (loss_smoothing 0.5) of every kept AGPE audit log and prints, at each
prune, how far the smoothed loss was above its lowest value so far (Note [Worse than its best]).
Run from the repository root: python benchmarks/results/2026-11-29-cpu-adaptive-schedule-session35/gaps.py"""
import glob, json

paths = sorted(p for p in glob.glob("benchmarks/results/**/*.jsonl*", recursive=True)
               if '"policy": "agpe"' in open(p).readline())
total = over = 0
for path in paths:
    s = best = None
    rows = []
    for line in open(path):
        d = json.loads(line)
        if d.get("event") != "interval" or d.get("loss") is None:
            continue
        s = d["loss"] if s is None else 0.5 * s + 0.5 * d["loss"]
        best = s if best is None else min(best, s)
        gap = (s - best) / abs(best)
        if (d.get("schedule") or "").startswith("prune:") and d["schedule"] != "prune:deadline":
            total += 1
            over += gap > 0.05
            rows.append(f"  step {d['step']:5d} {d['schedule']:16s} loss {d['loss']:.4f} smoothed {s:.4f} above best {gap:.3f}")
    print(path)
    print("\n".join(rows))
print(f"{total} prunes (not the deadline's) in {len(paths)} logs; smoothed loss more than 5% above its best at {over}")
