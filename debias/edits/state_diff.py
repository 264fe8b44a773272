"""Another model of the same architecture seen as an edit of the base: what `debias eval` compares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from debias.edits.record import EditRecord, MatrixDelta

if TYPE_CHECKING:
    from debias.edits.mask import Mask


class StateDiffEdit:
    """Another model of the same architecture, seen as an edit of `model`: the weights that differ are swapped in,
    and `disabled()` swaps the originals back (what `debias eval` compares). Its weights are in place from the start,
    so `merge` / `unmerge` only keep the `merged` state."""

    mask: Mask | None = None
    saves_delta = False

    def __init__(self, model: nn.Module, edited: dict[str, torch.Tensor]):
        self.model, self.merged = model, False
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

    def given_weights(self) -> list[str]:
        """Every weight that differs: another model's differences may sit in any layer."""
        return self.changed_names()

    def changed_parameters(self) -> int:
        return sum(int((base != new).sum()) for base, new in self.changed.values())

    changed_entries = changed_parameters

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"another model seen as an edit has no trainable state; got {sorted(state)[:4]}")

    def base_layers(self) -> dict[str, nn.Module]:
        """{changed weight: the module that holds it}."""
        return {name: self.model.get_submodule(name.rpartition(".")[0]) for name in self.changed_names()}

    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("the StateDiffEdit is already merged; unmerge() before merging again")
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("the StateDiffEdit is not merged; merge() before unmerge()")
        self.merged = False

    @contextlib.contextmanager
    def scaled(self, alpha: float) -> Iterator[None]:
        """Every changed weight at base + α·(edited − base); the edited weights are put back after."""
        with torch.no_grad():
            for name, (base, new) in self.changed.items():
                self.model.get_parameter(name).data.copy_(base + alpha * (new - base))
        try:
            yield
        finally:
            self._load(1)

    def record(self) -> EditRecord:
        """Every entry that differs, with edited − base as its value (float32)."""
        matrices = []
        for name in self.changed_names():
            base, new = self.changed[name]
            where = (base != new).flatten().nonzero().flatten()
            delta = (new.float() - base.float()).flatten()[where]
            matrices.append(MatrixDelta(name, tuple(base.shape), where.cpu(), delta.cpu()))
        return EditRecord(tuple(matrices))

    def save_adapter(self, directory: Path, base_model: str) -> bool:
        return False
