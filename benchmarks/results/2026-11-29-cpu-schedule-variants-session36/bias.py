"""Re-audit DB's check: inside the schedule (flat loss, 100 updates, 200 seeds), the noise estimate's
sigma (loss_noise / 1.954) over the true relative noise at the last update, and the update of the
first estimate."""
import math, random, statistics as S
from agpe_compile.controller.adaptive_schedule import AdaptiveSchedule, Feedback
K = math.sqrt(6.0) * math.sqrt(2.0 / math.pi)
for noise in (0.05, 0.10, 0.15, 0.25):
    ratios, firsts = [], []
    for seed in range(200):
        r = random.Random(seed); s = AdaptiveSchedule(1.0, 0.1, end_step=10000, update_interval=100)
        st = s.initial_state(); first = None
        for i in range(100):
            st = s.next_state(st, (i + 1) * 100, Feedback(loss=1.0 + r.gauss(0, noise)))
            if first is None and st.loss_noise is not None:
                first = i + 1
        firsts.append(first or 101)
        if st.loss_noise is not None:
            ratios.append(st.loss_noise / K / noise)
    q = sorted(ratios)
    print(f"flat noise {noise}: sigma estimate / true at update 100: median {S.median(q):.2f} p10 {q[len(q)//10]:.2f} "
          f"p90 {q[9*len(q)//10]:.2f}; first estimate at update median {S.median(firsts):.0f} max {max(firsts)}")
