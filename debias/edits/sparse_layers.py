"""The layers that carry a sparse delta (`debias.edits.sparse.SparseDelta`): peft's Super-Tuning tuner on `nn.Linear`
(one adapter over every edited module), and `SparseConv1D`, a small fallback for GPT-2's `Conv1D`, which peft refuses
(its weight is stored `[in, out]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from debias.edits.base import ADAPTER
from debias.edits.mask import InstabilityMask

__all__ = ["ADAPTER", "SparseConv1D", "attach_supertuning"]



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

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold the values into the weight (peft's layer signature; `SparseDelta` checks the result is finite)."""
        if not self.merged:
            weight = self.base_layer.weight.data
            weight.view(-1).scatter_add_(0, self.indices, self.values.data.to(weight))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight.data
            weight.view(-1).scatter_add_(0, self.indices, -self.values.data.to(weight))
            self.merged = False


def attach_supertuning(model: nn.Module, masks: Sequence[InstabilityMask]):
    """Wrap each mask's module in peft's Super-Tuning layer (one adapter over all of them) and load the masks' indices
    through peft's public state-dict API (the tuner's own index choice is by weight magnitude;
    `save_precomputed_indices` keeps ours in the adapter). Returns the peft model.

    peft gives every target module the share of value slots of one `sparsity`. One matrix gets exactly its k slots.
    Several matrices, whose k differ (a joint mask), get at least their k each: slot i < k holds the mask's i-th
    entry, and the extra slots ("fillers") sit at the first entries outside the mask, their values held at exactly
    0 by `SparseDelta`, so that the saved adapter reloads with `PeftModel.from_pretrained` as it is.
    """
    from peft import SupertuningConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    names = [mask.parameter.removesuffix(".weight") for mask in masks]
    # peft allocates int(n·(1 − sparsity)) values per module; this sparsity makes that k for the largest k / n.
    full = any(mask.k == mask.numel for mask in masks)
    sparsity = 0.0 if full else 1 - max((mask.k + 0.5) / mask.numel for mask in masks)
    config = SupertuningConfig(target_modules=names, sparsity=sparsity, save_precomputed_indices=True)
    peft_model = get_peft_model(model, config)
    state = get_peft_model_state_dict(peft_model)
    loaded = {}
    for name, mask in zip(names, masks, strict=True):
        (indices_key,) = [key for key in state if key.endswith(f".{name}.supertuning_indices")]
        (values_key,) = [key for key in state if key.endswith(f".{name}.supertuning_values")]
        slots = state[values_key].numel()
        if slots < mask.k or (len(masks) == 1 and slots != mask.k):
            raise RuntimeError(f"peft allocated {slots} values for {name}, expected k={mask.k}")
        free = torch.ones(mask.numel, dtype=torch.bool)
        free[mask.indices] = False
        indices = torch.cat([mask.indices, free.nonzero().flatten()[: slots - mask.k]])
        loaded[indices_key] = indices.to(device=state[indices_key].device, dtype=torch.int32)
        loaded[values_key] = torch.zeros_like(state[values_key])
    set_peft_model_state_dict(peft_model, loaded)
    return peft_model
