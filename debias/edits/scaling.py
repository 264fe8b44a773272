"""An edit at a fraction (or multiple) α of its strength, without rebuilding it: `with scaled(edit, α): ...`.

- `SparseDelta` (masked and dense): every trained value × α, so the weight is W + α·Δ.
- `LoraDelta`: peft's `LoraLayer.set_scale(adapter, α)` (scaling = α · lora_alpha / r), so the update is α·B·A.
- an edit, or an `InferenceEdit`'s intervention, with `set_strength(s)` and its current strength as `strength`
  (`SAEClamp`: acts + s·(clamped − acts); `SteeringVector`: s · alpha · v) or as `alpha` (`FeatureProjection`:
  W_out ← (I − s·P) W_out): the strength × α.

α = 0 is the original model in every case, α = 1 the edit as built. On leaving the block the edit is restored
exactly (the saved values, scale or strength are put back, nothing is recomputed by division).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from debias.edits.lora import LoraDelta
from debias.edits.sparse import SparseDelta
from debias.edits.sparse_layers import ADAPTER


def check_alpha(alpha) -> float:
    """α as a float; a one-line ValueError unless it is a finite number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"an edit's scale α must be a finite number (1: the edit as built, 0: the original model), "
                         f"got {alpha!r}")
    return float(alpha)


def strength_target(edit):
    """The object whose `set_strength` scales `edit` (the edit itself, or its intervention), or None."""
    for target in (edit, getattr(edit, "intervention", None)):
        if target is not None and callable(getattr(target, "set_strength", None)):
            return target
    return None


def can_scale(edit) -> bool:
    """Whether `scaled` knows how to scale `edit`."""
    return isinstance(edit, (SparseDelta, LoraDelta)) or strength_target(edit) is not None


@contextlib.contextmanager
def scaled(edit, alpha: float) -> Iterator[None]:
    """Inside the block, `edit` acts at α times its strength (see the module docstring); restored exactly after."""
    alpha = check_alpha(alpha)
    target = strength_target(edit)
    if target is not None:
        with _strength(target, alpha):
            yield
    elif isinstance(edit, SparseDelta):
        with _sparse(edit, alpha):
            yield
    elif isinstance(edit, LoraDelta):
        with _lora(edit, alpha):
            yield
    else:
        raise TypeError(f"cannot scale a {type(edit).__name__}: supported are SparseDelta, LoraDelta and edits with "
                        "set_strength(s)")


@contextlib.contextmanager
def _sparse(edit: SparseDelta, alpha: float) -> Iterator[None]:
    if any(getattr(layer, "merged", False) for layer in edit.layers):
        raise RuntimeError("the sparse delta is merged into W_out; unmerge() before scaling it")
    saved = [slot.detach().clone() for slot in edit.slots]
    try:
        with torch.no_grad():
            for slot in edit.slots:
                slot.mul_(alpha)
        yield
    finally:
        with torch.no_grad():
            for slot, values in zip(edit.slots, saved, strict=True):
                slot.copy_(values)


@contextlib.contextmanager
def _lora(edit: LoraDelta, alpha: float) -> Iterator[None]:
    if edit.layer.merged:
        raise RuntimeError("the LoRA adapter is merged into W_out; unmerge() before scaling it")
    saved = dict(edit.layer.scaling)
    try:
        edit.layer.set_scale(ADAPTER, alpha)
        yield
    finally:
        edit.layer.scaling.update(saved)


@contextlib.contextmanager
def _strength(target, alpha: float) -> Iterator[None]:
    current = float(target.strength if hasattr(target, "strength") else target.alpha)
    try:
        target.set_strength(alpha * current)
        yield
    finally:
        target.set_strength(current)
