"""The instability mask: the k entries of one layer's `W_out` whose gradient most drives the SAE feature(s).

Scores are accumulated (summed) over batches of prompts in float32; the mask keeps exactly
`k = max(1, floor(fraction × numel))` entries, ties broken by the lower flat index (a stable sort), unlike a
`>= threshold` cut, which over-selects on ties.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
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


@dataclass(frozen=True)
class InstabilityMask:
    """Which entries of one weight matrix may change. `indices` are flat (row-major) positions, sorted."""

    parameter: str
    shape: tuple[int, ...]
    indices: torch.Tensor
    layer: int
    hook_name: str
    features: tuple[int, ...]
    model_id: str = ""
    sae_id: str = ""
    strategy: str = "gradient"
    extra: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dense(self) -> torch.Tensor:
        """Boolean mask of `shape`."""
        flat = torch.zeros(self.numel, dtype=torch.bool)
        flat[self.indices] = True
        return flat.reshape(self.shape)

    def stats(self) -> dict:
        rows = torch.div(self.indices, self.shape[-1], rounding_mode="floor")
        return {
            "parameter": self.parameter, "shape": list(self.shape), "k": self.k,
            "fraction": self.k / self.numel, "rows_touched": int(rows.unique().numel()),
            "features": list(self.features), "strategy": self.strategy,
        }

    def save(self, path: str | Path) -> None:
        meta = {
            "parameter": self.parameter, "shape": json.dumps(list(self.shape)), "layer": str(self.layer),
            "hook_name": self.hook_name, "features": json.dumps(list(self.features)),
            "model_id": self.model_id, "sae_id": self.sae_id, "strategy": self.strategy,
            "extra": json.dumps(self.extra),
        }
        save_file({"indices": self.indices.to(torch.int64).contiguous()}, str(path), metadata=meta)

    def to_record(self) -> dict:
        """Plain values (what a checkpoint loads with weights_only=True)."""
        return {**{k: v for k, v in self.__dict__.items() if k != "extra"}, "shape": list(self.shape),
                "features": list(self.features), "extra": json.dumps(self.extra)}

    @classmethod
    def from_record(cls, record: dict) -> InstabilityMask:
        return cls(**{**record, "shape": tuple(record["shape"]), "features": tuple(record["features"]),
                      "extra": json.loads(record["extra"])})

    @classmethod
    def load(cls, path: str | Path) -> InstabilityMask:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        return cls(
            parameter=meta["parameter"], shape=tuple(json.loads(meta["shape"])),
            indices=load_file(str(path))["indices"], layer=int(meta["layer"]), hook_name=meta["hook_name"],
            features=tuple(json.loads(meta["features"])), model_id=meta.get("model_id", ""),
            sae_id=meta.get("sae_id", ""), strategy=meta.get("strategy", "gradient"),
            extra=json.loads(meta.get("extra", "{}")),
        )


def resolve_k(numel: int, fraction: float | None = None, k: int | None = None) -> int:
    """`k` itself, or `max(1, floor(fraction × numel))`; exactly one of them must be given."""
    if (fraction is None) == (k is None):
        raise ValueError(f"give exactly one of fraction or k (got fraction={fraction}, k={k})")
    if k is not None:
        if not 1 <= k <= numel:
            raise ValueError(f"k must be in [1, {numel}] for a matrix of {numel} entries, got {k}")
        return int(k)
    if fraction is None or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * numel))


def top_k_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest scores, ties to the lower index; returned sorted ascending."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    return order[:k].sort().values


def feature_gradient(model, sae, site: hooks.HookSite, parameter: str, batches: Iterable[dict], features: list[int],
                     bos_token_id: int | None, progress: bool = True) -> torch.Tensor:
    """Gradient of Σ_f a_f / a_f⁰ with respect to `parameter`, summed over batches, float32, same shape.

    a_f is feature f's activation summed over real tokens; a_f⁰ its total over all batches (so that no
    feature dominates). The forward stops at the SAE's hook: layers above it never run.
    `batches` yields tokenised inputs (`input_ids`, `attention_mask`, [batch, seq]); it is iterated twice
    when there are several features.
    """
    weight = model.get_parameter(parameter)
    batches = list(batches)
    if len(features) > 1:
        with torch.no_grad():
            totals = sum(_summed(model, sae, site, b, features, bos_token_id) for b in batches)
    else:
        totals = torch.ones(1)
    if (totals <= 0).any():
        silent = [f for f, t in zip(features, totals.tolist(), strict=False) if t <= 0]
        raise ValueError(f"feature(s) {silent} never fire on the bias prompts: no gradient to rank W_out by")
    grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    was = weight.requires_grad
    weight.requires_grad_(True)
    try:
        for batch in tqdm(batches, desc="mask: feature gradient", disable=not progress):
            weight.grad = None
            summed = _summed(model, sae, site, batch, features, bos_token_id)
            (summed / totals.to(summed.device)).sum().backward()
            grad += weight.grad.float()
    finally:
        weight.grad = None
        weight.requires_grad_(was)
    return grad


def _summed(model, sae, site, batch, features, bos_token_id):
    acts = hooks.forward_until(model, site, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    real = real_token_mask(batch["input_ids"], batch["attention_mask"], bos_token_id)
    return summed_feature_acts(sae, acts, real, features)


def mask_from_scores(scores: torch.Tensor, k: int, **meta) -> InstabilityMask:
    """Keep the top-k scores; refuses an all-zero score (it would pick arbitrary entries)."""
    if not torch.isfinite(scores).all():
        raise ValueError("mask scores contain NaN or inf; check the model dtype and the prompts")
    if not scores.abs().sum() > 0:
        raise ValueError(
            f"all mask scores are zero for features {meta.get('features')}: the feature(s) never fire on the "
            "bias prompts (or do not depend on this W_out), so no mask of meaningful entries exists"
        )
    return InstabilityMask(shape=tuple(scores.shape), indices=top_k_flat(scores, k), **meta)


def gap_gradient(model, tokenizer, parameter: str, texts: GapPrompts | Sequence[list[str]] | list[str],
                 male: list[str] | None = None, batch_size: int = 16, progress: bool = True,
                 targets: BiasSpec | str | Sequence[str] = "gender") -> torch.Tensor:
    """Gradient of the stereotype gap (the sum over groups of the mean margin of that group's prompts,
    `debias.models.scoring.group_gap`) w.r.t. `parameter`.

    `texts`: a `GapPrompts` (its groups and targets), or one list of prompts per group in the order of the bias
    `targets` (a spec, a shipped name or the target texts; default gender), or, the two-group form, the first
    group's prompts with the second's in `male` (gender: mean she - he margin on `female` − mean on `male`).
    The SAE plays no part: this is the behaviour's own gradient (`mask_from: bias`), float32, summed over batches.
    """
    from debias.models.scoring import group_margins, next_token_logprobs, target_ids
    from debias.prompts import GapPrompts

    if isinstance(texts, GapPrompts):
        by_group, ids = [list(t) for t in texts.texts], target_ids(tokenizer, texts)
    else:
        if male is None and texts and isinstance(texts[0], str):
            raise ValueError("gap_gradient: pass the second group's prompts as `male`, or one list per group")
        by_group = [list(texts), list(male)] if male is not None else [list(t) for t in texts]  # type: ignore[arg-type]
        ids = target_ids(tokenizer, targets)
    if len(by_group) != len(ids) or not all(by_group):
        raise ValueError(f"gap_gradient needs a non-empty list of prompts for each of the {len(ids)} groups, got "
                         f"{len(by_group)} list(s) of {[len(g) for g in by_group]} prompts")
    weight = model.get_parameter(parameter)
    grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    was = weight.requires_grad
    weight.requires_grad_(True)
    try:
        for group, group_texts in enumerate(by_group):
            for i in tqdm(range(0, len(group_texts), batch_size), desc="mask: gap gradient", disable=not progress):
                weight.grad = None
                logprobs = next_token_logprobs(model, tokenizer, group_texts[i:i + batch_size], batch_size)
                index = torch.full((len(logprobs),), group, dtype=torch.long)
                (group_margins(logprobs, ids, index).sum() / len(group_texts)).backward()
                grad += weight.grad.float()
    finally:
        weight.grad = None
        weight.requires_grad_(was)
    return grad


def compute_mask(model, sae, site: hooks.HookSite, parameter: str, batches: Iterable[dict], features: list[int], k: int,
                 strategy: str = "gradient", seed: int = 0, bos_token_id: int | None = None,
                 progress: bool = True, grad: torch.Tensor | None = None, **meta) -> InstabilityMask:
    """Score `parameter`'s entries by `strategy` (see `STRATEGIES`) and keep the top k.

    The gradient is the feature(s)' (`feature_gradient`) unless another one is passed as `grad`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    weight = model.get_parameter(parameter)
    if strategy == "random":
        grad = torch.zeros(weight.shape)
    elif grad is None:
        grad = feature_gradient(model, sae, site, parameter, batches, features, bos_token_id, progress)
        if not grad.abs().sum() > 0:
            raise ValueError(
                f"the gradient of feature(s) {features} with respect to {parameter} is zero on every bias prompt: "
                "the feature never fires there, so there is no instability mask to compute"
            )
    scores = STRATEGIES[strategy](grad, weight.detach().cpu(), seed)
    info = dict(parameter=parameter, layer=site.layer, hook_name=site.hook_name, features=tuple(features),
                strategy=strategy, **meta)
    if strategy == "random":
        return InstabilityMask(shape=tuple(scores.shape), indices=top_k_flat(scores, k), **info)
    return mask_from_scores(scores.cpu(), k, **info)


