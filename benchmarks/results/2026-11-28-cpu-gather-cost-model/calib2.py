import time, torch, math, itertools, sys, json
import torch.nn.functional as F
from agpe_compile import kernels
from agpe_compile.layout import DEFAULT_BUCKETS
from agpe_compile.packed_layout import build_packed
from agpe_compile.layout import build_layout
torch.set_num_threads(1)
sys.path.insert(0, "/work/main/benchmarks")
from kernels import random_mask, expanded

def bench(fn, reps=5):
    fn(); best = math.inf
    for _ in range(reps):
        t = time.process_time(); fn(); best = min(best, time.process_time() - t)
    return best * 1e3

def op_step(x, w, mask, b, dy, zero):
    layout, _ = build_packed(mask, b, DEFAULT_BUCKETS)
    rows, cols = mask.shape
    state = (torch.zeros(rows, cols), torch.zeros(rows, cols), torch.zeros((), dtype=torch.bool), torch.zeros(2, dtype=torch.int64))
    def run():
        xr = x.detach().requires_grad_(); wr = w.detach().requires_grad_()
        torch.ops.agpe.sparse_linear(xr, wr, None, mask, *state, layout, b, "taylor", zero).backward(dy)
    return run, build_layout(mask, b).capacity / (rows * cols)

orig = kernels.choose_cpu_path
rows = []
Ms = [int(a) for a in sys.argv[1].split(",")]
for m, nk, b, d in itertools.product(Ms, [int(v) for v in sys.argv[2].split(",")], [32, 64, 128], [0.15, 0.25, 0.35, 0.5]):
    x, dy = torch.randn(m, nk), torch.randn(m, nk)
    weight = torch.randn(nk, nk) / nk**0.5
    mask = random_mask(nk // b, nk // b, d, "cpu")
    w = weight * expanded(mask, b)
    res = {}
    for path, zero in (("gather", False), ("dense", False), ("dense", True)):
        kernels.choose_cpu_path = lambda *a, p=path: p
        run, cap = op_step(x, w, mask, b, dy, zero)
        res[f"{path}{'_zero' if zero else ''}"] = bench(run)
    kernels.choose_cpu_path = orig
    row = dict(m=m, nk=nk, b=b, d=d, capacity=cap, **res, pick=orig(m, nk, nk, cap, b))
    rows.append(row)
    print(json.dumps(row), flush=True)
