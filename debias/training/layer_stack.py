"""Where a weight sits in the decoder stack, and which weights sit below a layer: what the fast path's cached
layer-L input depends on."""

from __future__ import annotations

import re

from torch import nn


def layer_stack(net: nn.Module, parameter: str) -> tuple[str, int]:
    """(path of the decoder-layer `ModuleList`, index of the layer) holding `parameter` (e.g. `model.layers`, 24)."""
    match = re.match(r"^(.*)\.(\d+)\.", parameter)
    if not match:
        raise ValueError(f"{parameter} is not inside a numbered layer stack")
    path, index = match.group(1), int(match.group(2))
    if not isinstance(net.get_submodule(path), nn.ModuleList):
        raise ValueError(f"{path} (parent of {parameter}) is not a ModuleList")
    return path, index


def upstream_of(net: nn.Module, parameter: str, names: list[str]) -> list[str]:
    """Those of `names` (parameters of `net`) outside the decoder layers at or above the one holding `parameter`.

    The fast path caches that layer's input, so it stays exact while only weights of that layer and above change;
    any name returned here (an earlier layer, the embeddings, a weight tied to them) changes the cached input.
    """
    path, index = layer_stack(net, parameter)
    inside = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    return [name for name in names if not ((match := inside.match(name)) and int(match.group(1)) >= index)]
