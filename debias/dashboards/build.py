"""Gather what each dashboard shows: which latents, their held-out activation before and after the edit, their corpus
view and logit effects, and their Neuronpedia page when the SAE comes from a public release."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from debias.dashboards.contexts import DEFAULT_TOKENS, CorpusView, corpus_latents, corpus_view
from debias.dashboards.logits import LogitEffects, logit_effects
from debias.features.rank import activation_stats
from debias.models import hooks
from debias.sae.load import check_features

NEURONPEDIA = "https://neuronpedia.org"  # sae_lens.analysis.neuronpedia_integration's domain (that module loads .env)


@dataclass(frozen=True)
class Dashboard:
    """One latent: `role` "chosen" (the report's `features`) or "moved" (among those the edit moved most); mean
    activation on the held-out bias prompts `before` and `after` the edit (None: no edit given)."""

    latent: int
    role: str
    before: float
    after: float | None
    corpus: CorpusView
    logits: LogitEffects
    url: str | None


@dataclass(frozen=True)
class Page:
    """Everything `debias.dashboards.page.render` draws."""

    title: str
    hook_name: str
    n_prompts: int
    dashboards: list[Dashboard]


def heldout_means(model, tokenizer, sae, site: hooks.HookSite, texts: list[str], batch_size: int = 16,
                  max_length: int = 64) -> torch.Tensor:
    """[d_sae] mean activation of every latent over the real tokens of `texts` (the held-out bias prompts), each
    cut at `max_length` tokens (a run's `model.train.max_length` gives the report's `feature_act`)."""
    stats = activation_stats(model, tokenizer, sae, site, texts, batch_size=batch_size, max_length=max_length)
    return stats["mean_act"]


def moved_most(before: torch.Tensor, after: torch.Tensor, exclude: list[int], n: int = 10) -> list[int]:
    """The `n` latents outside `exclude` whose mean activation [d_sae] changed most in absolute value, largest
    first (ties: lower index first); latents that did not move are left out."""
    change = (after - before).abs().double()
    change[list(exclude)] = -1.0
    order = sorted(range(len(change)), key=lambda i: (-float(change[i]), i))[:n]
    return [i for i in order if change[i] > 0]


def neuronpedia_base(sae, release: str | None = None, sae_id: str | None = None) -> str | None:
    """`https://neuronpedia.org/<model>/<sae>` for an SAE of a public release (Gemma Scope, ...): the SAE's
    `cfg.metadata.neuronpedia_id` (set by `SAE.from_pretrained`), else sae_lens' release table for `release` /
    `sae_id`; None for an SAE Neuronpedia does not host (the project's own builds)."""
    np_id = getattr(getattr(sae.cfg, "metadata", None), "neuronpedia_id", None)
    if not np_id and release and sae_id:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        info = get_pretrained_saes_directory().get(release)
        np_id = (info.neuronpedia_id or {}).get(sae_id) if info is not None else None
    return f"{NEURONPEDIA}/{np_id}" if np_id else None


def build_page(model, tokenizer, sae, site: hooks.HookSite, features: list[int], texts: list[str],
               before: torch.Tensor, after: torch.Tensor | None, title: str, n_tokens: int = DEFAULT_TOKENS,
               n_moved: int = 10, release: str | None = None, sae_id: str | None = None) -> Page:
    """A dashboard for each of `features` and (with `after`) the `n_moved` other latents whose mean activation on
    `texts` (the held-out bias prompts: before / after [d_sae], `heldout_means`) the edit moved most; their corpus
    view is read from `n_tokens` tokens of the project's SAE corpus (`contexts.corpus_latents`)."""
    if sae is None:
        raise ValueError("feature dashboards need an SAE; this run has none")
    if not features:
        raise ValueError("feature dashboards need at least one chosen latent, got none")
    check_features(sae, list(features))
    features = [int(f) for f in features]
    moved = moved_most(before, after, features, n_moved) if after is not None else []
    latents = features + moved
    ids, real, z = corpus_latents(model, tokenizer, sae, site, latents, n_tokens)
    effects = logit_effects(model, tokenizer, sae, latents)
    base = neuronpedia_base(sae, release, sae_id)
    boards = [Dashboard(f, "chosen" if j < len(features) else "moved", float(before[f]),
                        None if after is None else float(after[f]), corpus_view(tokenizer, ids, real, z[..., j]),
                        effects[f], f"{base}/{f}" if base else None) for j, f in enumerate(latents)]
    return Page(title, site.hook_name, len(texts), boards)
