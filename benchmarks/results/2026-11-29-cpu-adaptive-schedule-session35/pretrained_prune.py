"""Closed loop, real model: a small MLP trained dense to convergence (600 Adam steps on a fixed
teacher task), then pruned with policy 'agpe' to 90 % sparsity (update_interval 10, end_step 400,
440 steps). Run once with PYTHONPATH at the old tree and once at the new one; prints the
schedule per update, when the final density is first reached, and how many rungs the deadline did."""
import sys, torch, torch.nn.functional as F, warnings
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from harness import MLP, data
import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier
warnings.simplefilter("ignore")
seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 64
torch.manual_seed(seed)
model = MLP()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
stream = data(10**6, seed=seed, rows=rows)
for i in range(600):
    x, y = next(stream)
    loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
policy = sys.argv[4] if len(sys.argv) > 4 else "agpe"
cfg = AGPEConfig(policy=policy, target_sparsity=0.9, block_size=16, exclude=("head",), update_interval=10, end_step=400)
sp = Sparsifier(model, opt, cfg)
cm = torch.compile(model, backend=agpe_compile.AgpeBackend({"inductor": False}))
ls, ev = [], []
total = int(sys.argv[3]) if len(sys.argv) > 3 else 440
for i in range(total):
    x, y = next(stream)
    loss = F.cross_entropy(cm(x), y); loss.backward(); opt.step(); opt.zero_grad(); sp.step(loss.detach())
    ls.append(float(loss))
    if sp.step_count % 10 == 0:
        ev.append((sp.step_count, sum(ls[-10:]) / 10, sp.target_density, sp.schedule_state.event if sp.schedule_state else "fixed:gmp"))
reach = next(s for s, _, d, _ in ev if abs(d - 0.1) < 1e-3)
dl = sum(e == "prune:deadline" for s_, *_, e in ev if s_ <= 400)
import statistics
print(f"seed {seed} rows {rows}: first at 0.1 at step {reach}, deadline prunes {dl}, backoffs {sum(e.startswith('backoff') for *_, e in ev)}, "
      f"hold:worse {sum(e == 'hold:worse' for *_, e in ev)}, mean target {statistics.mean(d for _, _, d, _ in ev):.3f}, "
      f"loss first 5 intervals {[round(l, 3) for _, l, _, _ in ev[:5]]}, last 4 {[round(l, 3) for _, l, _, _ in ev[-4:]]}, mean of the last 10 intervals {statistics.mean(l for _, l, _, _ in ev[-10:]):.3f}")
print("   " + " ".join(f"{s}:{d:g}:{e.split(':')[1][:4]}" for s, l, d, e in ev))
