"""Recompute the char-LM runs' training-FLOP ratios with attention counted (helper audit BU).

The CPU runs logged attention as 0 FLOPs (torch's FlopCounterMode has no formula for the
CPU attention kernel), so their ``train_flops`` leave it out. Attention is the same in the
dense and the sparse run of a setting: add it to both, using torch's own formulas
(``torch.utils.flop_counter.sdpa_flop_count`` forward, ``sdpa_backward_flop_count``
backward) at each run's batch, heads, sequence and layers, times its steps. Arithmetic on
the kept results.json files, not a new run (docs/benchmarks.md, "CPU: character-level GPT
on the KJV text").

    python benchmarks/results/2026-11-27-cpu-char-lm-quick/attention_flops.py
"""

import json
import os

from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

RESULTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = [
    "2026-11-27-cpu-char-lm-quick/results.json",
    "2026-11-26-cpu-char-lm-2000/results.json",
    "2026-11-26-cpu-char-lm-d384-1000/prune-until-0.5/results.json",
    "2026-11-26-cpu-char-lm-d384-1000/prune-until-0.4/results.json",
    "2026-11-26-cpu-char-lm-d384-1000/prune-until-0.4-seed1/results.json",
    "2026-11-26-cpu-char-lm-d384-1000/prune-until-0.4-seed2/results.json",
    "2026-11-26-cpu-char-lm-d384-2000/results.json",
    "2026-11-26-cpu-char-lm-d384-2000/seed1/results.json",
    "2026-11-26-cpu-char-lm-d384-2000/seed2/results.json",
]


def attention_flops(setting: dict) -> int:
    """Attention FLOPs of the whole run: forward and backward, every layer, every step."""
    b, h, t = setting["batch"], setting["n_heads"], setting["seq_len"]
    shape = (b, h, t, setting["d_model"] // h)
    per_layer = sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)
    return per_layer * setting["n_layers"] * setting["steps"]


def main() -> None:
    print(f"{'results.json':<68} {'run':<8} {'as logged':>9} {'attention counted':>17}")
    for name in FILES:
        with open(os.path.join(RESULTS, name)) as f:
            data = json.load(f)
        extra = attention_flops(data["setting"])
        dense = next(r for r in data["runs"] if r["run"] == "dense")
        for run in data["runs"]:
            if run["run"] == "dense":
                continue
            logged = run["train_flops"] / dense["train_flops"]
            counted = (run["train_flops"] + extra) / (dense["train_flops"] + extra)
            print(f"{name:<68} {run['run']:<8} {logged:>9.3f} {counted:>17.3f}")


if __name__ == "__main__":
    main()
