"""Sentence-level metrics: the statement gap (what a subject's group does to a stereotyped attribute's
likelihood) and factual retention (the margin of statements that must stay), each with a bootstrap interval."""

from __future__ import annotations

from collections.abc import Collection

import torch

from debias.evaluation.stats import grouped_interval
from debias.models.continuation import continuation_logprobs, statement_logprobs
from debias.models.scoring import group_gap, own_group_margins
from debias.statements import FactualItem, StatementItem, item_groups

__all__ = ["factual_margin", "statement_gap", "statement_logprobs"]


@torch.no_grad()
def statement_gap(model, tokenizer, items: list[StatementItem], batch_size: int = 16, n_boot: int = 1000,
                  unseen: Collection[str] = ()) -> dict:
    """The statement gap (Σ over groups of the mean margin of that group's attributes: 0 = none, > 0 =
    stereotyped), its 95% interval, and the share of items whose own group's prefix makes the attribute likelier.

    Items with domain tags also give `statement_gap_by_domain` (domain -> gap, interval, items) and, when
    `unseen` names domains (those the train split never saw), `statement_gap_unseen` over their items together.
    """
    group, n_groups = item_groups(items), len(items[0].prefixes)
    margins = own_group_margins(statement_logprobs(model, tokenizer, items, batch_size).cpu(), group)

    def gap(values, groups):
        return group_gap(values, groups, n_groups)

    out: dict = {"statement_gap": float(gap(margins, group)),
                 "statement_gap_ci": list(grouped_interval(margins, group, gap, n_boot)),
                 "statement_stereotyped": float((margins > 0).float().mean())}
    domains, unseen = [item.domain for item in items], set(unseen)

    def subset(rows: list[int]) -> dict | None:  # a gap needs items of every group
        index = torch.tensor(rows, dtype=torch.long)
        if len({int(g) for g in group[index]}) < n_groups:
            return None
        return {"statement_gap": float(gap(margins[index], group[index])),
                "statement_gap_ci": list(grouped_interval(margins[index], group[index], gap, n_boot)),
                "items": len(rows)}

    by_domain = {d: s for d in dict.fromkeys(domains) if d
                 if (s := subset([i for i, x in enumerate(domains) if x == d])) is not None}
    if by_domain:
        out["statement_gap_by_domain"] = by_domain
        out["unseen_domains"] = [d for d in by_domain if d in unseen]
    if unseen and (together := subset([i for i, x in enumerate(domains) if x in unseen])) is not None:
        out["statement_gap_unseen"], out["statement_gap_unseen_ci"] = (together["statement_gap"],
                                                                       together["statement_gap_ci"])
    return out


@torch.no_grad()
def factual_margin(model, tokenizer, items: list[FactualItem], batch_size: int = 16, n_boot: int = 1000) -> dict:
    """Mean margin of the true word over the other groups' partners ("a woman" vs "a man"; > 0 = kept), its
    95% interval, and the share of items where the true word is the likeliest."""
    n_groups = len(items[0].words)
    contexts = [item.context for item in items for _ in item.words]
    words = [w for item in items for w in item.words]
    logprobs = continuation_logprobs(model, tokenizer, contexts, words, batch_size).view(len(items), n_groups).cpu()
    margins = own_group_margins(logprobs, item_groups(items))
    zeros = torch.zeros(len(items), dtype=torch.long)
    return {"factual_margin": float(margins.mean()),
            "factual_margin_ci": list(grouped_interval(margins, zeros, lambda v, _: v.mean(), n_boot)),
            "factual_kept_true": float((margins > 0).float().mean())}
