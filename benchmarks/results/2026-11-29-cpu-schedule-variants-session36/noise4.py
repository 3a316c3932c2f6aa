"""Thirty-sixth session, after audit DA: the noise-aware schedule (the tree on PYTHONPATH, noise_z=2)
against the same code with noise_z=0 (the rule before Note [Noise in the loss]) on synthetic losses,
200 seeds per row, 100 updates (end_step 10000, interval 100). Scenarios: a flat or falling loss with
noise; 'rung d': every rung below the top multiplies the loss by (1 + d) (a back-off undoes it: audit
DA's model of damage); 'spike': one interval 3x at a random update 3-30; 'alternating': +-e by update.
Columns: first update at the final density (median / max), mean density, mean loss over the run,
loss-driven events (backoff:loss + hold:worse, mean)."""
import random, statistics as S, sys
from agpe_compile.controller.adaptive_schedule import AdaptiveSchedule, Feedback

def run(z, seed, noise=0.0, kind="flat", rung_cost=0.0, spike=False, alternating=0.0, smoothing=0.5):
    r = random.Random(seed)
    s = AdaptiveSchedule(1.0, 0.1, end_step=10000, update_interval=100, noise_z=z, loss_smoothing=smoothing)
    st = s.initial_state(); dens, losses, events = [], [], []
    spike_at = r.randint(3, 30) if spike else -1
    for i in range(100):
        base = 2.0 * 0.97 ** i + 0.5 if kind == "fall" else 1.0
        loss = base * (1 + rung_cost) ** st.rung * (1 + r.gauss(0, noise))
        loss *= 1 + alternating * (-1) ** i
        if i == spike_at:
            loss *= 3.0
        losses.append(loss)
        st = s.next_state(st, (i + 1) * 100, Feedback(loss=loss))
        dens.append(s.density(st)); events.append(st.event)
    first = dens.index(0.1) + 1 if 0.1 in dens else 101
    return first, S.mean(dens), S.mean(losses), sum(e in ("backoff:loss", "hold:worse") for e in events)

def row(label, **kw):
    out = []
    for z in (0.0, 2.0):
        res = [run(z, sd, **kw) for sd in range(200)]
        f = sorted(x[0] for x in res)
        out.append(f"z={z:g}: final@ {S.median(f):4.0f} max {f[-1]:3d} dens {S.mean(x[1] for x in res):.3f} "
                   f"loss {S.mean(x[2] for x in res):.4f} worse {S.mean(x[3] for x in res):5.2f}")
    print(f"{label:38s} " + " | ".join(out), flush=True)

if __name__ == "__main__":
    for n in (0.02, 0.05, 0.10, 0.15):
        row(f"flat noise {n}", noise=n)
    row("flat noise 0.15 smoothing 0", noise=0.15, smoothing=0.0)
    row("fall noise 0.10", noise=0.10, kind="fall")
    for d, n in ((0.10, 0.01), (0.08, 0.02), (0.08, 0.05), (0.05, 0.05)):
        row(f"rung {d} noise {n}", noise=n, rung_cost=d)
    row("rung 0.10 noise 0.01 spike 3x", noise=0.01, rung_cost=0.10, spike=True)
    row("flat noise 0.05 spike 3x", noise=0.05, spike=True)
    row("rung 0.08 alternating 0.03", noise=0.0, rung_cost=0.08, alternating=0.03)
    row("rung 0.08 alternating 0.05", noise=0.0, rung_cost=0.08, alternating=0.05)
