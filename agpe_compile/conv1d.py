"""Hugging Face ``Conv1D`` layers (GPT-2, GPT, ...) as ``nn.Linear``, and back.

transformers' ``Conv1D`` computes ``x @ W + b`` with ``W`` stored ``[in, out]``: not the
``x @ W.T`` that agpe rewrites, so a GPT-2 trains dense under ``backend="agpe"`` (zero-code
mode warns; ``explain`` gives the reason). :func:`linear_from_conv1d` replaces each such
module by an ``nn.Linear`` whose weight is ``W.T`` (a copy; same outputs up to rounding),
so the model's projections become ordinary agpe layers. :func:`conv1d_from_linear` turns
them back after :func:`agpe_compile.strip`, so the state dict has the original keys and
shapes again (``save_pretrained`` / ``from_pretrained`` as before).

Convert before ``prepare``, before creating the optimizer and the Sparsifier, and before
``torch.compile``: the new ``nn.Linear`` owns new Parameters.

Example::

    >>> model = GPT2LMHeadModel(config)
    >>> agpe_compile.linear_from_conv1d(model)          # ['transformer.h.0.attn.c_attn', ...]
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> sparsifier = agpe_compile.Sparsifier(model, optimizer, agpe_compile.AGPEConfig(...))
    >>> ...                                             # train
    >>> sparsifier.close(); agpe_compile.strip(model); agpe_compile.conv1d_from_linear(model)
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .state import STATE_ATTR, layer_states

CONV1D_ATTR = "_agpe_from_conv1d"  # on a converted nn.Linear: the Conv1D class it replaced


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (by class, without importing transformers)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, nn.Parameter)
            and weight.dim() == 2 and weight.shape[1] == module.nf)


def linear_from_conv1d(model: nn.Module) -> List[str]:
    """Replace every transformers ``Conv1D`` in ``model`` by an equivalent ``nn.Linear``, in
    place; returns the converted modules' names. Raises, changing nothing, if one is
    already prepared by agpe or shares its weight with another module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"agpe.linear_from_conv1d: expected an nn.Module, got {type(model).__name__}")
    found = [(name, module) for name, module in model.named_modules() if name and _is_conv1d(module)]
    prepared = sorted(layer_states(model))
    if found and prepared:
        raise RuntimeError(f"agpe.linear_from_conv1d: the model is already prepared (agpe layers {prepared[:3]}"
                           f"{'...' if len(prepared) > 3 else ''}); convert first, then create the optimizer, the "
                           f"Sparsifier (or prepare) and torch.compile, so they see the new layers")
    owners = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    for name, module in found:
        if hasattr(module.weight, STATE_ATTR):
            raise RuntimeError(f"agpe.linear_from_conv1d: {name} already has agpe state; convert before "
                               f"agpe_compile.prepare, the Sparsifier and torch.compile")
        shared = [owner for owner in owners[id(module.weight)] if owner != name]
        if shared:
            raise RuntimeError(f"agpe.linear_from_conv1d: {name}.weight is shared with {shared}; a copy would "
                               f"untie them")
    for name, module in found:
        nx, nf = module.weight.shape
        bias = getattr(module, "bias", None)
        linear = nn.Linear(nx, nf, bias=bias is not None, device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        linear.weight.requires_grad_(module.weight.requires_grad)
        if bias is not None:
            linear.bias.requires_grad_(bias.requires_grad)
        setattr(linear, CONV1D_ATTR, type(module))
        linear.train(module.training)
        _set_submodule(model, name, linear)
    return [name for name, _ in found]


def conv1d_from_linear(model: nn.Module) -> List[str]:
    """Turn the layers :func:`linear_from_conv1d` converted back into their ``Conv1D``
    class, in place; returns their names. The model must be stripped first
    (:func:`agpe_compile.strip`), so the weights are plain (masks folded in)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"agpe.conv1d_from_linear: expected an nn.Module, got {type(model).__name__}")
    found = [(name, module) for name, module in model.named_modules()
             if name and isinstance(module, nn.Linear) and CONV1D_ATTR in module.__dict__]
    for name, module in found:
        if hasattr(module.weight, STATE_ATTR) or any(key.startswith("weight_") for key in module._buffers):
            raise RuntimeError(f"agpe.conv1d_from_linear: {name} still has agpe state; call "
                               f"agpe_compile.strip(model) first")
    for name, module in found:
        cls = module.__dict__[CONV1D_ATTR]
        conv = cls(module.out_features, module.in_features)
        conv.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(module.weight.t())
            if module.bias is not None:
                conv.bias.copy_(module.bias)
        conv.train(module.training)
        _set_submodule(model, name, conv)
    return [name for name, _ in found]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
