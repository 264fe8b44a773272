"""torchmetrics Metrics for the held-out evaluation (token means of LM loss and KL use `MeanMetric` with weights)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class FeatureActivation(Metric):
    """Mean activation of the feature(s) over real tokens, and the fraction of those tokens where it is > 0.

    `update(latents [batch, seq, n_features], real [batch, seq] bool)`; `compute()` returns
    `{"feature_act": mean over features, "feature_fire_rate": mean over features}`.
    """

    full_state_update = False

    def __init__(self, n_features: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("act_sum", torch.zeros(n_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fired", torch.zeros(n_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, latents: torch.Tensor, real: torch.Tensor) -> None:
        weights = real.unsqueeze(-1).to(torch.float64)
        self.act_sum += (latents.double() * weights).sum(dim=(0, 1))
        self.fired += ((latents > 0).double() * weights).sum(dim=(0, 1))
        self.tokens += real.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        tokens = self.tokens.clamp_min(1)
        return {"feature_act": (self.act_sum / tokens).mean().float(),
                "feature_fire_rate": (self.fired / tokens).mean().float()}