def full_mask(model: nn.Module, parameter: str, **meta) -> InstabilityMask:
    """A mask holding every entry of `parameter`: the `dense` method is the sparse delta with nothing left out."""
    weight = model.get_parameter(parameter)
    return InstabilityMask(parameter=parameter, shape=tuple(weight.shape), indices=torch.arange(weight.numel()),
                           strategy="dense", **meta)


def load_mask_for(path: str | Path, parameter: str, shape: tuple[int, ...]) -> InstabilityMask:
    """A saved mask, checked against the matrix it will edit; every error names the file and the option."""
    where = f"model.edit.mask_path={str(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        mask = InstabilityMask.load(path)
    except Exception as err:  # safetensors raises its own (Rust) error types for a bad header or bytes
        raise ValueError(f"{where} is not a mask written by `debias mask` ({type(err).__name__}: {err})") from None
    if mask.parameter != parameter or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{where} is for {mask.parameter} {list(mask.shape)}; this run edits {parameter} "
                         f"{list(shape)}")
    indices, numel = mask.indices, math.prod(shape)
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1 or indices.numel() == 0:
        raise ValueError(f"{where}: indices must be a non-empty 1-D integer tensor, got {indices.dtype} "
                         f"{list(indices.shape)}")
    if int(indices.min()) < 0 or int(indices.max()) >= numel:
        raise ValueError(f"{where}: indices must be in [0, {numel}), got [{int(indices.min())}, {int(indices.max())}]")
    if indices.unique().numel() != indices.numel():
        raise ValueError(f"{where}: {indices.numel() - indices.unique().numel()} duplicate indices")
    return InstabilityMask(**{**mask.__dict__, "indices": indices.to(torch.int64).sort().values})
