"""Behavioural bias metrics with bootstrap intervals: the stereotype gap and the explicit-cue margin.

The margin of a prompt is log p(" she") - log p(" he") at the next token (raw text, no chat template).
`StereotypeGap` = mean margin over female-stereotyped profession prompts - mean over male-stereotyped ones
(0 = no stereotype). `CueMargin` = mean margin of the *cued* pronoun after explicit cues ("My brother, a nurse,
said that"): what a debiasing edit must keep (over-erasure check).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchmetrics

from debias.evaluation.stats import grouped_interval
from debias.models.scoring import _group_gap, next_token_logprobs, pronoun_ids, pronoun_margin
from debias.prompts import CuePrompts, GapPrompts


def _cued(margins: torch.Tensor, cued_female: torch.Tensor) -> torch.Tensor:
    return torch.where(cued_female.to(torch.bool), margins, -margins).mean()


class _MarginMetric(torchmetrics.Metric):
    """Collects per-prompt margins [n] and a bool group flag [n]; `_stat(margins, flags)` is the statistic."""

    full_state_update = False
    _stat: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # List states; torchmetrics concatenates them into one tensor while the metric is synced across processes.
    margins: list[torch.Tensor] | torch.Tensor
    flags: list[torch.Tensor] | torch.Tensor

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("margins", default=[], dist_reduce_fx="cat")
        self.add_state("flags", default=[], dist_reduce_fx="cat")

    def update(self, margins: torch.Tensor, flags: torch.Tensor) -> None:
        if margins.ndim != 1 or margins.shape != flags.shape:
            raise ValueError(f"expected margins and flags of the same shape [n], got {margins.shape}, {flags.shape}")
        if not isinstance(self.margins, list) or not isinstance(self.flags, list):
            raise RuntimeError(f"{type(self).__name__}: update() on a synced metric; call unsync() first")
        self.margins.append(margins.detach().float())
        self.flags.append(flags.to(torch.bool))

    @classmethod
    def _statistic(cls) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if cls._stat is None:
            raise TypeError(f"{cls.__name__} defines no _stat; use StereotypeGap or CueMargin")
        return cls._stat

    def _cat(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.margins, list) and not self.margins:
            raise ValueError(f"{type(self).__name__}: no prompts; call update() first")
        return torchmetrics.utilities.dim_zero_cat(self.margins), torchmetrics.utilities.dim_zero_cat(self.flags)

    def compute(self) -> torch.Tensor:
        return self._statistic()(*self._cat())

    def bootstrap_ci(self, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
        """Percentile (1 - alpha) interval of compute(), resampling prompts within each group."""
        return grouped_interval(*self._cat(), self._statistic(), n_boot, alpha, seed)


class StereotypeGap(_MarginMetric):
    """update(margins [n], is_female [n] bool); compute() -> mean female margin - mean male margin (0 = none)."""

    higher_is_better = False
    _stat = staticmethod(_group_gap)


class CueMargin(_MarginMetric):
    """update(margins [n], cued_female [n] bool); compute() -> mean margin of the cued pronoun
    (margin for female-cued prompts, -margin for male-cued ones; > 0 = cue followed)."""

    higher_is_better = True
    _stat = staticmethod(_cued)


@torch.no_grad()
def bias_gap(model, tokenizer, prompts: GapPrompts, batch_size: int = 16, n_boot: int = 1000) -> dict:
    """Stereotype gap of `model` on `prompts`, with a 95% bootstrap interval and per-profession mean margins."""
    she, he = pronoun_ids(tokenizer)
    margins = pronoun_margin(next_token_logprobs(model, tokenizer, prompts.prompts, batch_size), she, he).cpu()
    is_female = prompts.is_female
    metric = StereotypeGap()
    metric.update(margins, is_female)
    per_prof: dict[str, list[float]] = {}
    for label, m in zip(prompts.female_labels + prompts.male_labels, margins.tolist(), strict=False):
        per_prof.setdefault(label, []).append(m)
    return {
        "bias_gap": float(metric.compute()),
        "bias_gap_ci": list(metric.bootstrap_ci(n_boot=n_boot)),
        "female_mean": float(margins[is_female].mean()),
        "male_mean": float(margins[~is_female].mean()),
        "per_profession": {p: sum(v) / len(v) for p, v in per_prof.items()},
    }


@torch.no_grad()
def cue_margin(model, tokenizer, cue: CuePrompts, batch_size: int = 16, n_boot: int = 1000) -> dict:
    """Mean margin of the cued pronoun, its 95% bootstrap interval, the share of prompts where the cued pronoun is
    the likelier one (`cue_followed`), and the means on anti-/pro-stereotypical combinations ("My brother, a
    nurse" vs "My sister, a nurse")."""
    she, he = pronoun_ids(tokenizer)
    margins = pronoun_margin(next_token_logprobs(model, tokenizer, cue.prompts, batch_size), she, he).cpu()
    cued_female, pro = cue.cued_female, torch.tensor(cue.pro, dtype=torch.bool)
    metric = CueMargin()
    metric.update(margins, cued_female)
    followed = torch.where(cued_female, margins, -margins) > 0
    out = {"cue_margin": float(metric.compute()), "cue_margin_ci": list(metric.bootstrap_ci(n_boot=n_boot)),
           "cue_followed": float(followed.float().mean())}
    for name, sel in (("cue_margin_anti", ~pro), ("cue_margin_pro", pro)):
        if sel.any():
            out[name] = float(_cued(margins[sel], cued_female[sel]))
    return out
