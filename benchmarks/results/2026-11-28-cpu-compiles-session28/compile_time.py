import runpy, sys, time
import torch._dynamo.utils as u
METHODS = sys.argv[1] if len(sys.argv) > 1 else "agpe"
sys.argv = ["fashion_mnist.py", "--quick", "--methods", sys.argv[1] if len(sys.argv) > 1 else "agpe", "--out", "/tmp/ctime_out"]
t = time.perf_counter()
try:
    runpy.run_path("examples/fashion_mnist.py", run_name="__main__")
except SystemExit:
    pass
m = u.compilation_time_metrics
keys = [k for k in m if "compile_inner" in k or k in ("_compile.compile_inner",)]
print({k: (len(m[k]), round(sum(m[k]), 2)) for k in keys}, "total", round(time.perf_counter() - t, 1))
