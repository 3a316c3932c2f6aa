"""Ranges of sampled / dense (best of rounds) over the classes of sampled_grad's envelope, from
envelope_t1_part*.txt and envelope_t2.txt: python ranges.py"""
import glob
import re

LINE = re.compile(r"^(\d+) (\d+) rows (\d+) b (\d+) d ([\d.]+): .* ratio_best ([\d.]+) ratio_median ([\d.]+)")


def load(pattern):
    """The points of the files, each (shape, rows, block, density) once: the first measurement
    (1000 x 784 at 32 rows, block 8, is in part1 and part2)."""
    out, seen = [], set()
    for path in sorted(glob.glob(pattern)):
        for line in open(path):
            m = LINE.match(line)
            if m:
                n, k, rows, b = (int(v) for v in m.groups()[:4])
                key = (n, k, rows, b, m.group(5))
                if key in seen:
                    continue
                seen.add(key)
                out.append((n, k, rows, b, float(m.group(5)), float(m.group(6)), float(m.group(7))))
    return out


def show(name, data, keep):
    sel = [r for r in data if keep(*r[:5])]
    if not sel:
        print(f"{name}: none")
        return
    best = [r[5] for r in sel]
    print(f"{name}: n={len(sel)} best {min(best):.2f}-{max(best):.2f}, lost (best > 1) {sum(b > 1 for b in best)}")


for threads, pattern in ((1, "envelope_t1_part*.txt"), (2, "envelope_t2.txt")):
    data = load(pattern)
    print(f"-- {threads} thread(s): {len(data)} points")
    for d in (0.1, 0.16):
        show(f"128x128, d={d}", data, lambda n, k, r, b, dd: n * k == 128 * 128 and dd == d)
        show(f"rows 32, W>=600k, d={d}", data, lambda n, k, r, b, dd: r == 32 and n * k >= 600_000 and dd == d)
        show(f"rows 32, W<600k, d={d}", data, lambda n, k, r, b, dd: r == 32 and n * k < 600_000 and dd == d)
        show(f"rows 128-2048, W>=600k, d={d}", data, lambda n, k, r, b, dd: 128 <= r <= 2048 and n * k >= 600_000 and dd == d)
        show(f"rows 128-2048, 65536<=W<600k, d={d}", data, lambda n, k, r, b, dd: 128 <= r <= 2048 and 65_536 <= n * k < 600_000 and dd == d)
        show(f"rows 128-4096, W>=784k, d={d}", data, lambda n, k, r, b, dd: 128 <= r <= 4096 and n * k >= 784_000 and dd == d)
        show(f"rows 128-4096, W<784k, d={d}", data, lambda n, k, r, b, dd: 128 <= r <= 4096 and n * k < 784_000 and dd == d)
        show(f"rows 4096, W>=600k, d={d}", data, lambda n, k, r, b, dd: r == 4096 and n * k >= 600_000 and dd == d)
        show(f"rows 4096, W<600k, d={d}", data, lambda n, k, r, b, dd: r == 4096 and n * k < 600_000 and dd == d)
        show(f"rows 8192, W>=784k, d={d}", data, lambda n, k, r, b, dd: r == 8192 and n * k >= 784_000 and dd == d)
        show(f"rows 8192, W<784k, d={d}", data, lambda n, k, r, b, dd: r == 8192 and n * k < 784_000 and dd == d)
