"""Matched KL: where on its curves a cell spends a given KL, chosen on the validation split only.

At each snapshot the validation points, in ascending α and starting from the α = 0 anchor (the original model:
KL 0, nothing removed), are joined piecewise-linearly in α. The snapshot's point at a level is where its validation
KL first reaches the level: α = α₀ + t·(α₁ − α₀) with t = (level − KL₀) / (KL₁ − KL₀), every other validation
number interpolated with the same t. Of the snapshots that reach the level, the one whose point has the largest
validation gap reduction is chosen (ties: the earlier step). A cell none of whose snapshots reaches the level
"does not reach" it. Held-out numbers are never read here; the chosen (step, α) is evaluated on the held-out split
afterwards, exactly there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: The validation column each snapshot's point is ranked by.
CHOOSE_BY = "val_gap_reduction"


@dataclass(frozen=True)
class Choice:
    """The (step, α) chosen for a KL level, and the interpolated validation numbers there."""

    level: float
    step: int
    alpha: float
    validation: dict[str, float]


def _validation_only(point: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in point.items() if k.startswith("val_") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def crossing(curve: Sequence[Mapping], level: float) -> tuple[float, dict[str, float]] | None:
    """(α, interpolated validation numbers) where `curve`'s `val_kl` first reaches `level`, or None.

    `curve`: points with `alpha` and `val_*` numbers, in ascending α, the α = 0 anchor first.
    """
    for lo, hi in zip(curve, curve[1:], strict=False):
        kl_lo, kl_hi = lo["val_kl"], hi["val_kl"]
        if kl_lo is None or kl_hi is None or not kl_lo < level <= kl_hi:
            continue
        t = (level - kl_lo) / (kl_hi - kl_lo)
        a, b = _validation_only(lo), _validation_only(hi)
        values = {k: a[k] + t * (b[k] - a[k]) for k in a.keys() & b.keys()}
        values["val_kl"] = level
        return lo["alpha"] + t * (hi["alpha"] - lo["alpha"]), values
    return None


def choose(curves: Mapping[int, Sequence[Mapping]], level: float, by: str = CHOOSE_BY) -> Choice | None:
    """The snapshot (step) and α whose interpolated validation point at `level` has the largest `by`; None when no
    snapshot's curve reaches the level. `curves`: step -> its validation curve (see `crossing`)."""
    best: Choice | None = None
    for step in sorted(curves):
        found = crossing(curves[step], level)
        if found is None or found[1].get(by) is None:
            continue
        alpha, values = found
        if best is None or values[by] > best.validation[by]:
            best = Choice(level, step, alpha, values)
    return best


def anchored(points: Sequence[Mapping], anchor: Mapping) -> list[dict]:
    """`points` (one snapshot's) in ascending α after the α = 0 `anchor` (validation columns of the original)."""
    return [dict(anchor, alpha=0.0), *sorted((dict(p) for p in points), key=lambda p: p["alpha"])]
