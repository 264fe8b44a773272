"""What ranks a mask's entries: the SAE feature(s)' gradient (`instability`) and the train gap's (`bias_gradient`),
with respect to one weight matrix or several at once (`model.edit.layers`), summed over batches, in float32; and the
`STRATEGIES` that turn a gradient into scores.

`debias.edits.mask` re-exports the one-matrix gradients (`feature_gradient`, `gap_gradient`);
`debias.edits.feature_effect` has the gap's gradient taken through the features only (`feature_effect`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from debias.models import hooks
from debias.models.scoring import real_token_mask
from debias.sae.ops import summed_feature_acts

if TYPE_CHECKING:
    from debias.bias_spec import BiasSpec
    from debias.prompts import GapPrompts

STRATEGIES: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {}


def register_strategy(name: str):
    """Register a scoring rule `score(grad, weight, seed) -> Tensor` (same shape) under `name`."""

    def wrap(fn):
        STRATEGIES[name] = fn
        return fn

    return wrap


@register_strategy("gradient")
def _gradient(grad: torch.Tensor, weight: torch.Tensor, seed: int) -> torch.Tensor:
    return grad.abs()


@register_strategy("grad_x_weight")
def _grad_x_weight(grad: torch.Tensor, weight: torch.Tensor, seed: int) -> torch.Tensor:
    """|g · w|: the first-order change of the objective when the entry is zeroed."""
    return (grad * weight.float()).abs()


@register_strategy("random")
def _random(grad: torch.Tensor, weight: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.rand(grad.shape, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def tracking(model: nn.Module, parameters: Sequence[str]) -> Iterator[tuple[list[nn.Parameter], list[torch.Tensor]]]:
    """The weights of `parameters` with gradients on, and one float32 zero tensor per weight to sum them into;
    afterwards each weight's gradient is cleared and its `requires_grad` restored."""
    weights = [model.get_parameter(p) for p in parameters]
    grads = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    was = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        yield weights, grads
    finally:
        for w, flag in zip(weights, was, strict=True):
            w.grad = None
            w.requires_grad_(flag)


