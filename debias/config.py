"""Choices and defaults shared by the commands, the module and the configs: `Literal` types, so jsonargparse checks
a value and lists the choices in `--help`, and one copy of each default."""

from __future__ import annotations

from typing import Literal, get_args

MaskStrategy = Literal["gradient", "grad_x_weight"]
"""How a mask ranks W_out's entries by a gradient g: |g| or |g · w| (a random mask is the `random` method)."""
SteeringKind = Literal["mean_diff", "probe"]
"""How the steering vector is fitted: the mean difference of the two groups' activations, or a linear probe."""
DType = Literal["float32", "bfloat16", "float16"]

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
