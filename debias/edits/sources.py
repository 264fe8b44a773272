"""What a masked method's entries are ranked by, for the `Method.mask_from` values whose gradient the mask does
not compute itself: the train gap's own (`bias`) or through the features only (`feature_effect`); and the
`random_features` control, which ranks by the feature gradient of latents drawn in place of the run's features.
"""

from __future__ import annotations

import torch

from debias.edits.base import EditContext
from debias.edits.feature_effect import feature_effect_gradients
from debias.edits.gradients import gap_gradients
from debias.edits.mask import Mask


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
