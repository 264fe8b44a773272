"""The instability mask: the k entries of one layer's `W_out` whose gradient most drives the SAE feature(s).

Scores are accumulated (summed) over batches of prompts in float32; the mask keeps exactly
`k = max(1, floor(fraction × numel))` entries, ties broken by the lower flat index (a stable sort), unlike a
`>= threshold` cut, which over-selects on ties. A `JointMask` is one such mask over the `W_out` of several layers
(`model.edit.layers`, `debias.edits.joint`): the top k of all their entries, ranked together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from debias.edits.gradients import STRATEGIES, feature_gradients
from debias.edits.gradients import feature_gradient as feature_gradient  # re-exported: the one-matrix form
from debias.edits.gradients import gap_gradient as gap_gradient  # re-exported: the one-matrix form
from debias.models import hooks


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
    def parts(self) -> tuple[InstabilityMask, ...]:
        """The one-matrix masks it is made of: itself (a `JointMask` holds one per matrix), so that callers treat
        either kind of `Mask` alike."""
        return (self,)

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
        meta = {"parameter": self.parameter, "shape": json.dumps(list(self.shape)), "layer": str(self.layer),
                **_shared_meta(self)}
        save_file({"indices": self.indices.to(torch.int64).contiguous()}, str(path), metadata=meta)

    def to_record(self) -> dict:
        """Plain values (what a checkpoint loads with weights_only=True)."""
        return {**{k: v for k, v in self.__dict__.items() if k != "extra"}, "shape": list(self.shape),
                "features": list(self.features), "extra": json.dumps(self.extra)}

    @classmethod
    def from_record(cls, record: dict) -> Mask:
        """The mask of `to_record()`; a `JointMask`'s record (it has `parts`) gives that `JointMask`."""
        return JointMask.from_record(record) if "parts" in record else _one_from_record(record)

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """The mask `save` wrote; a file of several matrices (`JointMask.save`) gives that `JointMask`."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        if "parameters" in meta:
            return JointMask.from_file(meta, tensors)
        return cls(parameter=meta["parameter"], shape=tuple(json.loads(meta["shape"])), indices=tensors["indices"],
                   layer=int(meta["layer"]), **_shared_fields(meta))


def _one_from_record(record: dict) -> InstabilityMask:
    return InstabilityMask(**{**record, "shape": tuple(record["shape"]), "features": tuple(record["features"]),
                              "extra": json.loads(record["extra"])})


def _shared_meta(mask: InstabilityMask) -> dict[str, str]:
    """File metadata every matrix of a mask shares."""
    return {"hook_name": mask.hook_name, "features": json.dumps(list(mask.features)), "model_id": mask.model_id,
            "sae_id": mask.sae_id, "strategy": mask.strategy, "extra": json.dumps(mask.extra)}


def _shared_fields(meta: dict[str, str]) -> dict:
    return dict(hook_name=meta["hook_name"], features=tuple(json.loads(meta["features"])),
                model_id=meta.get("model_id", ""), sae_id=meta.get("sae_id", ""),
                strategy=meta.get("strategy", "gradient"), extra=json.loads(meta.get("extra", "{}")))


@dataclass(frozen=True)
class JointMask:
    """One mask over the `W_out` of several layers (`model.edit.layers`): the top k of all their entries' scores,
    ranked together (`debias.edits.joint`). `parts` holds one `InstabilityMask` per matrix, in layer order; a part's
    `layer` is its matrix's layer, and a part may hold no entry at all. `layer` is the SAE's layer.

    File (`save` / `InstabilityMask.load`): one int64 tensor of sorted flat indices per matrix, `indices.<parameter>`;
    metadata `parameters` (JSON list, layer order), `shapes` and `layers` (JSON objects keyed by parameter) and the
    one-matrix file's `layer` (the SAE's), `hook_name`, `features`, `model_id`, `sae_id`, `strategy`, `extra`.
    """

    parts: tuple[InstabilityMask, ...]
    layer: int

    @property
    def parameters(self) -> list[str]:
        return [part.parameter for part in self.parts]

    @property
    def k(self) -> int:
        return sum(part.k for part in self.parts)

    @property
    def numel(self) -> int:
        return sum(part.numel for part in self.parts)

    @property
    def strategy(self) -> str:
        return self.parts[0].strategy

    @property
    def features(self) -> tuple[int, ...]:
        return self.parts[0].features

    def stats(self) -> dict:
        """`InstabilityMask.stats` of the whole mask, with each matrix's k and rows touched."""
        per = {part.parameter: part.stats() for part in self.parts}
        return {"parameters": self.parameters, "k": self.k, "fraction": self.k / self.numel,
                "k_per_parameter": {name: s["k"] for name, s in per.items()},
                "rows_touched": {name: s["rows_touched"] for name, s in per.items()},
                "features": list(self.features), "strategy": self.strategy}

    def save(self, path: str | Path) -> None:
        meta = {"parameters": json.dumps(self.parameters), "layer": str(self.layer),
                "shapes": json.dumps({part.parameter: list(part.shape) for part in self.parts}),
                "layers": json.dumps({part.parameter: part.layer for part in self.parts}),
                **_shared_meta(self.parts[0])}
        save_file({f"indices.{part.parameter}": part.indices.to(torch.int64).contiguous() for part in self.parts},
                  str(path), metadata=meta)

    @classmethod
    def from_file(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> JointMask:
        shapes, layers = json.loads(meta["shapes"]), json.loads(meta["layers"])
        parts = tuple(InstabilityMask(parameter=name, shape=tuple(shapes[name]), indices=tensors[f"indices.{name}"],
                                      layer=int(layers[name]), **_shared_fields(meta))
                      for name in json.loads(meta["parameters"]))
        return cls(parts, int(meta["layer"]))

    def to_record(self) -> dict:
        """Plain values (what a checkpoint loads with weights_only=True)."""
        return {"parts": [part.to_record() for part in self.parts], "layer": self.layer}

    @classmethod
    def from_record(cls, record: dict) -> JointMask:
        return cls(tuple(_one_from_record(part) for part in record["parts"]), int(record["layer"]))


Mask = InstabilityMask | JointMask
"""A masked method's mask: of one matrix, or of several ranked together."""


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


def mask_from_scores(scores: torch.Tensor, k: int, **meta) -> InstabilityMask:
    """Keep the top-k scores; refuses an all-zero score (it would pick arbitrary entries)."""
    check_scores(scores, meta.get("features"))
    return InstabilityMask(shape=tuple(scores.shape), indices=top_k_flat(scores, k), **meta)


def check_scores(scores: torch.Tensor, features) -> None:
    """Refuse non-finite scores, or all-zero ones (a top k of them would be arbitrary entries)."""
    if not torch.isfinite(scores).all():
        raise ValueError("mask scores contain NaN or inf; check the model dtype and the prompts")
    if not scores.abs().sum() > 0:
        raise ValueError(
            f"all mask scores are zero for features {features}: the feature(s) never fire on the "
            "bias prompts (or do not depend on this W_out), so no mask of meaningful entries exists"
        )


def entry_scores(model, sae, site: hooks.HookSite, parameters: Sequence[str], batches: Iterable[dict],
                 features: list[int], strategy: str = "gradient", seed: int = 0, bos_token_id: int | None = None,
                 progress: bool = True, grads: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The `strategy` score (see `STRATEGIES`) of every entry of `parameters`, flattened and concatenated in their
    order; checked unless random. The gradients are the feature(s)' (`feature_gradients`) unless given as `grads`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    weights = [model.get_parameter(p).detach().cpu() for p in parameters]
    if strategy == "random":
        grads = [torch.zeros(w.shape) for w in weights]
    elif grads is None:
        grads = feature_gradients(model, sae, site, parameters, batches, features, bos_token_id, progress)
        if not any(g.abs().sum() > 0 for g in grads):
            raise ValueError(f"the gradient of feature(s) {features} with respect to {', '.join(parameters)} is zero "
                             "on every bias prompt: the feature never fires there, so there is no instability mask "
                             "to compute")
    scores = STRATEGIES[strategy](torch.cat([g.detach().cpu().flatten() for g in grads]),
                                  torch.cat([w.flatten() for w in weights]), seed)
    if strategy != "random":
        check_scores(scores, tuple(features))
    return scores


def compute_mask(model, sae, site: hooks.HookSite, parameter: str, batches: Iterable[dict], features: list[int], k: int,
                 strategy: str = "gradient", seed: int = 0, bos_token_id: int | None = None,
                 progress: bool = True, grad: torch.Tensor | None = None, **meta) -> InstabilityMask:
    """Score `parameter`'s entries by `strategy` (`entry_scores`) and keep the top k.

    The gradient is the feature(s)' (`feature_gradient`) unless another one is passed as `grad`.
    """
    scores = entry_scores(model, sae, site, [parameter], batches, features, strategy, seed, bos_token_id, progress,
                          None if grad is None else [grad])
    shape = tuple(model.get_parameter(parameter).shape)
    return InstabilityMask(parameter=parameter, shape=shape, indices=top_k_flat(scores, k), layer=site.layer,
                           hook_name=site.hook_name, features=tuple(features), strategy=strategy, **meta)


def full_mask(model: nn.Module, parameter: str, **meta) -> InstabilityMask:
    """A mask holding every entry of `parameter`: the `dense` method is the sparse delta with nothing left out."""
    weight = model.get_parameter(parameter)
    return InstabilityMask(parameter=parameter, shape=tuple(weight.shape), indices=torch.arange(weight.numel()),
                           strategy="dense", **meta)


def load_mask_for(path: str | Path, parameter: str, shape: tuple[int, ...]) -> InstabilityMask:
    """A saved mask, checked against the matrix it will edit; every error names the file and the option."""
    where, mask = _read(path)
    if isinstance(mask, JointMask):
        raise ValueError(f"{where} is for {len(mask.parts)} matrices ({', '.join(mask.parameters)}); this run edits "
                         f"{parameter} {list(shape)} only (model.edit.layers names the matrices of a joint mask)")
    if mask.parameter != parameter or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{where} is for {mask.parameter} {list(mask.shape)}; this run edits {parameter} "
                         f"{list(shape)}")
    return _checked(where, mask)


def load_masks_for(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> Mask:
    """`load_mask_for` of the matrices `shapes` maps to their shapes: for several, the file must be a `JointMask`
    of exactly those matrices (its parts come back in the order of `shapes`)."""
    if len(shapes) == 1:
        return load_mask_for(path, *next(iter(shapes.items())))
    where, mask = _read(path)
    parts = {part.parameter: part for part in mask.parts}
    theirs, ours = ({name: list(p.shape) for name, p in parts.items()}, {name: list(s) for name, s in shapes.items()})
    if theirs != ours:
        raise ValueError(f"{where} is for {theirs}; this run edits {ours} (model.edit.layers)")
    joint = JointMask(tuple(_checked(f"{where} ({name})", parts[name], True) for name in shapes), mask.layer)
    if joint.k == 0:
        raise ValueError(f"{where}: the mask holds no entry of any of its {len(shapes)} matrices")
    return joint


def _read(path: str | Path) -> tuple[str, Mask]:
    where = f"model.edit.mask_path={str(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        return where, InstabilityMask.load(path)
    except Exception as err:  # safetensors raises its own (Rust) error types for a bad header or bytes
        raise ValueError(f"{where} is not a mask written by `debias mask` ({type(err).__name__}: {err})") from None


def _checked(where: str, mask: InstabilityMask, allow_empty: bool = False) -> InstabilityMask:
    """`mask` with its indices checked (1-D integers in range, no duplicates) and sorted."""
    indices, numel = mask.indices, mask.numel
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1 or not (indices.numel() or allow_empty):
        raise ValueError(f"{where}: indices must be a {'' if allow_empty else 'non-empty '}1-D integer tensor, got "
                         f"{indices.dtype} {list(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(f"{where}: indices must be in [0, {numel}), got [{int(indices.min())}, {int(indices.max())}]")
    if indices.unique().numel() != indices.numel():
        raise ValueError(f"{where}: {indices.numel() - indices.unique().numel()} duplicate indices")
    return InstabilityMask(**{**mask.__dict__, "indices": indices.to(torch.int64).sort().values})
