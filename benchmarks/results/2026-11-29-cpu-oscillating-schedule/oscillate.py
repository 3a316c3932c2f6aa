"""An AGPE schedule made to oscillate (loss tripled every other 100 steps, max_backoffs=1000,
patience 1, cooldown 0) on an MLP of five block-32 agpe layers: compiled graphs and distinct
(target, layout buckets) sets as the run goes (twenty-ninth session, Note [Layouts a target
had before]). Run from the repository root with the code to measure on PYTHONPATH:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/results/2026-11-29-cpu-oscillating-schedule/oscillate.py 6000
"""
import platform
import sys, time
import torch, torch.nn as nn, torch.nn.functional as F
import agpe_compile
from agpe_compile import Sparsifier, AGPEConfig
from agpe_compile.state import layer_states
torch.manual_seed(0)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
cfg = AGPEConfig(policy="agpe", target_sparsity=0.9, block_size=32, update_interval=5, end_step=10**6,
                 max_backoffs=1000, patience=1, cooldown=0, exclude=("10",))
backend = agpe_compile.AgpeBackend({"inductor": False})
sp = Sparsifier(model, opt, cfg)
cm = torch.compile(model, backend=backend)
W = torch.randn(256, 10)
sets, targets = set(), set()
t0 = time.perf_counter()
for step in range(steps):
    x = torch.randn(64, 256); y = (x @ W).argmax(1)
    loss = F.cross_entropy(cm(x), y)
    loss.backward(); opt.step(); opt.zero_grad()
    sp.step(loss * (3.0 if (step // 100) % 2 else 1.0))
    if step % 50 == 0:
        with torch.no_grad(): cm(x)
    states = layer_states(model)
    sets.add((sp.target_density, tuple(s.layout_bucket for s in states.values())))
    targets.add(sp.target_density)
    if (step + 1) % (steps // 6) == 0:
        print(f"step {step+1} graphs {backend.graph_count} bucket sets {len(sets)} targets {sorted(targets)} {time.perf_counter()-t0:.0f}s", flush=True)
print(f"torch {torch.__version__}, {platform.machine()}, agpe_compile from {agpe_compile.__file__}")
