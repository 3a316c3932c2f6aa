import time, torch, math, itertools, sys, json
from agpe_compile import kernels
from agpe_compile.layout import DEFAULT_BUCKETS, build_layout
from agpe_compile.packed_layout import build_packed
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
for m, (n, k), b, d in itertools.product([128, 512, 2048], [(768, 768), (1536, 512), (512, 1536)], [32, 64, 128], [0.1, 0.15, 0.25, 0.35, 0.5]):
    x, dy = torch.randn(m, k), torch.randn(m, n)
    weight = torch.randn(n, k) / k**0.5
    mask = random_mask(n // b, k // b, d, "cpu")
    w = weight * expanded(mask, b)
    res = {}
    for path in ("gather", "dense"):
        kernels.choose_cpu_path = lambda *a, p=path: p
        run, cap = op_step(x, w, mask, b, dy, True)
        res[path] = bench(run)
    kernels.choose_cpu_path = orig
    print(json.dumps(dict(m=m, n=n, k=k, b=b, d=d, capacity=cap, **res)), flush=True)
