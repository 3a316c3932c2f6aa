"""Ordinary noisy training: does any rule hold pruning for long? new (51ec167) vs pre-CV (f3750f9~1) vs f3750f9.
Defaults, 100 updates (end_step 10000, interval 100), ladder 1.0..0.1 (6 rungs). 200 seeds per row.
Columns: first update at final density (median / p90 / max), mean density, longest run of updates without a
prune before the final density (median / max), deadline rungs (mean), back-offs (mean), hold:worse (mean)."""
import os, random, statistics as S, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "2026-11-29-cpu-adaptive-schedule-session35", "noise_cy"))
from simlib import NEW, OLD, _load  # NEW: the tree on PYTHONPATH (b9ea4b5), OLD: the rule before audit CV
V2 = _load(os.path.join(HERE, "v2.py"), "v2"); V3 = _load(os.path.join(HERE, "v3.py"), "v3")  # see README.md
def scen(kind, i, r, noise, level):
    if kind == 'fall': base = 2.0 * 0.97 ** i + 0.5
    elif kind == 'fast': base = 2.0 * 0.85 ** i + 0.3
    elif kind == 'flat': base = 1.0
    return base * level * (1 + r.gauss(0, noise))
def sim(M, kind, noise, seed, lasting=0.0, **kw):
    r = random.Random(seed); s = M.AdaptiveSchedule(1.0, 0.1, end_step=10000, update_interval=100, **kw)
    st = s.initial_state(); ds, ev, level = [], [], 1.0
    for i in range(100):
        st = s.next_state(st, (i + 1) * 100, M.Feedback(loss=scen(kind, i, r, noise, level)))
        if st.event.startswith('prune'): level *= (1 + lasting) ** 1
        ds.append(s.density(st)); ev.append(st.event)
    first = ds.index(0.1) + 1
    gaps, g = [], 0
    for e, d in zip(ev[:first], ds[:first]):
        if e.startswith('prune'): gaps.append(g); g = 0
        else: g += 1
    dead = sum(1 for j, e in enumerate(ev) if e == 'prune:deadline')
    return first, S.mean(ds), max(gaps) if gaps else 0, dead, sum(e.startswith('backoff') for e in ev), ev.count('hold:worse')
def row(label, kind, noise, lasting=0.0, **kw):
    for name, M in (('old', OLD), ('new', NEW), ('v2', V2), ('v3', V3)):
        res = [sim(M, kind, noise, sd, lasting, **kw) for sd in range(200)]
        f = sorted(x[0] for x in res); gp = sorted(x[2] for x in res)
        print(f"{label:34s} {name}: final@ med {S.median(f):4.0f} p90 {f[179]:3d} max {f[-1]:3d} | mean dens {S.mean(x[1] for x in res):.3f} | "
              f"longest no-prune gap med {S.median(gp):3.0f} max {gp[-1]:3d} | deadline {S.mean(x[3] for x in res):.2f} | "
              f"backoffs {S.mean(x[4] for x in res):.2f} | hold:worse {S.mean(x[5] for x in res):.2f}")
if __name__ == "__main__":
    for kind in ('fall', 'fast', 'flat'):
        for noise in (0.02, 0.05, 0.10, 0.15):
            row(f'{kind} noise {noise}', kind, noise)
    for k in (0.03, 0.08):
        for noise in (0.02, 0.05, 0.10):
            row(f'flat lasting {k} noise {noise}', 'flat', noise, lasting=k)
    row('flat noise 0.10 cooldown 0', 'flat', 0.10, cooldown=0)
    row('flat noise 0.10 patience 1', 'flat', 0.10, patience=1)
    row('flat noise 0.10 smoothing 0.9', 'flat', 0.10, loss_smoothing=0.9)
    row('flat noise 0.15 smoothing 0', 'flat', 0.15, loss_smoothing=0.0)
    row('fall noise 0.10 patience 4', 'fall', 0.10, patience=4)
