"""A sparse, trainable delta on the masked entries of one weight (or of several: a `JointMask`).

`nn.Linear` weights carry the delta with peft's Super-Tuning tuner (frozen base weight + flat `values` at flat
`indices`), so the edit saves as an ordinary PEFT adapter. peft refuses GPT-2's `Conv1D` (its weight is stored
`[in, out]`), so `SparseConv1D` (`debias.edits.sparse_layers`) is a small fallback with the same interface. What the
edit changed is its `record()` (`debias.edits.record`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from debias.edits.base import ADAPTER, WeightEdit
from debias.edits.joint import compute_joint_mask
from debias.edits.mask import InstabilityMask, Mask, compute_mask, full_mask, load_masks_for
from debias.edits.record import EditRecord, MatrixDelta, apply_delta
from debias.edits.sources import mask_from_gradients, ranked_in_null_space, use_random_features
from debias.edits.sparse_layers import SparseConv1D, attach_supertuning

__all__ = ["EditRecord", "MatrixDelta", "SparseDelta", "apply_delta", "build_dense", "build_masked"]


def _hold_fillers(k: int):
    """A gradient hook that keeps a layer's value slots from k on (peft's fillers, `attach_supertuning`) at 0."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[k:] = 0
        return grad

    return hook


class SparseDelta(WeightEdit):
    """Attach a trainable sparse delta at `mask`'s entries of `model` (each matrix of a `JointMask`: one layer per
    matrix); everything else stays frozen. The entries of a matrix are trained in that layer's value slots 0..k-1.
    `dense`: the mask is every entry (`build_dense`), so the edit ships as merged weights only (no mask, delta or
    adapter files)."""

    def __init__(self, model: nn.Module, mask: Mask, dense: bool = False):
        self.mask: Mask | None = mask
        self.saves_delta = not dense
        self.masks: list[InstabilityMask] = list(mask.parts)
        names = [m.parameter.removesuffix(".weight") for m in self.masks]
        bases = [model.get_submodule(name) for name in names]
        for m, base in zip(self.masks, bases, strict=True):
            if not isinstance(base, nn.Linear) and type(base).__name__ != "Conv1D":
                raise TypeError(f"{m.parameter} belongs to a {type(base).__name__}; supported: nn.Linear, Conv1D")
        if len({isinstance(base, nn.Linear) for base in bases}) > 1:
            raise TypeError(f"{[m.parameter for m in self.masks]} mix nn.Linear and Conv1D layers; one kind only")
        for p in model.parameters():
            p.requires_grad_(False)
        self.features = tuple(self.masks[0].features)
        self.layers: list[Any]  # peft's Super-Tuning Linear, or SparseConv1D, one per matrix
        if isinstance(bases[0], nn.Linear):
            self.peft_model = attach_supertuning(model, self.masks)
            self.layers = [self.peft_model.base_model.model.get_submodule(name) for name in names]
            self.slots: list[nn.Parameter] = [layer.supertuning_values[ADAPTER] for layer in self.layers]
        else:
            self.layers = [SparseConv1D(base, m.indices) for base, m in zip(bases, self.masks, strict=True)]
            for name, layer in zip(names, self.layers, strict=True):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
            self.slots = [layer.values for layer in self.layers]
        for m, slot in zip(self.masks, self.slots, strict=True):
            if slot.numel() > m.k:
                slot.register_hook(_hold_fillers(m.k))
        self.model = model

    @property
    def values(self) -> nn.Parameter:
        """The k trained values of a one-matrix delta (`values_of` gives each matrix's of a joint one)."""
        return self.slots[self._only("values")]

    def values_of(self, parameter: str) -> torch.Tensor:
        """The trained values of `parameter`'s masked entries, in its mask's index order (a view)."""
        i = [m.parameter for m in self.masks].index(parameter)
        return self.slots[i][: self.masks[i].k]

    def _only(self, what: str) -> int:
        if len(self.masks) != 1:
            raise AttributeError(f"{what}: this delta spans {len(self.masks)} matrices; ask per matrix "
                                 "(values_of, base_layers, record)")
        return 0

    def _key(self, kind: str, mask: InstabilityMask) -> str:
        return kind if len(self.masks) == 1 else f"{kind}.{mask.parameter}"

    @contextlib.contextmanager
    def disabled(self):
        """Run the original network: the same weights with the delta switched off (no second copy)."""
        if self.peft_model is not None:
            with self.peft_model.disable_adapter():
                yield
            return
        for layer in self.layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.disabled = False

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains: the values of every matrix."""
        return list(self.slots)

    def changed_parameters(self) -> int:
        return sum(m.k for m in self.masks)

    def changed_entries(self) -> int:
        """How many of the k trained values are not 0 (the entries the edit changed)."""
        return sum(int((self.values_of(m.parameter) != 0).sum()) for m in self.masks)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the k values and their flat indices (`indices` / `values` of one matrix;
        `indices.<parameter>` / `values.<parameter>` of each of several)."""
        state = {}
        for m in self.masks:
            state[self._key("indices", m)] = m.indices.clone()
            state[self._key("values", m)] = self.values_of(m.parameter).detach().clone()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `trainable_state()`; refuses a state made for another mask (other indices)."""
        expected = sorted(self._key(kind, m) for m in self.masks for kind in ("indices", "values"))
        if not set(expected) <= set(state):
            raise ValueError(f"the checkpoint holds no sparse-delta state (keys {sorted(state)})"
                             + (f", expected {expected}" if len(self.masks) > 1 else ""))
        for m in self.masks:
            indices = state[self._key("indices", m)].to(torch.int64).cpu()
            ours = m.indices.to(torch.int64).cpu()
            if indices.shape != ours.shape or not torch.equal(indices, ours):
                agree = len(set(indices.tolist()) & set(m.indices.tolist()))
                raise ValueError(f"the checkpoint's delta is for another mask of {m.parameter}: {agree} of its "
                                 f"{indices.numel()} indices are among this run's {m.k}")
        with torch.no_grad():
            for m, slot in zip(self.masks, self.slots, strict=True):
                slot.zero_()
                slot[: m.k].copy_(state[self._key("values", m)].to(slot))

    def _merge_layers(self) -> None:
        for layer in self.layers:
            layer.merge(safe_merge=True, adapter_names=[ADAPTER])

    def _unmerge_layers(self) -> None:
        for layer in self.layers:
            if layer.merged:
                layer.unmerge()

    def save_adapter(self, directory, base_model: str) -> bool:
        """The Super-Tuning adapter (`nn.Linear` layers; none for `Conv1D`, nor for a dense edit: every entry)."""
        return self.saves_delta and super().save_adapter(directory, base_model)

    @contextlib.contextmanager
    def scaled(self, alpha: float) -> Iterator[None]:
        """Every trained value × α, so the weight is W + α·Δ; the values are put back after."""
        if self.merged:
            raise RuntimeError("the sparse delta is merged into W_out; unmerge() before scaling it")
        saved = [slot.detach().clone() for slot in self.slots]
        try:
            with torch.no_grad():
                for slot in self.slots:
                    slot.mul_(alpha)
            yield
        finally:
            with torch.no_grad():
                for slot, values in zip(self.slots, saved, strict=True):
                    slot.copy_(values)

    def record(self) -> EditRecord:
        """The k trained values of each matrix at its mask's indices, exactly."""
        return EditRecord(tuple(MatrixDelta(m.parameter, m.shape, m.indices.clone(),
                                            self.values_of(m.parameter).detach().float().cpu().clone())
                                for m in self.masks), tuple(self.features))

    def base_layers(self) -> dict[str, nn.Module]:
        """{edited parameter: the plain layer that holds it}."""
        return {m.parameter: layer.base_layer for m, layer in zip(self.masks, self.layers, strict=True)}

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def base_layer(self) -> Any:
        return self.layers[self._only("base_layer")].base_layer


