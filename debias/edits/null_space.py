"""Retention by construction: keep an edit's update off the inputs of the prompts it must preserve (AlphaEdit,
Fang et al., ICLR 2025).

An update Δ of a matrix W (`output = W · k`, HF `Linear` weight `[out, in]`) leaves the output unchanged for every
input k in a subspace S exactly when Δ · U = 0, U `[in, r]` an orthonormal basis of S; so Δ ← Δ (I − U Uᵀ).
S is spanned by the matrix's inputs (for `W_out`: the MLP's hidden activations, `d_mlp` wide) at every real token of
the preserved prompts; only the directions that hold `energy` of their second moment are kept (all of them would
leave nothing to edit). For one edited matrix, a preserved prompt whose inputs lie in S keeps its whole forward pass.

A fitter (`NullSpaceFitter.update`, batch by batch) is kept apart from the fitted result (`NullSpace`, frozen), as in
concept-erasure's LEACE. A dense update is projected exactly. A sparse mask cannot stay inside the null space in
general (a row with 15 free entries against ~150 constraints has only 0 there), so a masked delta is projected and
then re-masked after every optimiser step: the component of each row inside S that the mask can express is removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NullSpace:
    """Per edited parameter, an orthonormal basis `[in, r]` of the preserved inputs' principal directions."""

    bases: Mapping[str, torch.Tensor]
    energy: float

    def ranks(self) -> dict[str, int]:
        return {name: int(u.shape[1]) for name, u in self.bases.items()}

    def project(self, parameter: str, update: torch.Tensor) -> torch.Tensor:
        """`update` `[out, in]` with its action on the preserved subspace removed: Δ − (Δ U) Uᵀ."""
        u = self.bases[parameter].to(update)
        return update - (update @ u) @ u.T


class NullSpaceFitter:
    """Accumulates the second moment Σ k kᵀ of each watched layer's input over real tokens (float64)."""

    def __init__(self, layers: Mapping[str, nn.Module]):
        """`layers`: edited parameter name -> the module whose forward input is that matrix's input."""
        self.layers = dict(layers)
        self.moments: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._real: torch.Tensor | None = None

    def _hook(self, name: str):
        def hook(_module, args):
            acts = args[0].detach()
            real = self._real if self._real is not None else torch.ones(acts.shape[:2], dtype=torch.bool)
            rows = acts[real.to(acts.device)].double()  # [tokens, in]
            moment = rows.T @ rows
            self.moments[name] = self.moments[name] + moment if name in self.moments else moment

        return hook

    @torch.no_grad()
    def update(self, net: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Run `net` on one tokenised batch and add its real tokens' inputs to every watched layer's moment."""
        self._real = batch["attention_mask"].bool()
        handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in self.layers.items()]
        try:
            net(**batch)
        finally:
            for handle in handles:
                handle.remove()
            self._real = None
        self.tokens += int(batch["attention_mask"].sum())

    def fit(self, energy: float) -> NullSpace:
        """The smallest set of top eigenvectors per layer that holds `energy` (in (0, 1]) of the moment's trace."""
        if not 0 < energy <= 1:
            raise ValueError(f"null-space energy must be in (0, 1], got {energy}")
        if not self.moments:
            raise ValueError("the null-space fitter saw no tokens; give it the preserved prompts first")
        bases = {}
        for name, moment in self.moments.items():
            values, vectors = torch.linalg.eigh(moment)  # ascending
            values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
            share = values.cumsum(0) / values.sum().clamp_min(1e-300)
            # energy 1 keeps every direction with any energy (to round-off), so the preserved inputs are exact
            rank = int((values > values[0] * 1e-10).sum()) if energy >= 1 else int((share < energy).sum()) + 1
            bases[name] = vectors[:, :rank].float().contiguous()
        return NullSpace(bases, energy)


def fit_null_space(net: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[dict[str, torch.Tensor]],
                   energy: float) -> NullSpace:
    """The null space of the preserved prompts' `batches` (tokenised) for each edited matrix of `layers`."""
    fitter = NullSpaceFitter(layers)
    for batch in batches:
        fitter.update(net, batch)
    return fitter.fit(energy)


@torch.no_grad()
def project_sparse(null_space: NullSpace, parameter: str, shape: tuple[int, ...], indices: torch.Tensor,
                   values: torch.Tensor) -> None:
    """Project a masked delta (`values` at flat `indices` of a `[out, in]` matrix) and re-mask it, in place."""
    dense = torch.zeros(shape, dtype=torch.float32, device=values.device)
    dense.view(-1)[indices.to(values.device)] = values.float()
    projected = null_space.project(parameter, dense)
    values.copy_(projected.view(-1)[indices.to(values.device)].to(values))
