"""The edit a method puts on the network, behind one interface, so that training, evaluation and export need not
know which method made it; and the context a method's builder receives.

Every edit has `disabled()` (run the original network), `parameters()` (what the optimiser trains),
`changed_parameters()` (how many numbers the method may change), `trainable_state()` (what a checkpoint keeps)
and, where the edit is a weight change, `merge()` / `unmerge()` (bit-exact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class Edit(Protocol):
    """What every method's edit offers (`SparseDelta`, `LoraDelta`, `InferenceEdit`, `StateDiffEdit`)."""

    def disabled(self) -> contextlib.AbstractContextManager: ...

    def parameters(self) -> list[nn.Parameter]: ...

    def changed_parameters(self) -> int: ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


@dataclass
class EditContext:
    """Everything a method's builder may read: the network, the SAE at its site, the run's edit arguments and the
    train-split texts. Nothing here is held-out data."""

    net: nn.Module
    tokenizer: Any
    sae: Any
    site: Any  # debias.models.hooks.HookSite
    parameter: str  # the W_out being edited, e.g. "model.layers.24.mlp.down_proj.weight"
    features: list[int]
    k: int | None
    args: Any  # debias.training.args.EditArgs
    texts: dict[str, list[str]]  # the DataModule's train texts (bias_train, gap_female_train, ...)
    mask_batches: list[dict[str, torch.Tensor]]  # tokenised train bias prompts
    eval_batch_size: int = 16
    max_length: int = 64
    model_id: str = ""
    sae_name: str = ""
    preset_mask: Any = None  # a mask to use as it is (an export takes its checkpoint's)
    broadcast: Callable[[Any], Any] = lambda obj: obj  # under DDP: every rank takes rank 0's object (the mask)

    def mask_meta(self, **extra) -> dict:
        """The fields every mask of this run records."""
        return dict(parameter=self.parameter, layer=self.site.layer, hook_name=self.site.hook_name,
                    features=tuple(self.features), model_id=self.model_id, sae_id=self.sae_name, **extra)
