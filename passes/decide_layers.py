"""Decide, for each weight placeholder used as a linear layer, whether it is rewritten.

Requires: the linear sites of a Dynamo graph (``match_linears``) and Dynamo's example
inputs, where ``example_inputs[i]`` is the live ``nn.Parameter`` of placeholder i.
Ensures: every eligible weight has a :class:`~agpe_compile.state.LayerState` attached
(created with all blocks active if the model was never prepared); every other weight
gets a human-readable reason. Reads the graph, never changes it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from agpe_compile.config import BackendConfig
from agpe_compile.state import (EXCLUDED_ATTR, STATE_ATTR, LayerState, check_block_size_option, layer_name,
                                pattern_reason, skip_reason, state_of)

from .match_linears import LinearSite, UnmatchedUse, embedding_weights

_SOURCE_PART = re.compile(r"\.(?:_modules|_parameters|_buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclasses.dataclass
class LayerDecision:
    """Whether one weight is rewritten, and why not if it is not."""

    name: str
    weight: fx.Node
    sites: List[LinearSite]
    shape: Tuple[int, ...]
    state: Optional[LayerState]
    reason: Optional[str]

    @property
    def rewritten(self) -> bool:
        return self.state is not None

    @property
    def lowering(self) -> Optional[str]:
        """``sparse_linear``, ``masked_weight`` (dense compute inside a fused op) or both."""
        if not self.rewritten:
            return None
        return "+".join(sorted({"masked_weight" if s.form == "masked_weight" else "sparse_linear" for s in self.sites}))


def source_path(placeholder: fx.Node) -> Optional[str]:
    """``fc.weight`` for a placeholder whose Dynamo source is ``L['self']._modules['fc']._parameters['weight']``."""
    grapharg = placeholder.meta.get("grapharg")
    if grapharg is None or grapharg.source is None:
        return None
    name = grapharg.source.name
    name = name() if callable(name) else name
    root_end = name.find("]")
    parts = [a or b for a, b in _SOURCE_PART.findall(name[root_end + 1:])]
    return ".".join(parts) if parts else None


def _placeholder_examples(graph: fx.Graph, example_inputs: Sequence) -> Dict[fx.Node, object]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, example_inputs))


def _layer_name(placeholder: fx.Node) -> str:
    path = source_path(placeholder)
    if path is None:
        return placeholder.name
    module_name, _, param_name = path.rpartition(".")
    return layer_name(module_name, param_name)


def decide_layers(
    graph: fx.Graph,
    example_inputs: Sequence,
    sites: List[LinearSite],
    unmatched: List[UnmatchedUse],
    config: BackendConfig,
) -> List[LayerDecision]:
    """One decision per distinct weight (sites sharing a weight share a decision)."""
    examples = _placeholder_examples(graph, example_inputs)
    tied = embedding_weights(graph)
    by_weight: Dict[fx.Node, List[LinearSite]] = {}
    decisions: List[LayerDecision] = []
    for site in sites:
        if site.form == "masked_weight" and not isinstance(examples.get(site.weight), torch.nn.Parameter):
            continue  # a 2-D activation handed to a fused attention op, not a weight
        if site.weight.op != "placeholder":
            decisions.append(LayerDecision(site.weight.name, site.weight, [site], (), None,
                                           "weight is computed in the graph, not a parameter"))
            continue
        by_weight.setdefault(site.weight, []).append(site)
    block_size = _default_block_size(by_weight, examples, config)
    for weight_node, weight_sites in by_weight.items():
        decisions.append(_decide(weight_node, weight_sites, examples.get(weight_node), tied, config, block_size))
    seen = set(by_weight)
    for use in unmatched:
        example = examples.get(use.weight)
        if use.weight in seen or not isinstance(example, torch.nn.Parameter):
            continue
        seen.add(use.weight)
        decisions.append(LayerDecision(_layer_name(use.weight), use.weight, [], tuple(example.shape),
                                       None, use.reason))
    return decisions


def _default_block_size(by_weight, examples, config: BackendConfig) -> int:
    """Block size of layers met here for the first time: the option, else the one block
    size of this graph's prepared layers (``prepare(model, {"block_size": 8})`` then
    ``torch.compile`` without options), else the default."""
    if config.block_size is not None:
        return config.block_size
    prepared = {state.block_size for state in (
        state_of(examples.get(w)) if isinstance(examples.get(w), torch.nn.Parameter) else None for w in by_weight)
        if state is not None}
    return prepared.pop() if len(prepared) == 1 else config.resolved_block_size


def _decide(weight_node, sites, weight, tied, config: BackendConfig, block_size: int) -> LayerDecision:
    name = _layer_name(weight_node)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
    state = state_of(weight) if isinstance(weight, torch.nn.Parameter) else None
    if state is not None:
        check_block_size_option(state, config)
        reason = pattern_reason(state.name, config)
        if reason is not None:
            return LayerDecision(state.name, weight_node, sites, shape, None, reason)
        return LayerDecision(state.name, weight_node, sites, shape, state, None)
    reason = skip_reason(name, weight, config, block_size)
    if reason is None and isinstance(weight, torch.nn.Parameter):
        reason = getattr(weight, EXCLUDED_ATTR, None)
    if reason is None and weight_node in tied:
        reason = "weight tied/shared with an embedding"
    if reason is not None:
        return LayerDecision(name, weight_node, sites, shape, None, reason)
    state = LayerState.create(name, _param_name(weight_node), weight, block_size)
    setattr(weight, STATE_ATTR, state)
    return LayerDecision(name, weight_node, sites, shape, state, None)


def _param_name(placeholder: fx.Node) -> str:
    path = source_path(placeholder)
    return path.rpartition(".")[2] if path else "weight"
