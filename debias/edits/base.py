"""The edit a method puts on the network, behind one contract (`Edit`), so that training, evaluation and export need
not know which method made it; the shared merge bookkeeping of weight edits (`WeightEdit`); and the context a
method's builder receives (`EditContext`).

Like PEFT's tuners, an edit wraps layers of the network and keeps a `merged` state; like concept-erasure's fitter and
eraser, the edit is the stateful, trainable side and `record()` gives the frozen result (`debias.edits.record`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from debias.edits.record import EditRecord, MatrixDelta

if TYPE_CHECKING:
    from debias.edits.mask import Mask

ADAPTER = "default"  # the one adapter name every peft-backed edit uses


class Edit(Protocol):
    """What every method's edit offers (`SparseDelta`, `LoraDelta`, `FeatureProjection`, `InferenceEdit`,
    `StateDiffEdit`); callers use this and nothing else."""

    mask: Mask | None
    """The mask a masked method trains (None: the method has none)."""
    saves_delta: bool
    """Whether an export writes the edit as `debias/mask.safetensors` + `debias/delta.safetensors` (a masked edit's
    few KB); a dense or low-rank edit ships as merged weights and `adapter/`."""

    @property
    def merged(self) -> bool:
        """Whether the edit is folded into the base weights (`merge`)."""
        ...

    def disabled(self) -> contextlib.AbstractContextManager:
        """Inside the block the network is the original model (no second copy)."""
        ...

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains ([] for a computed or inference-time edit)."""
        ...

    def changed_parameters(self) -> int:
        """How many numbers the method may change."""
        ...

    def changed_entries(self) -> int:
        """How many weights the edit changed (a masked edit: its non-zero values)."""
        ...

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps."""
        ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `trainable_state()`; refuses a state of another edit."""
        ...

    def base_layers(self) -> dict[str, nn.Module]:
        """{edited parameter: the plain layer that holds it} ({} for an edit of no weight)."""
        ...

    def given_weights(self) -> list[str] | None:
        """Names (as in the network's `named_parameters()`) of the weights the edit changes where they were given
        rather than chosen by a method: another model's weights that differ (`StateDiffEdit`, `debias eval`), which
        may sit in any layer, so the fast path checks them. None for a method's edit, which changes only the run's
        edited `W_out` matrices (or no weight at all)."""
        ...

    def merge(self) -> None:
        """Fold the edit into the base weights; refused (RuntimeError) when merged, and (ValueError, weights left as
        they were) when the result would not be finite."""
        ...

    def unmerge(self) -> None:
        """Undo `merge` bit-exactly; RuntimeError when not merged."""
        ...

    def scaled(self, alpha: float) -> contextlib.AbstractContextManager:
        """Inside the block the edit acts at α times its strength (0: the original model); restored exactly after."""
        ...

    def record(self) -> EditRecord:
        """What the edit changed, frozen (`debias.edits.record`)."""
        ...

    def save_adapter(self, directory: Path, base_model: str) -> bool:
        """Write the edit as a PEFT adapter for `base_model` into `directory`; False (nothing written) where the edit
        has no adapter form."""
        ...


class WeightEdit:
    """The merge bookkeeping every weight edit shares, as PEFT's tuner layers keep it: `merged`; `merge` folds the
    edit into the base layers and checks the result is finite (PEFT's `safe_merge`), refusing a non-finite merge with
    the weights left as they were; `unmerge` restores the weights `merge` saved, bit-exactly ((w + d) − d is not
    always w in floating point). A second `merge`, or `unmerge` without `merge`, raises.

    A subclass gives `base_layers()`, `_merge_layers()` (fold into every layer) and `_unmerge_layers()` (reset the
    layers' own merged state; the saved weights are put back here); `peft_model`, if it has one, is its adapter.
    """

    mask: Mask | None = None
    saves_delta = False
    features: Sequence[int] = ()
    peft_model: Any = None
    _saved: dict[str, torch.Tensor] | None = None

    def base_layers(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _merge_layers(self) -> None:
        raise NotImplementedError

    def _unmerge_layers(self) -> None:
        raise NotImplementedError

    def changed_parameters(self) -> int:
        raise NotImplementedError

    @property
    def merged(self) -> bool:
        return self._saved is not None

    def _base_parameters(self) -> dict[str, nn.Parameter]:
        """{network parameter name: parameter} of every base layer (weight, and bias where it has one)."""
        return {parameter.removesuffix("weight") + key: p for parameter, layer in self.base_layers().items()
                for key, p in layer.named_parameters()}

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self._base_parameters().items():
                p.data.copy_(saved[name])

    def merge(self) -> None:
        if self.merged:
            raise RuntimeError(f"the {type(self).__name__} is already merged into its weights; unmerge() before "
                               "merging again")
        saved = {name: p.detach().clone() for name, p in self._base_parameters().items()}
        try:
            self._merge_layers()
            if not all(torch.isfinite(p).all() for p in self._base_parameters().values()):
                raise ValueError("non-finite")
        except ValueError:  # ours, or peft's safe_merge
            self._unmerge_layers()
            self._restore(saved)
            raise ValueError(f"merging the {type(self).__name__} into {', '.join(self.base_layers())} gives non-finite "
                             "weights: refused, the weights are left as they were") from None
        self._saved = saved

    def unmerge(self) -> None:
        if self._saved is None:
            raise RuntimeError(f"the {type(self).__name__} is not merged; merge() before unmerge()")
        self._unmerge_layers()
        self._restore(self._saved)
        self._saved = None

    def changed_entries(self) -> int:
        return self.changed_parameters()

    def given_weights(self) -> list[str] | None:
        return None  # a method's edit: only the run's edited W_out matrices

    def record(self) -> EditRecord:
        """Every base-layer entry the merged edit changes, with merged − original as its value (float32)."""
        was_merged = self.merged
        if not was_merged:
            self.merge()
        try:
            assert self._saved is not None  # set by merge
            matrices = []
            for name, p in self._base_parameters().items():
                delta = (p.detach().float() - self._saved[name].float()).flatten()
                where = delta.nonzero().flatten()
                matrices.append(MatrixDelta(name, tuple(p.shape), where.cpu(), delta[where].cpu()))
        finally:
            if not was_merged:
                self.unmerge()
        return EditRecord(tuple(matrices), tuple(int(f) for f in self.features))

    def save_adapter(self, directory: Path, base_model: str) -> bool:
        if self.peft_model is None:
            return False
        self.peft_model.peft_config[ADAPTER].base_model_name_or_path = base_model
        self.peft_model.save_pretrained(directory)
        return True


@contextlib.contextmanager
def at_strength(get: Callable[[], float], set_strength: Callable[[float], None], alpha: float):
    """Inside the block the strength is α × its current value; the saved value is put back after (for edits whose
    strength is one number: `FeatureProjection`, an `InferenceEdit`'s intervention)."""
    current = float(get())
    try:
        set_strength(alpha * current)
        yield
    finally:
        set_strength(current)


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
    options: Any  # the method's options (its `registry.Method.options` dataclass, e.g. `LoraOptions`); None: none
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
    preserved: Callable[[], list[dict[str, torch.Tensor]]] = list  # the train factual and cue prompts, tokenised
    #   in batches, computed when called (`model.edit.rank_null_space_energy`); no data: none

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
