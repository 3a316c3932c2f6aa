"""agpe's global optimizer hooks may be removed at any time (Note [One global optimizer hook])."""

import gc
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import agpe_compile
from agpe_compile import optimizer_hooks
from agpe_compile.controller import AGPEConfig, Sparsifier
from agpe_compile.controller import zero_code
from agpe_compile.ops.reference import expand_block_mask

from tests.controller.helpers import TinyMLP, batches


def _sgd_step():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones(2)
    return opt


def test_a_hook_removing_itself_and_a_later_one_during_the_step():
    calls = []
    handles = {}

    def first(optimizer, args, kwargs):
        calls.append("first")
        handles["first"].remove()
        handles["second"].remove()

    def second(optimizer, args, kwargs):
        calls.append("second")

    def user(optimizer, args, kwargs):  # a hook of the user's, registered with torch directly
        calls.append("user")

    handles["first"] = optimizer_hooks.register_step_post_hook(first)
    handles["second"] = optimizer_hooks.register_step_post_hook(second)
    user_handle = register_optimizer_step_post_hook(user)
    try:
        opt = _sgd_step()
        opt.step()  # raised "OrderedDict mutated during iteration" with torch's dict
        assert calls == ["first", "user"]  # the removed hook is not called
        opt.step()
        assert calls == ["first", "user", "user"]
        assert first not in optimizer_hooks.registered()
    finally:
        user_handle.remove()
        for handle in handles.values():
            handle.remove()


def test_agpe_hooks_run_in_order_and_copies_remove_nothing():
    # re-audit BI: closing a deep copy of a Sparsifier removed the original's hook
    import copy
    import pickle

    calls = []

    def agpe_hook(name):
        return lambda optimizer, args, kwargs: calls.append(name)

    first = optimizer_hooks.register_step_post_hook(agpe_hook("agpe 1"))
    second = optimizer_hooks.register_step_post_hook(agpe_hook("agpe 2"))
    try:
        copy.deepcopy(second).remove()
        pickle.loads(pickle.dumps(first)).remove()
        _sgd_step().step()
        assert calls == ["agpe 1", "agpe 2"]
    finally:
        first.remove()
        second.remove()


def test_a_sparsifier_created_inside_a_users_hook():
    # re-audit BJ: registering inside torch's hook loop mutated its dict too
    made = []

    def user_hook(optimizer, args, kwargs):
        if not made:
            made.append(Sparsifier(model, opt, AGPEConfig(target_sparsity=0.5, block_size=4)))

    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = register_optimizer_step_post_hook(user_hook)
    later = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: None)  # torch's loop goes on
    try:
        for x, y in batches(2):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert made
    finally:
        handle.remove()
        later.remove()
        if made:
            made[0].close()


def test_closing_a_copy_of_a_sparsifier_keeps_the_originals_zero_weights():
    import copy

    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sp = Sparsifier(model, opt, AGPEConfig(target_sparsity=0.75, block_size=4, update_interval=4, end_step=20,
                                            initial_density=0.5))
    copy.deepcopy(sp).close()
    x, y = next(batches(1))
    F.cross_entropy(model(x), y).backward()  # eager: gradients reach the inactive blocks
    opt.step()
    for state in sp.layers.values():
        inactive = expand_block_mask(state.block_mask, state.block_size, torch.float32) == 0
        assert inactive.any() and not state.weight.detach()[inactive].any(), state.name
    sp.close()


class _NoLinearFirst(nn.Module):
    """A first graph with no linear weight (embedding + norm), then a graph break."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, idx):
        h = self.norm(self.emb(idx))
        torch._dynamo.graph_break()
        return self.fc2(F.relu(self.fc1(h)))


def test_zero_code_nothing_to_prune_check_removes_itself_inside_the_step(monkeypatch):
    # the one-shot check of Note [Nothing to prune in zero-code mode] is armed by the first
    # graph (no linear layer); the second graph's controller hook comes after it
    monkeypatch.setattr(zero_code, "_CONTROLLERS_MADE", 0)
    monkeypatch.setattr(zero_code, "_WATCH", [])
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _NoLinearFirst()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cm = torch.compile(model, backend="agpe", options={
        "target_sparsity": 0.5, "block_size": 4, "update_interval": 2, "end_step": 8, "inductor": False})
    for _ in range(4):  # raised at the first optimizer.step()
        F.cross_entropy(cm(torch.randint(0, 50, (8,))), torch.randint(0, 8, (8,))).backward()
        opt.step()
        opt.zero_grad()
    agpe_compile.strip(model)
    torch._dynamo.reset()


class _Run:
    """A trainer-like object holding its own bound method: a reference cycle."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = TinyMLP()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.sp = Sparsifier(self.model, self.opt, AGPEConfig(
            target_sparsity=0.75, block_size=4, update_interval=4, end_step=20, patience=1, cooldown=0))
        self.cm = torch.compile(self.model, backend=agpe_compile.AgpeBackend({"inductor": False}))
        self.step_fn = self.step

    def step(self, x, y):
        loss = F.cross_entropy(self.cm(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.sp.step(loss)


class _Broken(TinyMLP):
    def forward(self, x):
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        torch._dynamo.graph_break()
        return self.fc3(h)


def test_dropped_sparsifier_collected_by_zero_code_inside_the_step():
    # zero-code collects garbage when another optimizer of its weights steps (Note [Zero-code
    # holds the optimizer weakly]); the dropped Sparsifier's finalizer then removes its hook
    # while the optimizer's hooks run
    torch._dynamo.reset()
    run = _Run()
    for x, y in batches(3):
        run.step_fn(x, y)
    gc.collect()
    ref = weakref.ref(run.sp)
    del run
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = _Broken()
    opt_body = torch.optim.AdamW(model.fc1.parameters(), lr=1e-2)
    opt_head = torch.optim.AdamW(list(model.fc2.parameters()) + list(model.fc3.parameters()), lr=1e-3)
    cm = torch.compile(model, backend="agpe", options={
        "target_sparsity": 0.75, "block_size": 4, "update_interval": 4, "end_step": 24, "inductor": False})
    for x, y in batches(6):
        F.cross_entropy(cm(x), y).backward()
        opt_body.step()
        opt_head.step()
        opt_body.zero_grad()
        opt_head.zero_grad()
    assert ref() is None
    agpe_compile.strip(model)
    torch._dynamo.reset()


def test_one_torch_hook_from_import_and_across_a_reload():
    # re-audit BK: installed at agpe's first hook, which may come inside a user's hook (torch's
    # loop); a reload made a second table and a second torch hook (hooks ran twice)
    import importlib

    from torch.optim.optimizer import _global_optimizer_post_hooks

    def ours():
        return [h for h in _global_optimizer_post_hooks.values() if "_run_hooks" in repr(h)]

    assert len(ours()) == 1
    calls = []
    handle = optimizer_hooks.register_step_post_hook(lambda optimizer, args, kwargs: calls.append("old"))
    try:
        reloaded = importlib.reload(optimizer_hooks)
        other = reloaded.register_step_post_hook(lambda optimizer, args, kwargs: calls.append("new"))
        assert len(ours()) == 1
        _sgd_step().step()
        assert calls == ["old", "new"]
        handle.remove()
        _sgd_step().step()
        assert calls == ["old", "new", "new"]
        other.remove()
    finally:
        handle.remove()
