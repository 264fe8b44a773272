"""Choices and defaults shared by the commands, the module and the configs: `Literal` types, so jsonargparse checks
a value and lists the choices in `--help`, and one copy of each default."""

from __future__ import annotations

from typing import Literal, get_args

MaskStrategy = Literal["gradient", "grad_x_weight"]
"""How a mask ranks W_out's entries by a gradient g: |g| or |g · w| (a random mask is the `random` method)."""
SteeringKind = Literal["mean_diff", "probe"]
"""How the steering vector is fitted: the mean difference of the two groups' activations, or a linear probe."""
DType = Literal["float32", "bfloat16", "float16"]

#: Config keys that were renamed or moved (issue #24: one name, one meaning) -> where their value goes now. An old key
#: is refused with `moved(key)`, one line naming the new one; none is read under its old name.
MOVED = {
    "model.edit.k": "model.edit.entries",
    "model.edit.seed": "model.edit.mask_seed",
    "model.edit.lora_rank": "model.edit.options: {lora: {rank: VALUE}}",
    "model.edit.clamp_value": "model.edit.options: {sae_clamp: {value: VALUE}}",
    "model.edit.steering_alpha": "model.edit.options: {steering_vector: {alpha: VALUE}}",
    "model.edit.steering_kind": "model.edit.options: {steering_vector: {kind: VALUE}}",
    "model.edit.projection_alpha": "model.edit.options: {feature_projection: {alpha: VALUE}}",
    "model.objective.bias": "model.objective.gap",
    "model.sae.build.seed": "model.sae.build.sae_seed",
    "data.seed": "data.shuffle_seed",
    "export.suites": "evaluate.suites",
    "export.completions": "evaluate.completions",
}


def moved(key: str, value: object = None) -> str | None:
    """`model.edit.lora_rank moved: use model.edit.options: {lora: {rank: 8}}` for a key of `MOVED` (None for any
    other); `value`, where known, fills the example."""
    if key not in MOVED:
        return None
    new = MOVED[key].replace("VALUE", "..." if value is None else str(value))
    return f"{key} moved: use {new}"

DEFAULT_MODEL = "smollm2-135m"


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each distribution (None where it is not installed), for reports and cache keys."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def choices(literal) -> tuple[str, ...]:
    """The values of a `Literal` type."""
    return get_args(literal)
