"""Rank SAE features for a bias's stereotype gap (train split only) and pick the ones a run edits.

Effect = gradient × activation through the SAE spliced in *with its error term*, so the forward is unchanged:
a latent's attribution is the first-order change of the gap when it is zeroed (summed over every prompt position,
aggregated as the gap itself: the sum over groups of the mean margin of that group's prompts, gender: mean female
margin - mean male margin; the groups and their targets come with the `GapPrompts`). Latents + error sum to the
gap's derivative along the hooked activation minus the decoder bias. Candidates are confirmed by ablation, singly
and jointly.

`attribute_statements` / `ablated_statement_gap` do the same for the statement gap of a spec's sentence-level
statements (`debias.statements`): Σ over groups of the mean own-group margin of log p(attribute | prefix), the
latents taken at every attended token of each prefix and its attribute (BOS included, as an ablation zeroes it).
`attribute_factual` / `ablated_factual_margin` do it for the factual margin of the spec's factual statements (the
latents that carry group identity, which an edit must keep).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from debias.models import hooks
from debias.models.continuation import (
    continuation_batch,
    continuation_logprobs,
    picked_logits,
    statement_logprobs,
    summed_logprobs,
)
from debias.models.scoring import (
    gap_from_logprobs,
    group_gap,
    group_margins,
    next_token_logprobs,
    own_group_margins,
    target_ids,
)
from debias.prompts import GapPrompts
from debias.sae.ops import ablate
from debias.statements import FactualItem, StatementItem, item_groups, statement_texts


@dataclass
class Attribution:
    """`latents` [d_sae] and `error` (the SAE error term's share) of the gap's first-order decomposition."""

    latents: torch.Tensor
    error: float
    gap: float


def _weights(prompts: GapPrompts) -> torch.Tensor:
    """[n] w such that sum(w * group margins) is the gap: 1 / (the size of the prompt's group)."""
    counts = [len(texts) for texts in prompts.texts]
    if not all(counts):
        raise ValueError(f"the gap needs prompts of every group, got {dict(zip(prompts.groups, counts, strict=True))}")
    return torch.tensor([1.0 / n for n in counts])[prompts.group_index]


def _attribute_sites(model, tokenizer, prompts: GapPrompts, splices: dict, batch_size: int):
    """Backpropagate the gap batch by batch with `splices` {site: fn(x, site, found) -> x'} hooked in; each fn appends
    (site, leaf, value) to `found`. Yields (this batch's share of the gap, [(site, d share / d leaf, value)])."""
    ids, index = target_ids(tokenizer, prompts), prompts.group_index
    weights, texts = _weights(prompts), prompts.prompts
    for start in range(0, len(texts), batch_size):
        found: list = []
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for site, fn in splices.items():
                stack.enter_context(hooks.replace(model, site, lambda x, s=site, fn=fn, found=found: fn(x, s, found)))
            lp = next_token_logprobs(model, tokenizer, texts[start:start + batch_size], batch_size)
            w = weights[start:start + batch_size].to(lp.device)
            part = (w * group_margins(lp, ids, index[start:start + batch_size])).sum()
            grads = torch.autograd.grad(part, [leaf for _, leaf, _ in found])
        yield float(part.detach()), [(s, g, v) for (s, _, v), g in zip(found, grads, strict=False)]


def sae_splice(sae):
    """fn(x, site, found) -> x: the SAE spliced in with its error term, exactly x forward; appends the latents' and
    the error's leaves (site, leaf, value) to `found`, so gradients reach z (through the decoder) and the error."""
    dtype = sae.W_enc.dtype

    def splice(x, s, found):
        z = sae.encode(x.detach().to(dtype)).detach().requires_grad_(True)
        recon = sae.decode(z)
        err = (x.detach().to(dtype) - recon.detach()).requires_grad_(True)
        found += [(s, z, z.detach()), (s, err, err.detach())]
        return x.detach() + ((recon - recon.detach()) + (err - err.detach())).to(x.dtype)

    return splice


def attribute(model, tokenizer, sae, site, gap_prompts: GapPrompts, batch_size: int = 16) -> Attribution:
    """Gradient × activation of every latent (and of the error term) on the gap, SAE spliced in with its error."""
    splice = sae_splice(sae)
    latents, error, gap = torch.zeros(sae.cfg.d_sae, dtype=torch.float64), 0.0, 0.0
    for part, pairs in _attribute_sites(model, tokenizer, gap_prompts, {site: splice}, batch_size):
        (_, gz, z), (_, ge, e) = pairs
        latents += (gz * z).sum(dim=(0, 1)).double().cpu()
        error += float((ge * e).sum())
        gap += part
    return Attribution(latents.float(), error, gap)


def layer_attribution(model, tokenizer, gap_prompts: GapPrompts, batch_size: int = 16) -> list[dict]:
    """One row per layer: gradient × activation of that layer's MLP output (`blocks.L.hook_mlp_out`) on the gap,
    and its share of the gap."""
    n_layers = model.config.get_text_config().num_hidden_layers
    sites = [hooks.resolve_hook(model, f"blocks.{layer}.hook_mlp_out", tokenizer) for layer in range(n_layers)]

    def splice(x, s, found):
        zero = torch.zeros_like(x, requires_grad=True)  # x + 0 keeps every upstream path differentiable
        found.append((s, zero, x.detach()))
        return x + zero

    totals, gap = [0.0] * n_layers, 0.0
    for part, pairs in _attribute_sites(model, tokenizer, gap_prompts, {s: splice for s in sites}, batch_size):
        gap += part
        for s, g, v in pairs:
            totals[s.layer] += float((g * v).sum())
    return [{"layer": site.layer, "hook_name": site.hook_name, "attribution": a, "share": _share(a, gap), "gap": gap}
            for site, a in zip(sites, totals, strict=False)]


def _share(part: float, whole: float) -> float:
    return part / whole if whole else float("nan")


@torch.no_grad()
def _gap(model, tokenizer, prompts: GapPrompts, site=None, fn=None, batch_size: int = 16) -> float:
    ids = target_ids(tokenizer, prompts)
    with hooks.replace(model, site, fn) if fn is not None else contextlib.nullcontext():
        lp = next_token_logprobs(model, tokenizer, prompts.prompts, batch_size)
    return float(gap_from_logprobs(lp, ids, prompts.group_index))


def ablated_gap(model, tokenizer, sae, site, gap_prompts: GapPrompts, features: list[int],
                batch_size: int = 16) -> float:
    """The gap with `features` ablated jointly through the SAE (error term kept) at every position."""
    features = list(features)
    return _gap(model, tokenizer, gap_prompts, site, lambda x: ablate(sae, x, features), batch_size)


def ablation_effect(model, tokenizer, sae, site, gap_prompts: GapPrompts, features: list[int],
                    base_gap: float | None = None, batch_size: int = 16) -> float:
    """Relative change of the gap when `features` are ablated jointly: (ablated - base) / base (-0.39: 39% closer
    to 0; below -1: the sign flipped)."""
    base = _gap(model, tokenizer, gap_prompts, batch_size=batch_size) if base_gap is None else base_gap
    if base == 0:
        raise ValueError("the base gap is 0: a relative change is undefined")
    return (ablated_gap(model, tokenizer, sae, site, gap_prompts, features, batch_size) - base) / base


def _statement_groups(items: list[StatementItem]) -> torch.Tensor:
    """[n] the items' groups; raises unless every group has an item (as the gap's mean over each group needs)."""
    if not items:
        raise ValueError("the statement gap needs at least one statement item")
    group = item_groups(items)
    counts = torch.bincount(group, minlength=len(items[0].prefixes))
    if not counts.all():
        raise ValueError(f"the statement gap needs statements of every group, got {counts.tolist()} per group")
    return group


def _attribute_margins(model, tokenizer, sae, site, contexts: list[str], continuations: list[str],
                       group: torch.Tensor, weights: torch.Tensor, batch_size: int) -> Attribution:
    """Gradient x activation of every latent (and of the error term) on Σ_i weights[i] x (own-group margin of item
    i), where item i is scored by the log-likelihoods of its `n_groups` consecutive (context, continuation) pairs;
    SAE spliced in with its error, summed over every attended token. `batch_size` counts sequences."""
    n_items = len(group)
    n_groups, splice = len(contexts) // n_items, sae_splice(sae)
    step = max(1, batch_size // n_groups)
    device = next(model.parameters()).device
    latents, error, gap = torch.zeros(sae.cfg.d_sae, dtype=torch.float64), 0.0, 0.0
    for start in range(0, n_items, step):
        stop = min(start + step, n_items)
        batch = continuation_batch(tokenizer, contexts[start * n_groups:stop * n_groups],
                                   continuations[start * n_groups:stop * n_groups], device)
        found: list = []
        with torch.enable_grad(), hooks.replace(model, site, lambda x, found=found: splice(x, site, found)):
            logits = model(**batch.model_inputs()).logits
            logprobs = summed_logprobs(picked_logits(logits, batch), batch).view(stop - start, n_groups)
            margins = own_group_margins(logprobs, group[start:stop].to(logprobs.device))
            part = (weights[start:stop].to(margins.device) * margins.double()).sum()
            (_, z_leaf, z), (_, e_leaf, e) = found
            gz, ge = torch.autograd.grad(part, [z_leaf, e_leaf])
        real = batch.attention_mask[..., None].to(z.dtype)
        latents += (gz * z * real).sum(dim=(0, 1)).double().cpu()
        error += float((ge * e * real).sum())
        gap += float(part.detach())
    return Attribution(latents.float(), error, gap)


def attribute_statements(model, tokenizer, sae, site, items: list[StatementItem],
                         batch_size: int = 16) -> Attribution:
    """Gradient × activation of every latent (and of the error term) on the statement gap
    `group_gap(own_group_margins(statement_logprobs(...)))`, SAE spliced in with its error, summed over
    every attended token of the prefixes and attributes. `batch_size` counts sequences (item x group prefix)."""
    group = _statement_groups(items)
    weights = 1.0 / torch.bincount(group).double()[group]  # Σ_i w_i margin_i = Σ_g mean of group g's margins
    return _attribute_margins(model, tokenizer, sae, site, *statement_texts(items), group, weights, batch_size)


def _factual_texts(items: list[FactualItem]) -> tuple[list[str], list[str]]:
    """(contexts, words) that score factual `items`: each item's context with each group's word, item-major."""
    return [item.context for item in items for _ in item.words], [w for item in items for w in item.words]


def attribute_factual(model, tokenizer, sae, site, items: list[FactualItem], batch_size: int = 16) -> Attribution:
    """Gradient × activation of every latent (and of the error term) on the factual margin: the mean over `items`
    of log p(true word | context) minus the mean over the other groups' words ("My mother is a" → " woman" vs
    " man"; `debias.evaluation.sentence_metrics.factual_margin`), summed over every attended token of the contexts
    and words. The latents that carry group identity attribute positively to it."""
    if not items:
        raise ValueError("the factual margin needs at least one factual item")
    group = item_groups(items)
    weights = torch.full((len(items),), 1.0 / len(items), dtype=torch.float64)
    return _attribute_margins(model, tokenizer, sae, site, *_factual_texts(items), group, weights, batch_size)


@torch.no_grad()
def factual_margin_value(model, tokenizer, items: list[FactualItem], site=None, fn=None,
                         batch_size: int = 16) -> float:
    """The factual margin (`attribute_factual`), with the hooked tensor at `site` -> fn(tensor)."""
    with hooks.replace(model, site, fn) if fn is not None else contextlib.nullcontext():
        logprobs = continuation_logprobs(model, tokenizer, *_factual_texts(items), batch_size).cpu()
    return float(own_group_margins(logprobs.view(len(items), -1), item_groups(items)).mean())


def ablated_factual_margin(model, tokenizer, sae, site, items: list[FactualItem], features: list[int],
                           batch_size: int = 16) -> float:
    """The factual margin with `features` ablated jointly through the SAE (error term kept) at every position."""
    features = list(features)
    return factual_margin_value(model, tokenizer, items, site, lambda x: ablate(sae, x, features), batch_size)


@torch.no_grad()
def statement_gap_value(model, tokenizer, items: list[StatementItem], site=None, fn=None,
                        batch_size: int = 16) -> float:
    """The statement gap (`debias.evaluation.sentence_metrics`), with the hooked tensor at `site` -> fn(tensor)."""
    group = _statement_groups(items)
    with hooks.replace(model, site, fn) if fn is not None else contextlib.nullcontext():
        logprobs = statement_logprobs(model, tokenizer, items, batch_size).cpu()
    return float(group_gap(own_group_margins(logprobs, group), group, logprobs.shape[1]))


def ablated_statement_gap(model, tokenizer, sae, site, items: list[StatementItem], features: list[int],
                          batch_size: int = 16) -> float:
    """The statement gap with `features` ablated jointly through the SAE (error term kept) at every position."""
    features = list(features)
    return statement_gap_value(model, tokenizer, items, site, lambda x: ablate(sae, x, features), batch_size)
