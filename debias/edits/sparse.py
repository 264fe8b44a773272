"""A sparse, trainable delta on the masked entries of one weight, and the frozen record of the edit.

`nn.Linear` weights carry the delta with peft's Super-Tuning tuner (frozen base weight + flat `values` at flat
`indices`), so the edit saves as an ordinary PEFT adapter. peft refuses GPT-2's `Conv1D` (its weight is stored
`[in, out]`), so `SparseConv1D` below is a small fallback with the same interface.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from debias.edits.mask import InstabilityMask, compute_mask, full_mask, gap_gradient, load_mask_for

ADAPTER = "default"


@dataclass(frozen=True)
class EditRecord:
    """The whole edit of one matrix: `weight.flatten()[indices] += values`."""

    parameter: str
    shape: tuple[int, ...]
    indices: torch.Tensor  # [k] int64 flat positions
    values: torch.Tensor  # [k] float32

    def save(self, path: str | Path) -> None:
        save_file({"indices": self.indices.to(torch.int64).contiguous(), "values": self.values.float().contiguous()},
                  str(path), metadata={"parameter": self.parameter, "shape": json.dumps(list(self.shape))})

    @classmethod
    def load(cls, path: str | Path) -> EditRecord:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        return cls(meta["parameter"], tuple(json.loads(meta["shape"])), tensors["indices"], tensors["values"])


def apply_delta(model: nn.Module, path: str | Path) -> nn.Module:
    """Add a saved `delta.safetensors` to `model`'s weight in place (no peft needed); returns the model."""
    record = EditRecord.load(path)
    weight = model.get_parameter(record.parameter)
    if tuple(weight.shape) != record.shape:
        raise ValueError(f"delta is for {record.parameter} of shape {record.shape}, model has {tuple(weight.shape)}")
    with torch.no_grad():
        weight.view(-1).index_add_(0, record.indices.to(weight.device), record.values.to(weight))
    return model


