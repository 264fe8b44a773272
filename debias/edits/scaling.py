"""An edit at a fraction (or multiple) α of its strength, without rebuilding it: `with scaled(edit, α): ...`.

Each edit knows how it scales (`Edit.scaled`): a sparse or dense delta multiplies its trained values by α (W + α·Δ);
LoRA sets peft's scale (α·B·A); `FeatureProjection` and the inference-time interventions multiply their strength
(W_out ← (I − α·P) W_out; acts + α·(clamped − acts); α · alpha · v); another model (`StateDiffEdit`) interpolates
its weights, base + α·(edited − base).

α = 0 is the original model in every case, α = 1 the edit as built. On leaving the block the edit is restored
exactly (the saved values, scale or strength are put back, nothing is recomputed by division).
"""

from __future__ import annotations

import contextlib
import math

from debias.edits.base import Edit


def check_alpha(alpha) -> float:
    """α as a float; a one-line ValueError unless it is a finite number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"an edit's scale α must be a finite number (1: the edit as built, 0: the original model), "
                         f"got {alpha!r}")
    return float(alpha)


def scaled(edit: Edit, alpha: float) -> contextlib.AbstractContextManager:
    """Inside the block, `edit` acts at α times its strength (see the module docstring); restored exactly after."""
    return edit.scaled(check_alpha(alpha))
