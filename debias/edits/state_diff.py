"""Another model of the same architecture seen as an edit of the base: what `debias eval` compares."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class StateDiffEdit:
    """Another model of the same architecture, seen as an edit of `model`: the weights that differ are swapped in,
    and `disabled()` swaps the originals back (what `debias eval` compares)."""

    def __init__(self, model: nn.Module, edited: dict[str, torch.Tensor]):
        self.model = model
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(edited))
        if missing:
            raise ValueError(f"the edited model lacks {len(missing)} of the base model's weights, e.g. {missing[:3]}")
        self.changed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, p in params.items():
            new = edited[name].to(p.device, p.dtype)
            if new.shape != p.shape:
                raise ValueError(f"{name}: edited model has shape {tuple(new.shape)}, base model {tuple(p.shape)}")
            if not torch.equal(new, p.data):
                self.changed[name] = (p.data.clone(), new)
                p.data.copy_(new)

    @contextlib.contextmanager
    def disabled(self):
        self._load(0)
        try:
            yield
        finally:
            self._load(1)

    def _load(self, which: int) -> None:
        for name, pair in self.changed.items():
            self.model.get_parameter(name).data.copy_(pair[which])

    def parameters(self) -> list[nn.Parameter]:
        return []

    def changed_names(self) -> list[str]:
        """Names (in `model.named_parameters()`) of the weights that differ from the base model's."""
        return sorted(self.changed)

    def changed_parameters(self) -> int:
        return sum(int((base != new).sum()) for base, new in self.changed.values())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {}

    def merge(self) -> None:
        pass

    unmerge = merge