class SparseConv1D(nn.Module):
    """Sparse delta on a transformers `Conv1D` (weight `[in, out]`, y = x @ W + b); mirrors Super-Tuning's layer."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor):
        super().__init__()
        self.base_layer: Any = base_layer  # transformers' Conv1D: `weight` [in, out] and `bias` [out]
        self.indices: torch.Tensor
        self.register_buffer("indices", indices.to(torch.int64))
        device = next(base_layer.parameters()).device
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=device))
        self.disabled = False
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        if self.disabled or self.merged:
            return self.base_layer(x)
        w = self.base_layer.weight
        weight = w.reshape(-1).scatter_add(0, self.indices, self.values.to(w.dtype)).reshape_as(w)
        out = torch.addmm(self.base_layer.bias, x.reshape(-1, x.shape[-1]), weight)
        return out.reshape(*x.shape[:-1], weight.shape[-1])

    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight.data
            weight.view(-1).scatter_add_(0, self.indices, self.values.data.to(weight))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight.data
            weight.view(-1).scatter_add_(0, self.indices, -self.values.data.to(weight))
            self.merged = False


class SparseDelta:
    """Attach a trainable sparse delta at `mask`'s entries of `model`; everything else stays frozen."""

    def __init__(self, model: nn.Module, mask: InstabilityMask):
        self.mask = mask
        self.module_name = mask.parameter.removesuffix(".weight")
        base = model.get_submodule(self.module_name)
        for p in model.parameters():
            p.requires_grad_(False)
        self.peft_model: Any = None
        self.layer: Any  # peft's Super-Tuning Linear, or SparseConv1D
        self._saved: torch.Tensor | None = None
        if isinstance(base, nn.Linear):
            self.peft_model = _attach_supertuning(model, self.module_name, mask)
            self.layer = self.peft_model.base_model.model.get_submodule(self.module_name)
            self.values = self.layer.supertuning_values[ADAPTER]
        elif type(base).__name__ == "Conv1D":
            self.layer = SparseConv1D(base, mask.indices)
            parent, _, child = self.module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, self.layer)
            self.values = self.layer.values
        else:
            raise TypeError(f"{mask.parameter} belongs to a {type(base).__name__}; supported: nn.Linear, Conv1D")
        self.model = model

    @contextlib.contextmanager
    def disabled(self):
        """Run the original network: the same weights with the delta switched off (no second copy)."""
        if self.peft_model is not None:
            with self.peft_model.disable_adapter():
                yield
            return
        self.layer.disabled = True
        try:
            yield
        finally:
            self.layer.disabled = False

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains: the k values."""
        return [self.values]

    def changed_parameters(self) -> int:
        return self.mask.k

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the k values and their flat indices."""
        return {"indices": self.mask.indices.clone(), "values": self.values.detach().clone()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `trainable_state()`; refuses a state made for another mask (other indices)."""
        if "values" not in state or "indices" not in state:
            raise ValueError(f"the checkpoint holds no sparse-delta state (keys {sorted(state)})")
        indices = state["indices"].to(torch.int64).cpu()
        ours = self.mask.indices.to(torch.int64).cpu()
        if indices.shape != ours.shape or not torch.equal(indices, ours):
            agree = len(set(indices.tolist()) & set(self.mask.indices.tolist()))
            raise ValueError(f"the checkpoint's delta is for another mask of {self.mask.parameter}: {agree} of its "
                             f"{indices.numel()} indices are among this run's {self.mask.k}")
        with torch.no_grad():
            self.values.copy_(state["values"].to(self.values))

    def merge(self) -> None:
        """Fold the delta into the base weight (the adapter then runs the plain layer)."""
        flat = self.base_weight().data.view(-1)
        self._saved = flat[self.mask.indices.to(flat.device)].clone()
        self.layer.merge()

    def unmerge(self) -> None:
        """Undo `merge` bit-exactly: (w + v) − v is not always w in floating point, so restore the saved entries."""
        self.layer.unmerge()
        if self._saved is not None:
            flat = self.base_weight().data.view(-1)
            flat[self.mask.indices.to(flat.device)] = self._saved
            self._saved = None

    def record(self) -> EditRecord:
        return EditRecord(self.mask.parameter, self.mask.shape, self.mask.indices.clone(),
                          self.values.detach().float().cpu().clone())

    def base_weight(self) -> torch.Tensor:
        return self.layer.base_layer.weight

    @property
    def base_layer(self) -> nn.Module:
        return self.layer.base_layer


def _attach_supertuning(model: nn.Module, module_name: str, mask: InstabilityMask):
    """Wrap `module_name` in peft's Super-Tuning layer and load the mask's indices through peft's public state-dict
    API (the tuner's own index choice is by weight magnitude; `save_precomputed_indices` keeps ours in the adapter)."""
    from peft import SupertuningConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    n, k = mask.numel, mask.k
    # peft allocates int(n·(1 − sparsity)) values; this sparsity makes that exactly k.
    sparsity = 0.0 if k == n else 1 - (k + 0.5) / n
    config = SupertuningConfig(target_modules=[module_name], sparsity=sparsity, save_precomputed_indices=True)
    peft_model = get_peft_model(model, config)
    state = get_peft_model_state_dict(peft_model)
    (indices_key,) = [key for key in state if key.endswith("supertuning_indices")]
    (values_key,) = [key for key in state if key.endswith("supertuning_values")]
    if state[values_key].numel() != k:
        raise RuntimeError(f"peft allocated {state[values_key].numel()} values for {module_name}, expected k={k}")
    device = state[indices_key].device
    set_peft_model_state_dict(peft_model, {indices_key: mask.indices.to(device=device, dtype=torch.int32),
                                           values_key: torch.zeros_like(state[values_key])})
    return peft_model


def build_masked(ctx, source: str) -> SparseDelta:
    """The masked edit of a run: `mask_path`'s mask, or the top-k entries ranked by `source` ("feature": the SAE
    feature(s)' gradient; "bias": the train gap's own gradient; "random": seeded random scores)."""
    args = ctx.args
    if ctx.preset_mask is not None:
        mask = ctx.preset_mask
    elif args.mask_path:
        mask = load_mask_for(args.mask_path, ctx.parameter, tuple(ctx.net.get_parameter(ctx.parameter).shape))
    else:
        grad = None
        if source == "bias":
            grad = gap_gradient(ctx.net, ctx.tokenizer, ctx.parameter, ctx.texts["gap_female_train"],
                                ctx.texts["gap_male_train"], ctx.eval_batch_size)
        strategy = "random" if source == "random" else args.mask_strategy
        mask = compute_mask(ctx.net, ctx.sae, ctx.site, ctx.parameter, ctx.mask_batches, ctx.features, ctx.k,
                            strategy=strategy, seed=args.seed, bos_token_id=ctx.tokenizer.bos_token_id, grad=grad,
                            extra={"method": args.method, "mask_from": source}, model_id=ctx.model_id,
                            sae_id=ctx.sae_name)
    return SparseDelta(ctx.net, ctx.broadcast(mask))


def build_dense(ctx) -> SparseDelta:
    """`dense`: the sparse delta with every entry of W_out in its mask."""
    meta = ctx.mask_meta()
    return SparseDelta(ctx.net, full_mask(ctx.net, meta.pop("parameter"), **meta))
