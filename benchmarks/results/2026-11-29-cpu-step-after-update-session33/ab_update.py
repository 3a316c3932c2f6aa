"""In-process A/B of the thirty-third session's update-path changes on the main job's agpe run:
each mask update (and the step after it) runs with the old or the new functions in turn.

    N=19 python benchmarks/results/2026-11-29-cpu-step-after-update-session33/ab_update.py

N pairs of update intervals after step 300 (19: the last update before the schedule's end
step, 702, in quick mode)."""
import os
__file__ = os.path.abspath(__file__)
exec(open(os.path.join(os.path.dirname(__file__), "breakdown.py")).read().split("runs = {m")[0])
import json, random
import importlib.util
from agpe_compile.ops import sampled_grad
from agpe_compile.controller import drop_grow, optimizer_state
from agpe_compile.ops.reference import expand_block_mask
import agpe_compile.controller.sparsifier as sparsifier_mod

def old_pattern(block_mask, b):
    elements = block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return elements.to(torch.float32).to_sparse_csr(), elements.reshape(-1).nonzero().squeeze(1)
def old_pick(candidates, score, count, lowest, last=None):
    index = torch.nonzero(candidates).reshape(-1)
    order = torch.sort(score[index], descending=not lowest, stable=True).indices
    if last is not None:
        order = order[torch.sort(last[index][order].to(torch.uint8), stable=True).indices]
    return index[order[:count]]
def old_zero(optimizer, weight, blocks, block_size):
    if optimizer is None: return []
    state = optimizer.state.get(weight)
    if not state: return []
    touched, element_mask = [], None
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == weight.shape:
            if element_mask is None:
                element_mask = expand_block_mask(blocks.to(value.device), block_size, torch.bool)
            value.masked_fill_(element_mask, optimizer_state._fresh_value(optimizer, weight, key))
            touched.append(key)
    return touched
new = (sampled_grad._pattern, drop_grow._pick, sparsifier_mod.zero_optimizer_state)
old = (old_pattern, old_pick, old_zero)
def use(fns):
    sampled_grad._pattern, drop_grow._pick, sparsifier_mod.zero_optimizer_state = fns
r = setup("agpe")
run(r, 300)
rng = random.Random(0)
res = {"old": {"update_ms": [], "next_step_ms": []}, "new": {"update_ms": [], "next_step_ms": []}}
for i in range(int(os.environ.get("N", "40"))):
    which = ("old", "new") if i % 2 == 0 else ("new", "old")
    for name in which:
        use(old if name == "old" else new)
        run(r, 9 - (r["step"] % 10) if r["step"] % 10 != 9 else 0)  # up to the step before the update
        t = {}
        run(r, 1, t)  # the update step: its sparsifier time
        res[name]["update_ms"].append(t["sparsifier"][0])
        t = {}
        run(r, 1, t)  # the step after: rebuilds what the new masks derive
        res[name]["next_step_ms"].append(t["total"][0])
use(new)
for name, v in res.items():
    print(name, {k: (round(statistics.median(x), 2), round(statistics.mean(x), 2)) for k, x in v.items()})
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": res}))
