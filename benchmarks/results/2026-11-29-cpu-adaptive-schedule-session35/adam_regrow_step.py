"""A block regrown under Adam gets its moments zeroed but keeps the parameter's step count,
so its bias correction is that of an old parameter: its first steps are several times lr,
unlike a fresh parameter (|step| = lr for a constant gradient)."""
import torch
from agpe_compile.controller.optimizer_state import zero_optimizer_state
lr = 1e-3
def steps_after_reset(t0, k=200):
    w = torch.zeros(4, 4, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(t0):            # the layer's history
        w.grad = torch.ones(4, 4); opt.step()
    with torch.no_grad(): w.zero_()   # the block is regrown: weight 0 ...
    zero_optimizer_state(opt, w, torch.ones(1, 1, dtype=torch.bool), 4)  # ... and moments 0, as the Sparsifier does
    out = []
    for i in range(k):
        before = w.detach().clone(); w.grad = torch.ones(4, 4); opt.step()
        out.append(float((w.detach() - before).abs().max()) / lr)
    return out
fresh = steps_after_reset(0)
old = steps_after_reset(2000)
for i in (0, 1, 9, 49, 99, 199):
    print(f"step {i+1:4d} after regrowth: |dw|/lr fresh param {fresh[i]:.2f}, regrown block (Adam step 2000) {old[i]:.2f}")
print("cumulative movement over 200 steps / lr: fresh %.1f, regrown %.1f" % (sum(fresh), sum(old)))
