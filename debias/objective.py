"""Objective terms: what the edit removes (feature, ablation, bias) and what it keeps (KL to the original).

Every term is a scalar, differentiable with respect to the delta. Shapes: logits `[batch, seq, vocab]`,
`real` `[batch, seq]` bool (attended, non-BOS tokens), latents `[batch, seq, n_features]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class ObjectiveWeights:
    """Weights of the loss terms; a term with weight 0 is not computed."""

    feature: float = 1.0
    """Mean activation of the feature(s) on bias prompts, divided by its value before training."""
    ablation: float = 0.0
    """KL(model with the feature(s) ablated through the SAE, error term kept || edited model) on bias prompts."""
    bias: float = 0.0
    """(train bias gap)², the she-vs-he log-probability gap on train profession prompts."""
    kl: float = 1.0
    """KL(original || edited) next-token distributions on neutral text (token-averaged)."""
    cue_kl: float = 0.0
    """KL(original || edited) at the pronoun position of explicit-cue prompts (keeps real gender information)."""

    def __post_init__(self):
        bad = {k: v for k, v in asdict(self).items() if not (v >= 0 and v < float("inf"))}
        if bad:
            raise ValueError(f"objective weights must be finite and >= 0, got {bad}")
        if self.feature == self.ablation == self.bias == 0:
            raise ValueError("at least one of objective.feature, objective.ablation, objective.bias must be > 0")

    def active(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v > 0}


def feature_term(latents: torch.Tensor, real: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens and features of activation / baseline (its mean before training) [n_features]."""
    per_feature = (latents * real.unsqueeze(-1)).sum(dim=(0, 1)) / real.sum().clamp_min(1)
    return (per_feature / baseline.clamp_min(1e-8)).mean()


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[batch, seq] KL(p_ref || p) per position, in nats, computed in float32."""
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    cur = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - cur)).sum(-1)


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) averaged over the positions where `positions` [batch, seq] is true."""
    kl = token_kl(ref_logits, logits)
    return (kl * positions).sum() / positions.sum().clamp_min(1)


def ablate(sae, acts: torch.Tensor, features: list[int]) -> torch.Tensor:
    """`acts` with the features' decoded contribution removed, the SAE's reconstruction error kept. [.., d_in]"""
    latents = sae.encode(acts.to(sae.W_enc.dtype))
    zeroed = latents.clone()
    zeroed[..., features] = 0
    return (acts + (sae.decode(zeroed) - sae.decode(latents)).to(acts.dtype))
