"""The edit a method puts on the network, behind one interface, so that training, evaluation and export need not
know which method made it; and the context a method's builder receives.

Every edit has `disabled()` (run the original network), `parameters()` (what the optimiser trains),
`changed_parameters()` (how many numbers the method may change), `trainable_state()` (what a checkpoint keeps)
and, where the edit is a weight change, `merge()` / `unmerge()` (bit-exact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
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
    bias: str = "gender"  # the bias spec (a shipped name or a path): its groups' targets score the gap
    gap_texts: list[list[str]] | None = None  # train gap prompts, one list per group (None: gender's two lists)
    parameters: list[str] = field(default_factory=list)  # masked methods: every W_out edited (`model.edit.layers`)
    layers: list[int] = field(default_factory=list)  # their layers, ascending; both empty: `parameter` alone

    def edited(self) -> list[str]:
        """The W_out matrices a masked method edits, in layer order (`parameter` alone unless `model.edit.layers`)."""
        return list(self.parameters) or [self.parameter]

    def edited_layers(self) -> list[int]:
        return list(self.layers) or [self.site.layer]

    def gap_prompts(self) -> list[list[str]]:
        """The train gap prompts per group of the bias."""
        return self.gap_texts if self.gap_texts is not None else [self.texts["gap_female_train"],
                                                                    self.texts["gap_male_train"]]

    def mask_meta(self, **extra) -> dict:
        """The fields every mask of this run records."""
        return dict(parameter=self.parameter, layer=self.site.layer, hook_name=self.site.hook_name,
                    features=tuple(self.features), model_id=self.model_id, sae_id=self.sae_name, **extra)
