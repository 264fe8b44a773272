"""What a masked method's entries are ranked by, for the `Method.mask_from` values whose gradient the mask does
not compute itself: the train gap's own (`bias`) or through the features only (`feature_effect`); and the
`random_features` control, which ranks by the feature gradient of latents drawn in place of the run's features;
and any of these gradients projected off the inputs of the prompts the edit must keep
(`model.edit.rank_null_space_energy`).
"""

from __future__ import annotations

import torch

from debias.edits.base import EditContext
from debias.edits.feature_effect import feature_effect_gradients
from debias.edits.gradients import feature_gradients, gap_gradients
from debias.edits.mask import Mask
from debias.edits.null_space import fit_null_space


def mask_from_gradients(ctx: EditContext, mask_from: str, parameters: list[str]) -> list[torch.Tensor] | None:
    """The gradients `mask_from` (`Method.mask_from`) ranks `parameters` by; None where they are the run's features'
    own (`feature`, `random_features`: `debias.edits.mask.entry_scores` computes them) or there are none (`random`)."""
    if mask_from == "bias":
        return gap_gradients(ctx.net, ctx.tokenizer, parameters, ctx.gap_prompts(), None, ctx.eval_batch_size,
                             targets=ctx.bias)
    if mask_from == "feature_effect":
        return feature_effect_gradients(ctx.net, ctx.tokenizer, ctx.sae, ctx.site, parameters, ctx.gap_prompts(),
                                        ctx.features, ctx.eval_batch_size, targets=ctx.bias)
    return None


def ranked_in_null_space(ctx: EditContext, parameters: list[str], grads: list[torch.Tensor] | None,
                          energy: float) -> list[torch.Tensor]:
    """The ranking gradients (the run's features' own where `grads` is None) with each matrix's action on the
    preserved prompts' inputs removed, G − (G U) Uᵀ (`debias.edits.null_space`), so that the top k favours entries
    whose input units those prompts barely use. The edit itself is not constrained: training moves the mask freely."""
    batches = ctx.preserved()
    if not batches:
        raise ValueError("model.edit.rank_null_space_energy needs preserved prompts (the bias spec's train factual "
                         "statements or cue prompts); the train split has none")
    layers = {p: ctx.net.get_submodule(p.removesuffix(".weight")) for p in parameters}
    odd = [p for p, layer in layers.items() if not isinstance(layer, torch.nn.Linear)]
    if odd:
        raise ValueError(f"model.edit.rank_null_space_energy needs nn.Linear W_out ([out, in]); {odd[0]} is a "
                         f"{type(layers[odd[0]]).__name__}")
    if grads is None:
        grads = feature_gradients(ctx.net, ctx.sae, ctx.site, parameters, ctx.mask_batches, ctx.features,
                                  ctx.tokenizer.bos_token_id)
    space = fit_null_space(ctx.net, layers, batches, energy)
    return [space.project(p, g.float()) for p, g in zip(parameters, grads, strict=True)]


def use_random_features(ctx: EditContext, given: Mask | None) -> dict:
    """`random_features`: replace the run's features by as many live latents drawn at random, seeded by `mask_seed`
    (`debias.features.select.random_live_features`), or by a given mask's own when random_features drew them; returns
    what the mask records. The list changes in place: it is the module's own (`DebiasModule.prepare` passes it), so
    the objective, the feature metrics and the report use the drawn latents too."""
    from debias.features.select import random_live_features

    if given is not None:
        made_by = given.parts[0].extra.get("mask_from")
        if made_by != "random_features":
            raise ValueError(f"random_features was given a mask ranked by {made_by!r}; it needs one whose features "
                             "it drew itself (mask_from 'random_features'), or none")
        ctx.features[:] = list(given.features)
        return {}
    record: dict = {}
    ctx.features[:] = random_live_features(ctx.net, ctx.sae, ctx.site, ctx.mask_batches, len(ctx.features),
                                           ctx.args.mask_seed, ctx.tokenizer.bos_token_id, exclude=list(ctx.features),
                                           record=record)
    return record
