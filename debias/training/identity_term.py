"""The identity half of the feature-level split (issue #26): keep the SAE latents that carry group identity.

The edit's own latents (`model.sae.feature_target: statements`) carry the stereotype, and the mask follows them. The
identity latents are chosen the same way, by attribution to the train **factual margin** ("My mother is a" →
" woman" over " man"), confirmed by joint ablation (`debias.features.select`, target `factual`; `n_identity_features`
of them, cached like the features). `objective.identity` penalises their change on the train factual statements:

    identity = mean over the real tokens t of a batch of train factual statements (context + true word) and the
               identity latents j of ((z_j(t) − z⁰_j(t)) / s_j)²,

with z read by the SAE at its hook on the edited model, z⁰ on the original one (the edit switched off; memoised by
the training fast path like the KL terms' reference outputs), and s_j the root mean square of z⁰_j over the real
tokens of every train factual statement. It is 0 before training. A latent in both sets is dropped from the identity
set (the edit is meant to move it), and so is one that never fires on the factual statements (its scale is 0): both
are logged and recorded in the report (`identity_selection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from debias.models import hooks
from debias.sae.ops import encode_features
from debias.training.cache import original_output
from debias.training.console import say


@dataclass(frozen=True)
class IdentityLatents:
    """The latents `objective.identity` keeps, their original scale s [n] and how they were chosen."""

    latents: list[int]
    scale: torch.Tensor
    record: dict = field(default_factory=dict)


def factual_texts(items) -> list[str]:
    """Each factual statement cut after its true word ("My mother is a woman"): what the identity term reads."""
    return [item.context + item.words[item.group] for item in items]


def check_identity_data(weight: float, bias: str, prompt_dir: str | None) -> None:
    """Refuse `objective.identity` > 0 when the data has no train factual statements (before any model loads)."""
    if not weight or weight <= 0:
        return
    if prompt_dir is not None:
        raise ValueError(f"objective.identity={weight} needs the bias spec's train factual statements, but "
                         f"data.prompt_dir={prompt_dir!r} replaces the spec with prompt files that have none; set "
                         "objective.identity to 0")
    from debias.bias_spec import load_bias_spec

    spec = load_bias_spec(bias)
    if not (spec.subjects and spec.factual.get("train")):  # the DataModule reads factual items beside the statements
        raise ValueError(f"objective.identity={weight} needs train factual statements, but bias spec {spec.name!r} "
                         f"({spec.path}) gives none to train on (the data reads them only from a spec with "
                         "`statements`); set objective.identity to 0")


def _latents(module, batch: dict, latents: list[int]) -> torch.Tensor:
    """[batch, seq, n] the SAE activations of `latents` at the module's hook."""
    return encode_features(module.sae, hooks.forward_until(module.net, module.site, **batch), latents)


@torch.no_grad()
def fit_identity(module, items, datamodule, batch_size: int = 16) -> IdentityLatents:
    """Choose the identity latents on `datamodule`'s train factual statements `items` and measure their original
    scale; `module` is a `DebiasModule` with its features chosen and no edit attached yet (its network is the
    original model)."""
    from debias.features.choice_cache import choose_features

    if not items:
        raise ValueError("objective.identity > 0 needs train factual statements, but the data has none; set "
                         "objective.identity to 0")
    record: dict = {}
    chosen, how = choose_features(module, datamodule, record, target="factual", n=module.sae_args.n_identity_features)
    overlap = [f for f in chosen if f in module.features]
    candidates = [f for f in chosen if f not in module.features]
    squares, count = torch.zeros(len(candidates), dtype=torch.float64), 0
    texts = factual_texts(items)
    for start in range(0, len(texts), batch_size) if candidates else ():
        batch = module.tokenize(texts[start:start + batch_size])
        real = module.real(batch)
        z = _latents(module, batch, candidates)
        squares += (z.double() ** 2 * real.unsqueeze(-1)).sum(dim=(0, 1)).cpu()
        count += int(real.sum())
    scale = (squares / max(count, 1)).sqrt().float()
    silent = [f for f, s in zip(candidates, scale.tolist(), strict=True) if s <= 0]
    kept = [f for f in candidates if f not in silent]
    record.update(identity_features=kept, chosen=chosen, dropped_stereotype_features=overlap,
                  dropped_silent=silent, scale=[s for s in scale.tolist() if s > 0], how=how,
                  term="mean over real tokens of the train factual statements and latents of ((z - z0) / scale)^2")
    say(f"identity latents {kept} (train factual-margin attribution; {how})")
    if overlap:
        say(f"identity latents {overlap} are also stereotype features {module.features}: dropped from the identity "
            "set (the edit is meant to move them)")
    if silent:
        say(f"identity latents {silent} never fire on the train factual statements: dropped from the identity set")
    if not kept:
        raise ValueError(f"objective.identity > 0, but no identity latent is left: of {chosen}, {overlap} are also "
                         f"the edit's features and {silent} never fire on the train factual statements")
    return IdentityLatents(kept, scale[scale > 0], record)


def identity_term(module, items) -> torch.Tensor:
    """The identity penalty (module docstring) on a batch of train factual statements `items`; differentiable with
    respect to the edit. `module.identity` holds the latents (`fit_identity`)."""
    identity: IdentityLatents = module.identity
    texts = factual_texts(items)
    batch = module.tokenize(texts)
    real = module.real(batch).unsqueeze(-1)
    original = original_output(module, "identity", texts, lambda: _latents(module, batch, identity.latents))
    current = _latents(module, batch, identity.latents)
    change = ((current - original) / identity.scale.to(current)) ** 2
    return (change * real).sum() / (real.sum().clamp_min(1) * len(identity.latents))
