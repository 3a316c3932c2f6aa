"""Real model: a learning-rate blow-up for one update interval (a real loss spike).
Print the schedule's events around it, for a run without the spike and with it."""
import sys, logging, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from harness import *
def go(spike_from):
    torch._dynamo.reset()
    cfg = AGPEConfig(target_sparsity=0.9, block_size=16, exclude=("head",), update_interval=10, end_step=600,
                     max_backoffs=2)
    model, o, sp, cm = make(cfg)
    ev, ls = [], []
    for i, (x, y) in enumerate(data(200)):
        lr = 0.3 if spike_from is not None and spike_from <= i < spike_from + 10 else 3e-3
        for g in o.param_groups: g["lr"] = lr
        ls.append(step(cm, o, sp, x, y))
        if sp.step_count % 10 == 0:
            ev.append((sp.step_count, round(sum(ls[-10:]) / 10, 3), sp.target_density, sp.schedule_state.event))
    return ev
runs = {s: go(s) for s in (None, 90, 100)}
for s, ev in runs.items():
    print(f"--- lr spike at steps {s}..{None if s is None else s + 9}")
    for e in ev[6:18]: print("   step %3d mean loss %.3f target %.2f %s" % e)