def accumulate(loss: torch.Tensor, weights: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    """Add d loss / d weight to each grad; a weight the loss does not depend on (e.g. a layer above the SAE's hook,
    which never runs) adds nothing."""
    for w in weights:
        w.grad = None
    if loss.requires_grad:
        loss.backward()
    for w, g in zip(weights, grads, strict=True):
        if w.grad is not None:
            g += w.grad.float()


def feature_gradients(model, sae, site: hooks.HookSite, parameters: Sequence[str], batches: Iterable[dict],
                      features: list[int], bos_token_id: int | None, progress: bool = True) -> list[torch.Tensor]:
    """Gradient of Σ_f a_f / a_f⁰ with respect to each of `parameters`, summed over batches, float32, same shapes.

    a_f is feature f's activation summed over real tokens; a_f⁰ its total over all batches (so that no
    feature dominates). The forward stops at the SAE's hook: layers above it never run, so a matrix above the hook
    gets an all-zero gradient. `batches` yields tokenised inputs (`input_ids`, `attention_mask`, [batch, seq]); it
    is iterated twice when there are several features.
    """
    batches = list(batches)
    if len(features) > 1:
        with torch.no_grad():
            totals = sum(_summed(model, sae, site, b, features, bos_token_id) for b in batches)
    else:
        totals = torch.ones(1)
    if (totals <= 0).any():
        silent = [f for f, t in zip(features, totals.tolist(), strict=False) if t <= 0]
        raise ValueError(f"feature(s) {silent} never fire on the bias prompts: no gradient to rank W_out by")
    with tracking(model, parameters) as (weights, grads):
        for batch in tqdm(batches, desc="mask: feature gradient", disable=not progress):
            summed = _summed(model, sae, site, batch, features, bos_token_id)
            accumulate((summed / totals.to(summed.device)).sum(), weights, grads)
    return grads


def feature_gradient(model, sae, site: hooks.HookSite, parameter: str, batches: Iterable[dict], features: list[int],
                     bos_token_id: int | None, progress: bool = True) -> torch.Tensor:
    """`feature_gradients` of one matrix."""
    return feature_gradients(model, sae, site, [parameter], batches, features, bos_token_id, progress)[0]


def _summed(model, sae, site, batch, features, bos_token_id):
    acts = hooks.forward_until(model, site, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    real = real_token_mask(batch["input_ids"], batch["attention_mask"], bos_token_id)
    return summed_feature_acts(sae, acts, real, features)


def gap_gradients(model, tokenizer, parameters: Sequence[str], texts: GapPrompts | Sequence[list[str]] | list[str],
                  male: list[str] | None = None, batch_size: int = 16, progress: bool = True,
                  targets: BiasSpec | str | Sequence[str] = "gender") -> list[torch.Tensor]:
    """Gradient of the stereotype gap (the sum over groups of the mean margin of that group's prompts,
    `debias.models.scoring.group_gap`) w.r.t. each of `parameters`.

    `texts`: a `GapPrompts` (its groups and targets), or one list of prompts per group in the order of the bias
    `targets` (a spec, a shipped name or the target texts; default gender), or, the two-group form, the first
    group's prompts with the second's in `male` (gender: mean she - he margin on `female` − mean on `male`).
    The SAE plays no part: this is the behaviour's own gradient (`mask_from: bias`), float32, summed over batches.
    """
    with tracking(model, parameters) as (weights, grads):
        for part in gap_parts(model, tokenizer, texts, male, batch_size, progress, targets):
            accumulate(part, weights, grads)
    return grads


def gap_parts(model, tokenizer, texts: GapPrompts | Sequence[list[str]] | list[str], male: list[str] | None = None,
              batch_size: int = 16, progress: bool = True,
              targets: BiasSpec | str | Sequence[str] = "gender") -> Iterator[torch.Tensor]:
    """Each batch's share of the gap (a differentiable scalar, one forward each, group by group); their sum is the
    gap. `texts`, `male` and `targets` as `gap_gradients`."""
    from debias.models.scoring import group_margins, next_token_logprobs

    by_group, ids = _gap_groups(tokenizer, texts, male, targets)
    for group, group_texts in enumerate(by_group):
        for i in tqdm(range(0, len(group_texts), batch_size), desc="mask: gap gradient", disable=not progress):
            logprobs = next_token_logprobs(model, tokenizer, group_texts[i:i + batch_size], batch_size)
            index = torch.full((len(logprobs),), group, dtype=torch.long)
            yield group_margins(logprobs, ids, index).sum() / len(group_texts)


def _gap_groups(tokenizer, texts, male, targets) -> tuple[list[list[str]], tuple[int, ...]]:
    """The prompts of each group and the groups' target ids, checked (`gap_gradients`' forms of `texts`)."""
    from debias.models.scoring import target_ids
    from debias.prompts import GapPrompts

    if isinstance(texts, GapPrompts):
        by_group, ids = [list(t) for t in texts.texts], target_ids(tokenizer, texts)
    else:
        if male is None and texts and isinstance(texts[0], str):
            raise ValueError("gap_gradient: pass the second group's prompts as `male`, or one list per group")
        pair = [cast("list[str]", texts), male] if male is not None else cast("Sequence[list[str]]", texts)
        by_group = [list(t) for t in pair]
        ids = target_ids(tokenizer, targets)
    if len(by_group) != len(ids) or not all(by_group):
        raise ValueError(f"gap_gradient needs a non-empty list of prompts for each of the {len(ids)} groups, got "
                         f"{len(by_group)} list(s) of {[len(g) for g in by_group]} prompts")
    return by_group, ids


def gap_gradient(model, tokenizer, parameter: str, texts: GapPrompts | Sequence[list[str]] | list[str],
                 male: list[str] | None = None, batch_size: int = 16, progress: bool = True,
                 targets: BiasSpec | str | Sequence[str] = "gender") -> torch.Tensor:
    """`gap_gradients` of one matrix."""
    return gap_gradients(model, tokenizer, [parameter], texts, male, batch_size, progress, targets)[0]
