"""The library's noise-aware schedule at b27d4cb (on PYTHONPATH) against the exploration's v3.py (V3_MAX=1,
V3_Z=2: see README.md) on 2,400 synthetic runs: prints how many runs' events differ."""
import os, random, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "2026-11-29-cpu-adaptive-schedule-session35", "noise_cy"))
os.environ.update(V3_MAX="1", V3_Z="2.0")
from simlib import _load
V3 = _load(os.path.join(HERE, "v3.py"), "v3x")
from agpe_compile.controller import adaptive_schedule as NEW
diff = 0; total = 0
for kind in ("flat", "fall", "lasting"):
    for noise in (0.02, 0.05, 0.1, 0.15):
        for sd in range(200):
            evs = []
            for M in (V3, NEW):
                r = random.Random(sd); s = M.AdaptiveSchedule(1.0, 0.1, end_step=10000, update_interval=100)
                st = s.initial_state(); ev = []; level = 1.0
                for i in range(100):
                    base = 1.0 if kind != "fall" else 2.0 * 0.97 ** i + 0.5
                    st = s.next_state(st, (i + 1) * 100, M.Feedback(loss=base * level * (1 + r.gauss(0, noise))))
                    if kind == "lasting" and st.event.startswith("prune"): level *= 1.08
                    ev.append((st.event, st.rung))
                evs.append(ev)
            total += 1; diff += evs[0] != evs[1]
print("runs", total, "differing", diff)
