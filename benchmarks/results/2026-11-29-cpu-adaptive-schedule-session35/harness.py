"""Shared harness: small MLP of very different layer sizes, aot_eager backend, real losses."""
import logging, math, json, os, sys
import torch, torch.nn.functional as F
from torch import nn
import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.ops.reference import expand_block_mask

class MLP(nn.Module):
    def __init__(self, d_in=64, h=256, h2=32, out=16):
        super().__init__()
        self.fc1 = nn.Linear(d_in, h)
        self.fc2 = nn.Linear(h, h)
        self.fc3 = nn.Linear(h, h2)
        self.head = nn.Linear(h2, out)
    def forward(self, x):
        x = F.relu(self.fc1(x)); x = F.relu(self.fc2(x)); x = F.relu(self.fc3(x))
        return self.head(x)

def data(n, seed=0, rows=64, d_in=64, out=16):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d_in, out, generator=g)
    for _ in range(n):
        x = torch.randn(rows, d_in, generator=g)
        yield x, (x @ teacher).argmax(1)

def make(cfg, opt="adam", seed=0, model_cls=MLP, **mk):
    torch.manual_seed(seed)
    model = model_cls(**mk)
    if opt == "adam":
        o = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:
        o = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    backend = agpe_compile.AgpeBackend({"inductor": False})
    sp = Sparsifier(model, o, cfg)
    return model, o, sp, torch.compile(model, backend=backend)

def step(cmodel, o, sp, x, y, loss_fn=None, give_loss=True):
    loss = F.cross_entropy(cmodel(x), y)
    if loss_fn is not None:
        loss_pass = loss_fn(loss)
    else:
        loss_pass = loss
    loss.backward(); o.step(); o.zero_grad()
    sp.step(loss_pass.detach() if give_loss else None)
    return float(loss)

def masks(sp):
    return {n: s.block_mask.clone() for n, s in sp.layers.items()}

def inactive_nonzero(sp):
    bad = {}
    for n, s in sp.layers.items():
        el = expand_block_mask(~s.block_mask, s.block_size, torch.bool)
        v = int((s.weight.detach()[el] != 0).sum())
        if v: bad[n] = v
    return bad
