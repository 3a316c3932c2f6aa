"""``agpe_compile.AveragedModel``: torch's SWA / EMA weight average for a model agpe trains.

``torch.optim.swa_utils.AveragedModel`` keeps a deep copy of the model and, at each
``update_parameters(model)``, averages the parameters and copies every buffer (or, with
``use_buffers=True``, averages the buffers too). On a model agpe trains that breaks:

* a layer's layout buffer changes length when the layer crosses a density bucket, so the
  buffer copy fails at the first crossing ("The size of tensor a (275) must match the
  size of tensor b (227)");
* ``use_buffers=True`` would average boolean masks and integer layouts;
* the averaged weights are not zero on inactive blocks (they decay towards zero), so the
  copy computes something else eagerly than compiled with ``backend="agpe"``.

This subclass takes the same arguments and keeps the copy's agpe state equal to the
model's at every update: masks, layouts (a layout of another bucket gets a buffer of its
size, as when loading a checkpoint) and the saliency sums are copied, never averaged.
Parameters and the other buffers are averaged exactly as torch does. The averaged weights
are then zeroed on the model's inactive blocks. So the average runs the same eagerly,
compiled with ``backend="agpe"`` (its graphs recompile once per crossing of a layout bucket,
like the model's), or after :func:`agpe_compile.strip`. A regrown block's average starts from zero,
as the block's weight in the model does.

Example::

    >>> ema = agpe_compile.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
    >>> ...; optimizer.step(); sparsifier.step(loss); ema.update_parameters(model)
    >>> eval_model = torch.compile(ema, backend="agpe")
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel as _TorchAveragedModel
from torch.optim.swa_utils import get_swa_avg_fn, get_swa_multi_avg_fn

from .zero_weights import zero_outside_
from .state import _TENSOR_FIELDS, EXCLUDED_ATTR, STRIPPED_ATTR, LayerState, layer_states


class AveragedModel(_TorchAveragedModel):
    """``torch.optim.swa_utils.AveragedModel`` that follows agpe's masks (see module doc)."""

    def __init__(self, model: nn.Module, device=None, avg_fn=None, multi_avg_fn=None, use_buffers: bool = False):
        model = _unwrap(model)
        source = layer_states(model)
        if not source:
            raise ValueError(
                "agpe.AveragedModel: the model has no agpe layers; create it after the Sparsifier (or "
                "agpe_compile.prepare), or use torch.optim.swa_utils.AveragedModel for a model agpe does not train")
        unattached = sorted(name for name, state in source.items() if state.module is None)
        if unattached:
            raise ValueError(
                f"agpe.AveragedModel: layers {unattached} were given agpe state by a compiled call, not by "
                f"agpe_compile.prepare, so a copy of the model cannot carry it (zero-code mode on an unprepared "
                f"model). Call agpe_compile.prepare(model, options) before torch.compile")
        super().__init__(model, device, avg_fn, multi_avg_fn, use_buffers)
        # Parameter.__deepcopy__ drops attributes: the copy's weights lose the marks that keep a layer
        # dense (excluded, tied) or finished (stripped); without them its compiled graphs would adopt them.
        for mine, theirs in zip(self.module.parameters(), model.parameters()):
            for attr in (EXCLUDED_ATTR, STRIPPED_ATTR):
                if hasattr(theirs, attr) and not hasattr(mine, attr):
                    setattr(mine, attr, getattr(theirs, attr))
        self._fold()

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        model = _unwrap(model)
        agpe_buffers = self._follow(model)
        mine = list(self.module.parameters())
        theirs = list(model.parameters())
        if len(mine) != len(theirs):
            raise ValueError(f"agpe.AveragedModel: the model has {len(theirs)} parameters, the average "
                             f"{len(mine)}; pass the model the average was made from")
        other_buffers = [(name, b) for name, b in self.module.named_buffers() if name not in agpe_buffers]
        source_buffers = dict(model.named_buffers())
        missing = [name for name, _ in other_buffers if name not in source_buffers]
        if missing:
            raise ValueError(f"agpe.AveragedModel: the model has no buffer {missing[0]!r}; pass the model the "
                             f"average was made from")
        if self.use_buffers:
            mine += [b for _, b in other_buffers]
            theirs += [source_buffers[name] for name, _ in other_buffers]
        self._average(mine, theirs)
        if not self.use_buffers:  # torch's rule: the other buffers follow the model
            for name, buffer in other_buffers:
                buffer.copy_(source_buffers[name].to(buffer.device))
        self._fold()
        self.n_averaged += 1

    def _follow(self, model: nn.Module) -> set:
        """Copy every agpe buffer of ``model`` into the average; their names in ``self.module``."""
        source = layer_states(model)
        mine = layer_states(self.module)
        if set(source) != set(mine):
            raise ValueError(
                f"agpe.AveragedModel: the model's agpe layers {sorted(source)} differ from the average's "
                f"{sorted(mine)}; create the average after the Sparsifier (or agpe_compile.prepare) and pass "
                f"the model it was made from")
        names = set()
        paths = {module: path for path, module in self.module.named_modules()}
        for name, src in source.items():
            dst = mine[name]
            src.check_identity()  # adopt buffers that .to(device) or a load replaced
            src.sync_layout()  # a mask edited since the model's last call: its layout first
            dst.check_identity()
            _resize_layout(dst, src)
            for field in _TENSOR_FIELDS:
                getattr(dst, field).copy_(getattr(src, field))
            dst.layout_bucket = src.layout_bucket
            dst.mark_layout_synced()  # the copied layout is the mask's
            prefix = paths[dst.module]
            names.update(f"{prefix}.{b}" if prefix else b for b in dst.buffer_names())
        return names

    def _average(self, mine: List[torch.Tensor], theirs: List[torch.Tensor]) -> None:
        """torch's AveragedModel.update_parameters arithmetic over ``mine`` <- ``theirs``."""
        theirs = [t.detach().to(m.device) for m, t in zip(mine, theirs)]
        mine = [m.detach() for m in mine]
        if self.n_averaged == 0:
            for m, t in zip(mine, theirs):
                m.copy_(t)
            return
        if self.multi_avg_fn is None and self.avg_fn is not None:
            for m, t in zip(mine, theirs):
                m.copy_(self.avg_fn(m, t, self.n_averaged.to(m.device)))
            return
        groups: Dict[tuple, List[List[torch.Tensor]]] = {}
        for m, t in zip(mine, theirs):
            group = groups.setdefault((m.device, m.dtype), [[], []])
            group[0].append(m)
            group[1].append(t)
        for (device, _), (ms, ts) in groups.items():
            n_averaged = self.n_averaged.to(device)
            if self.multi_avg_fn is not None:
                self.multi_avg_fn(ms, ts, n_averaged)
            elif device.type == "cuda":  # torch's default: foreach SWA where foreach kernels exist
                get_swa_multi_avg_fn()(ms, ts, n_averaged)
            else:
                avg_fn = get_swa_avg_fn()
                for m, t in zip(ms, ts):
                    m.copy_(avg_fn(m, t, n_averaged))

    def _fold(self) -> None:
        """Zero the averaged weights on the inactive blocks."""
        for state in layer_states(self.module).values():
            weight = state.weight
            if weight is not None:
                with torch.no_grad():
                    zero_outside_(weight, state.block_mask, state.block_size)


def _resize_layout(dst: LayerState, src: LayerState) -> None:
    """A layout of another bucket gets a buffer of its size (the copy's graphs recompile once)."""
    if dst.block_layout.shape == src.block_layout.shape:
        return
    with torch.inference_mode(False):
        resized = torch.empty(src.block_layout.shape, dtype=dst.block_layout.dtype, device=dst.block_layout.device)
    dst.module.register_buffer(dst.layout_buffer_name, resized)
    dst.block_layout = resized


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s wrapper (the average copies the module itself)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model
