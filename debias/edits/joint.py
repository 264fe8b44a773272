"""A masked edit of the `W_out` of several layers (`model.edit.layers`): one mask ranked jointly over all of them.

The scores of every matrix (the feature gradient, the gap gradient or seeded random numbers, through the same
`STRATEGIES` as one matrix) are concatenated in layer order, the global top k is taken (ties to the earlier matrix,
then the lower flat index, as `top_k_flat`), and the chosen entries are split back per matrix: a `JointMask`, whose
`k` is the same total k a one-matrix mask has (k = fraction × the numel of all the matrices, or `k` as given).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn

from debias.edits.mask import InstabilityMask, JointMask, entry_scores, top_k_flat
from debias.models import hooks


def n_layers(net: nn.Module) -> int:
    """The number of decoder layers of a HF causal LM."""
    config = cast(Any, net).config  # every HF model has one
    return int(config.get_text_config().num_hidden_layers)


def edited_matrices(net: nn.Module, sae_layer: int, layers: Sequence[int] | None) -> tuple[list[int], list[str]]:
    """The layers and `W_out` names a masked edit trains, in layer order: the SAE's layer only when `layers` is None.

    `layers` comes checked from `EditArgs` (non-empty, no repeats, >= 0); here it is checked against the model.
    """
    if layers is None:
        return [sae_layer], [hooks.w_out_name(net, sae_layer)]
    total = n_layers(net)
    outside = [i for i in layers if not 0 <= i < total]
    if outside:
        raise ValueError(f"model.edit.layers={list(layers)}: layer {outside[0]} is outside the model (expected "
                         f"0 <= i < {total}, the model's number of layers)")
    chosen = sorted(layers)
    if len(chosen) == 1 and chosen[0] != sae_layer:  # one matrix is recorded as the SAE layer's everywhere
        raise ValueError(f"model.edit.layers={list(layers)} names one layer other than the SAE's ({sae_layer}); "
                         f"expected null (the SAE's layer), or a list with {sae_layer} in it")
    return chosen, [hooks.w_out_name(net, i) for i in chosen]


def joint_top_k(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per matrix, the flat indices (sorted) of its entries among the k largest of all `scores` together."""
    chosen = top_k_flat(torch.cat([s.flatten() for s in scores]), k)
    out, start = [], 0
    for s in scores:
        out.append(chosen[(chosen >= start) & (chosen < start + s.numel())] - start)
        start += s.numel()
    return out


def compute_joint_mask(model, sae, site: hooks.HookSite, parameters: Sequence[str], layers: Sequence[int],
                       batches: Iterable[dict], features: list[int], k: int, strategy: str = "gradient", seed: int = 0,
                       bos_token_id: int | None = None, progress: bool = True,
                       grads: Sequence[torch.Tensor] | None = None, **meta) -> JointMask:
    """Score the entries of all of `parameters` (the `W_out` of `layers`) by `strategy` and keep the top k of them
    together (`joint_top_k`); `compute_mask` of several matrices.

    The gradients are the feature(s)' (`feature_gradients`) unless others are passed as `grads` (e.g. the gap's).
    The feature gradient of a matrix above the SAE's hook is zero (the forward stops at the hook): its entries score
    0 and are chosen only by ties, after every entry with a non-zero score, in layer then flat-index order.
    `random` scores are seeded uniform numbers over all the entries.
    """
    flat = entry_scores(model, sae, site, parameters, batches, features, strategy, seed, bos_token_id, progress, grads)
    weights = [model.get_parameter(p) for p in parameters]
    chosen = joint_top_k(list(torch.split(flat, [w.numel() for w in weights])), k)
    parts = tuple(InstabilityMask(parameter=p, shape=tuple(w.shape), indices=idx, layer=layer,
                                  hook_name=site.hook_name, features=tuple(features), strategy=strategy, **meta)
                  for p, w, idx, layer in zip(parameters, weights, chosen, layers, strict=True))
    return JointMask(parts, site.layer)
