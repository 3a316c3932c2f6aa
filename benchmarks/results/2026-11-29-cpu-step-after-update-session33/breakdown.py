"""The main job's agpe training step vs plain torch.compile in one process (quick mode's
MLP, batch 128, SGD with momentum, update every 10 steps): agpe trains 300 steps (density
~0.1), then rounds of 20 steps alternate between the two; prints the median/mean of each part
of a step. BYPHASE=1 also prints the medians by step within the update interval (index 9:
the update step, 0: the step after it). T threads (2), R rounds (10).

    BYPHASE=1 python benchmarks/results/2026-11-29-cpu-step-after-update-session33/breakdown.py
"""
import sys, time, math, statistics, os
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, os.path.join(ROOT, "examples")); sys.path.insert(0, ROOT)
import torch, torch.nn.functional as F
import fashion_mnist as fm
import agpe_compile
from agpe_compile.controller import Sparsifier
torch.set_num_threads(int(os.environ.get("T", "2")))
args = fm.parse_args(["--quick", "--methods", "agpe", "--out", os.path.join(os.environ.get("TMPDIR", "/tmp"), "agpe_breakdown")])
x_train, y_train, x_test, y_test = fm.load_fashion_mnist(args.data_dir)
total = fm.total_steps(args, len(x_train))
def setup(method):
    torch.manual_seed(0)
    model = fm.MLP(args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    if method == "plain":
        sp, backend = None, fm.CountingBackend("aot_eager")
    else:
        config = fm.method_config(method, args, total, os.path.join(args.out, f"{method}.jsonl"))
        backend = agpe_compile.AgpeBackend({"inductor": False, "saliency": config.saliency})
        sp = Sparsifier(model, opt, config, recompile_counter=lambda: backend.graph_count)
    return dict(model=model, cm=torch.compile(model, backend=backend), opt=opt, sched=sched, sp=sp, step=0)
g = torch.Generator().manual_seed(0)
def run(r, n, times=None):
    for _ in range(n):
        idx = torch.randint(0, 60000, (128,), generator=g)
        t0 = time.perf_counter()
        loss = F.cross_entropy(r["cm"](x_train[idx]), y_train[idx]); t1 = time.perf_counter()
        loss.backward(); t2 = time.perf_counter()
        r["opt"].step(); t3 = time.perf_counter()
        r["opt"].zero_grad(set_to_none=True); r["sched"].step(); t4 = time.perf_counter()
        if r["sp"] is not None: r["sp"].step(loss)
        t5 = time.perf_counter()
        r["step"] += 1
        if times is not None:
            for k, v in zip(("fwd", "bwd", "opt", "zero+sched", "sparsifier", "total"), (t1-t0, t2-t1, t3-t2, t4-t3, t5-t4, t5-t0)):
                times.setdefault(k, []).append(v * 1e3)
runs = {m: setup(m) for m in ("plain", "agpe")}
run(runs["plain"], 20); run(runs["agpe"], 300)
print("agpe densities", {k: round(v, 3) for k, v in runs["agpe"]["sp"].densities().items()})
res = {m: {} for m in runs}
for rnd in range(int(os.environ.get("R", "10"))):
    for m in runs:
        run(runs[m], 20, res[m])
for m, t in res.items():
    print(m, "  ".join(f"{k} {statistics.median(v):.2f}/{statistics.mean(v):.2f}" for k, v in t.items()))
if os.environ.get("PROF"):
    from torch.profiler import profile, ProfilerActivity
    for m in runs:
        with profile(activities=[ProfilerActivity.CPU]) as p:
            run(runs[m], 40)
        print("=====", m)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
if os.environ.get("BYPHASE"):
    for m in runs:
        t = res[m]
        n = len(t["total"])
        for k in ("fwd", "bwd", "opt", "sparsifier", "total"):
            by = [statistics.median(t[k][i::10]) for i in range(10)]
            print(m, k, " ".join(f"{v:.1f}" for v in by))
