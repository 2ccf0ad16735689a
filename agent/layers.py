"""Which parameter tensors make up each reported layer.

The plan is built once, from parameter names alone, so it is identical on every rank (names and
order are the same everywhere under DDP and FSDP2). Cardinality is bounded here: if the grouping
asked for yields more than `max_layers` layers, it coarsens until it fits and says so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

log = logging.getLogger("gradwatch.agent")

# Wrapper path components that are not part of the user's model structure.
_WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """`module._orig_mod.encoder.0.weight` -> `encoder.0.weight` (DDP, compile, FSDP1, checkpoint wrappers)."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    return ".".join(parts) or name


@dataclass(frozen=True)
class LayerPlan:
    """Trainable parameters in a fixed order, and the layer each belongs to."""

    names: tuple[str, ...]  # layer names, in first-appearance order
    params: tuple[torch.nn.Parameter, ...]  # trainable parameters, registration order
    param_names: tuple[str, ...]
    layer_of_param: tuple[int, ...]  # index into `names`, per parameter

    @property
    def num_layers(self) -> int:
        return len(self.names)


def _group_key(param_name: str, depth: Optional[int]) -> str:
    if depth is None:
        return param_name
    module_path = param_name.split(".")[:-1] or [param_name]
    return ".".join(module_path[:depth])


def _assign(param_names: Sequence[str], depth: Optional[int]) -> tuple[list[str], list[int]]:
    names: list[str] = []
    index: dict[str, int] = {}
    layer_of_param = []
    for pname in param_names:
        key = _group_key(pname, depth)
        if key not in index:
            index[key] = len(names)
            names.append(key)
        layer_of_param.append(index[key])
    return names, layer_of_param


def _chunked(param_names: Sequence[str], max_layers: int) -> tuple[list[str], list[int]]:
    """Last resort: contiguous runs of parameters, named `first..last`."""
    per_chunk = -(-len(param_names) // max_layers)
    names, layer_of_param = [], []
    for start in range(0, len(param_names), per_chunk):
        chunk = param_names[start : start + per_chunk]
        names.append(chunk[0] if len(chunk) == 1 else f"{chunk[0]}..{chunk[-1]}")
        layer_of_param.extend([len(names) - 1] * len(chunk))
    return names, layer_of_param


def build_layer_plan(model: torch.nn.Module, depth: Optional[int], max_layers: int) -> LayerPlan:
    """Group the model's trainable parameters into at most `max_layers` named layers."""
    named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    param_names = [n for n, _ in named]
    names, layer_of_param = _assign(param_names, depth)
    if len(names) > max_layers:
        deepest = max(len(n.split(".")) for n in param_names) - 1
        start = deepest if depth is None else min(depth, deepest) - 1
        for coarser in range(start, 0, -1):
            names, layer_of_param = _assign(param_names, coarser)
            if len(names) <= max_layers:
                break
        else:
            names, layer_of_param = _chunked(param_names, max_layers)
        log.warning(
            "gradwatch: %d parameter tensors exceed max_layers=%d; reporting %d grouped layers instead "
            "(set layer_depth or max_layers to choose the grouping)",
            len(param_names), max_layers, len(names),
        )
    return LayerPlan(
        names=tuple(names),
        params=tuple(p for _, p in named),
        param_names=tuple(param_names),
        layer_of_param=tuple(layer_of_param),
    )
