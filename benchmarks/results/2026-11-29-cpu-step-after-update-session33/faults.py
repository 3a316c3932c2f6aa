import sys, os, time, statistics, resource
HERE = os.path.dirname(os.path.abspath(__file__)); ROOT = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks")); sys.path.insert(0, ROOT)
import torch
torch.set_num_threads(2)
import cpu_step
for d in [float(a) for a in sys.argv[1:]]:
    steps = {k: cpu_step._step_fn(k, 1000, 3, 128, 8, d, "magnitude") for k in ("plain", "agpe")}
    out = {}
    for k, f in steps.items():
        for _ in range(5): f()
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; s = time.perf_counter()
        for _ in range(50): f()
        out[k] = ((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 50, (time.perf_counter() - s) / 50 * 1e3)
    print(d, {k: f"{v[0]:.0f} faults/step {v[1]:.1f} ms" for k, v in out.items()})
