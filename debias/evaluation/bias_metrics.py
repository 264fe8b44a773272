"""Behavioural bias metrics with bootstrap intervals: the stereotype gap and the explicit-cue margin.

Each group of a bias spec has a next-token target (gender: " she", " he"; raw text, no chat template). A prompt of
group g (stereotyped toward g, or cued with g) has the margin log p(target_g) - mean over the other groups h of
log p(target_h) (`debias.models.scoring.group_margins`). `StereotypeGap` = the sum over groups of the mean margin of
that group's prompts (0 = no stereotype; gender: mean female (she - he) - mean male (she - he)). `CueMargin` = the
mean margin of the *cued* group after explicit cues ("My brother, a nurse, said that"): what a debiasing edit must
keep (over-erasure check).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchmetrics

from debias.evaluation.stats import grouped_interval
from debias.models.scoring import (
    group_gap,
    group_margins,
    group_means,
    legacy_group_index,
    next_token_logprobs,
    target_ids,
)
from debias.prompts import CuePrompts, GapPrompts


def _cued(margins: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    return margins.mean()


class _MarginMetric(torchmetrics.Metric):
    """Collects per-prompt group margins [n] and their group index [n] (long); `_stat(margins, index, n_groups)` is
    the statistic. `update(margins, flags)` with a bool flag [n] is the two-group form: margins first minus second
    group (she - he) and True for the first group (female)."""

    full_state_update = False
    _stat: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    # List states; torchmetrics concatenates them into one tensor while the metric is synced across processes.
    margins: list[torch.Tensor] | torch.Tensor
    flags: list[torch.Tensor] | torch.Tensor

    def __init__(self, n_groups: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if n_groups is not None and n_groups < 2:
            raise ValueError(f"n_groups must be >= 2, got {n_groups}")
        self.n_groups = n_groups
        self.add_state("margins", default=[], dist_reduce_fx="cat")
        self.add_state("flags", default=[], dist_reduce_fx="cat")

    def update(self, margins: torch.Tensor, flags: torch.Tensor) -> None:
        if margins.ndim != 1 or margins.shape != flags.shape:
            raise ValueError(f"expected margins and flags of the same shape [n], got {margins.shape}, {flags.shape}")
        if not isinstance(self.margins, list) or not isinstance(self.flags, list):
            raise RuntimeError(f"{type(self).__name__}: update() on a synced metric; call unsync() first")
        margins = margins.detach().float()
        if flags.dtype == torch.bool:  # two groups, margins first - second: the second group's margin is -margin
            if self.n_groups not in (None, 2):
                raise ValueError(f"bool flags are the two-group form; this metric has n_groups={self.n_groups}")
            margins, flags = torch.where(flags.to(margins.device), margins, -margins), legacy_group_index(flags)
        self.margins.append(margins)
        self.flags.append(flags.long())

    @classmethod
    def _statistic(cls) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        if cls._stat is None:
            raise TypeError(f"{cls.__name__} defines no _stat; use StereotypeGap or CueMargin")
        return cls._stat

    def _cat(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if isinstance(self.margins, list) and not self.margins:
            raise ValueError(f"{type(self).__name__}: no prompts; call update() first")
        margins = torchmetrics.utilities.dim_zero_cat(self.margins)
        index = torchmetrics.utilities.dim_zero_cat(self.flags).long()
        return margins, index, self.n_groups or int(index.max()) + 1

    def compute(self) -> torch.Tensor:
        return self._statistic()(*self._cat())

    def bootstrap_ci(self, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
        """Percentile (1 - alpha) interval of compute(), resampling prompts within each group."""
        margins, index, n_groups = self._cat()
        stat = self._statistic()
        # Groups are resampled in the order of their key, last group first (the former bool flags: male, then
        # female), so that gender intervals are the same as before.
        return grouped_interval(margins, n_groups - 1 - index, lambda m, key: stat(m, n_groups - 1 - key, n_groups),
                                n_boot, alpha, seed)


class StereotypeGap(_MarginMetric):
    """update(group margins [n], group index [n] long); compute() -> the sum over groups of their prompts' mean
    margin (0 = none; gender: mean female margin - mean male margin, she - he)."""

    higher_is_better = False
    _stat = staticmethod(group_gap)


class CueMargin(_MarginMetric):
    """update(margins [n] of the cued group, cued group index [n] long); compute() -> their mean (> 0 = cue
    followed; gender: she - he for female-cued prompts, he - she for male-cued ones)."""

    higher_is_better = True
    _stat = staticmethod(_cued)


def _margins(model, tokenizer, prompts: GapPrompts | CuePrompts, batch_size: int):
    ids, index = target_ids(tokenizer, prompts), prompts.group_index
    logprobs = next_token_logprobs(model, tokenizer, prompts.prompts, batch_size)
    return logprobs, group_margins(logprobs, ids, index).cpu(), index, ids


@torch.no_grad()
def bias_gap(model, tokenizer, prompts: GapPrompts, batch_size: int = 16, n_boot: int = 1000) -> dict:
    """Stereotype gap of `model` on `prompts`, with a 95% bootstrap interval, each group's mean margin
    (`group_means`) and per-context mean margins toward the context's group (`per_context`). Two-group biases also
    report `female_mean` / `male_mean` and `per_profession`: first-minus-second-group margins (she - he), as before;
    with more groups `per_profession` is `per_context`."""
    _, margins, index, _ = _margins(model, tokenizer, prompts, batch_size)
    n_groups = len(prompts.groups)
    metric = StereotypeGap(n_groups)
    metric.update(margins, index)
    means = [float(m) for m in group_means(margins, index, n_groups)]
    first_minus_second = torch.where(index == 0, margins, -margins)
    per_context: dict[str, list[float]] = {}
    per_prof: dict[str, list[float]] = {}
    for label, m, m2 in zip(prompts.all_labels, margins.tolist(), first_minus_second.tolist(), strict=True):
        per_context.setdefault(label, []).append(m)
        per_prof.setdefault(label, []).append(m2)
    out = {"bias_gap": float(metric.compute()), "bias_gap_ci": list(metric.bootstrap_ci(n_boot=n_boot)),
           "group_means": dict(zip(prompts.groups, means, strict=True)),
           "per_context": {p: sum(v) / len(v) for p, v in per_context.items()}}
    if n_groups == 2:
        out.update(female_mean=means[0], male_mean=-means[1],
                   per_profession={p: sum(v) / len(v) for p, v in per_prof.items()})
    else:
        out["per_profession"] = out["per_context"]
    return out


@torch.no_grad()
def cue_margin(model, tokenizer, cue: CuePrompts, batch_size: int = 16, n_boot: int = 1000) -> dict:
    """Mean margin of the cued group, its 95% bootstrap interval, the share of prompts where the cued group's target
    is the likeliest of the targets (`cue_followed`), and the means on anti-/pro-stereotypical combinations ("My
    brother, a nurse" vs "My sister, a nurse")."""
    logprobs, margins, index, ids = _margins(model, tokenizer, cue, batch_size)
    n_groups, pro = len(cue.groups), torch.tensor(cue.pro, dtype=torch.bool)
    metric = CueMargin(n_groups)
    metric.update(margins, index)
    targets = logprobs[:, list(ids)].cpu()
    own = targets.gather(1, index[:, None]).squeeze(1)
    others = targets.masked_fill(torch.nn.functional.one_hot(index, n_groups).bool(), -torch.inf).amax(1)
    out = {"cue_margin": float(metric.compute()), "cue_margin_ci": list(metric.bootstrap_ci(n_boot=n_boot)),
           "cue_followed": float((own > others).float().mean())}
    for name, sel in (("cue_margin_anti", ~pro), ("cue_margin_pro", pro)):
        if sel.any():
            out[name] = float(_cued(margins[sel], index[sel], n_groups))
    return out