def build_masked(ctx, mask_from: str) -> SparseDelta:
    """The masked edit of a run: `mask_path`'s mask, or the top-k entries ranked by `mask_from` ("feature": the SAE
    feature(s)' gradient; "bias": the train gap's own gradient; "feature_effect": the train gap's gradient through
    the feature(s) only, `debias.edits.feature_effect`; "random_features": "feature" with the features replaced by as
    many live latents drawn at random, `debias.edits.sources`; "random": seeded random scores); over the W_out of every
    layer of `model.edit.layers`, ranked jointly (`debias.edits.joint`), when there are several. With
    `model.edit.rank_null_space_energy` the gradient is first projected off the preserved prompts' inputs
    (`debias.edits.sources.ranked_in_null_space`)."""
    args, parameters = ctx.args, ctx.edited()
    given = ctx.preset_mask
    if given is None and args.mask_path:
        given = load_masks_for(args.mask_path, {p: tuple(ctx.net.get_parameter(p).shape) for p in parameters})
    drawn = use_random_features(ctx, given) if mask_from == "random_features" else {}
    if given is not None:
        mask = given
    else:
        grads = mask_from_gradients(ctx, mask_from, parameters)
        energy = args.rank_null_space_energy
        if energy is not None and mask_from != "random":
            grads = ranked_in_null_space(ctx, parameters, grads, energy)
            drawn = {**drawn, "rank_null_space_energy": energy}
        strategy = "random" if mask_from == "random" else args.mask_strategy
        common: dict[str, Any] = dict(strategy=strategy, seed=args.mask_seed, bos_token_id=ctx.tokenizer.bos_token_id,
                                      extra={"method": args.method, "mask_from": mask_from, **drawn},
                                      model_id=ctx.model_id, sae_id=ctx.sae_name)
        if len(parameters) > 1:
            mask = compute_joint_mask(ctx.net, ctx.sae, ctx.site, parameters, ctx.edited_layers(), ctx.mask_batches,
                                      ctx.features, ctx.k, grads=grads, **common)
        else:
            mask = compute_mask(ctx.net, ctx.sae, ctx.site, parameters[0], ctx.mask_batches, ctx.features, ctx.k,
                                grad=grads[0] if grads else None, **common)
    return SparseDelta(ctx.net, ctx.broadcast(mask))


def build_dense(ctx) -> SparseDelta:
    """`dense`: the sparse delta with every entry of W_out in its mask."""
    meta = ctx.mask_meta()
    return SparseDelta(ctx.net, full_mask(ctx.net, meta.pop("parameter"), **meta), dense=True)
