"""What ranks the `feature_effect` mask: the train bias gap's gradient with respect to `W_out` taken only through the
chosen SAE latents, Σ_f (∂gap/∂a_f) · ∂a_f/∂W, with the SAE's error term held fixed.

At the SAE's hook the activation x [batch, seq, d_in] becomes x.detach() + decode(z') − decode(z').detach(): exactly
x in value, with z' the SAE code whose chosen latents a_F sit on a gradient leaf. The gap's backward stops at that
leaf and gives ∂gap/∂a_f at every position (through the decoder; BOS included, padding gets 0). A second backward, of
Σ (∂gap/∂a_f) · a_f(x) through the encoder, carries it to the weights below the hook by every path that reaches the
hook, and by no other: a lower layer's direct effect on the gap (through the residual stream past the hook) does not
count, and a layer above the hook cannot move the features, so its gradient is all zero (as `instability`'s is).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from debias.edits.gradients import accumulate, gap_parts, tracking
from debias.models import hooks

if TYPE_CHECKING:
    from debias.bias_spec import BiasSpec
    from debias.prompts import GapPrompts


class FeaturePath:
    """The hook function: x -> x in value; the gradient of what follows reaches x only through `features`.

    Each forward appends (leaf, acts) to `found`: both [batch, seq, n_features], `leaf` the latents the decoder reads
    (a gradient leaf), `acts` the same values computed from x (connected to the weights below the hook).
    """

    def __init__(self, sae, features: Sequence[int]):
        if not features:
            raise ValueError("feature_effect needs at least one feature, got none")
        self.sae, self.index = sae, torch.tensor(list(features), dtype=torch.long)
        self.found: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = self.sae.encode(x.to(self.sae.W_enc.dtype))
        index = self.index.to(z.device)
        acts = z.index_select(-1, index)
        leaf = acts.detach().requires_grad_(True)
        recon = self.sae.decode(z.detach().index_copy(-1, index, leaf))
        self.found.append((leaf, acts))
        return x.detach() + (recon - recon.detach()).to(x.dtype)


def feature_effect_gradients(model, tokenizer, sae, site: hooks.HookSite, parameters: Sequence[str],
                             texts: GapPrompts | Sequence[list[str]], features: Sequence[int], batch_size: int = 16,
                             progress: bool = True,
                             targets: BiasSpec | str | Sequence[str] = "gender") -> list[torch.Tensor]:
    """Σ_f (∂gap/∂a_f) · ∂a_f/∂W for each of `parameters` (module docstring), float32, summed over batches.

    `texts`: the train gap prompts, a `GapPrompts` or one list per group of the bias `targets` (as `gap_gradients`).
    Raises when the gradient is zero everywhere (the features never fire on the prompts, or no matrix moves them).
    """
    path = FeaturePath(sae, features)
    with tracking(model, parameters) as (weights, grads), hooks.replace(model, site, path):
        for part in gap_parts(model, tokenizer, texts, None, batch_size, progress, targets):
            found, path.found = path.found, []
            effects = torch.autograd.grad(part, [leaf for leaf, _ in found], allow_unused=True)
            through = [(effect.detach() * acts).sum() for effect, (_, acts) in zip(effects, found, strict=True)
                       if effect is not None]
            if through:
                accumulate(torch.stack(through).sum(), weights, grads)
    if not any(g.abs().sum() > 0 for g in grads):
        raise ValueError(f"the train gap's gradient through feature(s) {list(features)} is zero for "
                         f"{', '.join(parameters)}: the features never fire on the gap prompts, or these matrices "
                         "(all above the SAE's hook?) cannot move them")
    return grads


def feature_effect_gradient(model, tokenizer, sae, site: hooks.HookSite, parameter: str,
                            texts: GapPrompts | Sequence[list[str]], features: Sequence[int], batch_size: int = 16,
                            progress: bool = True, targets: BiasSpec | str | Sequence[str] = "gender") -> torch.Tensor:
    """`feature_effect_gradients` of one matrix."""
    return feature_effect_gradients(model, tokenizer, sae, site, [parameter], texts, features, batch_size, progress,
                                    targets)[0]
