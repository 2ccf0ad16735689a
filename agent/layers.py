"""Which parameter tensors make up each reported layer.

The grouping is a function of parameter names alone, so ranks that see the same names group them the
same way (the job-wide list of names, across pipeline stages, is layout.py's). Cardinality is bounded
here: if the grouping asked for yields more than `max_layers` layers, it coarsens until it fits and
says so once.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

log = logging.getLogger("gradwatch.agent")

# Wrapper path components that are not part of the user's model structure.
_WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """`module._orig_mod.encoder.0.weight` -> `encoder.0.weight` (DDP, compile, FSDP1, checkpoint wrappers)."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    return ".".join(parts) or name


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


def group_layers(param_names: Sequence[str], depth: Optional[int], max_layers: int) -> tuple[list[str], list[int]]:
    """Layer names and each parameter's layer: grouped by `depth`, coarsened to at most `max_layers`.
    A function of the names alone, so ranks that see the same names group them the same way."""
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
    return names, layer_of_param


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's trainable parameters with their clean names, in registration order (a pipeline
    stage may hold none)."""
    return [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
