"""SAE operations spliced into a forward: encode the chosen latents, and clamp or ablate them with the SAE's error
term kept: acts' = acts + decode(z') - decode(z), so only the chosen latents' contribution changes.
Shapes: `acts` [batch, seq, d_in], latents [batch, seq, n_features], `real` [batch, seq] bool.
"""

from __future__ import annotations

import torch


def encode_features(sae, acts: torch.Tensor, features: list[int]) -> torch.Tensor:
    """[batch, seq, n_features] activations of `features`."""
    return sae.encode(acts.to(sae.W_enc.dtype))[..., features]


def summed_feature_acts(sae, acts: torch.Tensor, real: torch.Tensor, features: list[int]) -> torch.Tensor:
    """[n_features] sum over real tokens of each feature's activation."""
    return (encode_features(sae, acts, features) * real.unsqueeze(-1)).sum(dim=(0, 1))


def clamp(sae, acts: torch.Tensor, features: list[int], value: float) -> torch.Tensor:
    """`acts` with `features` held at `value` through the SAE, its reconstruction error kept. [.., d_in]"""
    latents = sae.encode(acts.to(sae.W_enc.dtype))
    clamped = latents.clone()
    clamped[..., features] = value
    return acts + (sae.decode(clamped) - sae.decode(latents)).to(acts.dtype)


def ablate(sae, acts: torch.Tensor, features: list[int]) -> torch.Tensor:
    """`acts` with the features' decoded contribution removed (`clamp` at 0)."""
    return clamp(sae, acts, features, 0.0)
