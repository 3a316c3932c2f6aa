"""Experiment: does a regrown block's inherited Adam step count matter? char_lm --quick with
torch AdamW (inherited step: the library's behaviour) vs an AdamW with a per-element step
count that the Sparsifier's optimizer-state reset zeroes on changed blocks (a regrown block's
bias correction is a fresh parameter's). Usage: run.py {torch|fresh} -- <char_lm args>"""
import math, os, sys
import torch
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/examples")
import char_lm


class FreshStepAdamW(torch.optim.AdamW):
    """AdamW whose bias correction uses a per-element step count ``elem_step`` (weight-shaped,
    so the Sparsifier resets it to 0 on dropped/regrown blocks)."""
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                    st["elem_step"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["elem_step"].add_(1)
                g = p.grad
                p.mul_(1 - group["lr"] * group["weight_decay"])
                st["exp_avg"].lerp_(g, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1 = 1 - torch.pow(b1, t)
                bc2 = 1 - torch.pow(b2, t)
                denom = (st["exp_avg_sq"] / bc2).sqrt_().add_(group["eps"])
                p.addcdiv_(st["exp_avg"] / bc1, denom, value=-group["lr"])


if __name__ == "__main__":
    mode = sys.argv[1]
    assert mode in ("torch", "fresh")
    if mode == "fresh":
        char_lm.torch.optim.AdamW = FreshStepAdamW  # char_lm builds torch.optim.AdamW(...)
    char_lm.main(sys.argv[3:])
