"""The edit of an inference-time method (`sae_clamp`, `steering_vector`): an intervention (`debias.edits.
interventions`) held on the network by a forward hook. No weight changes, so it is never merged into a checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from debias.config import SteeringKind, choices
from debias.edits import options
from debias.edits.base import EditContext, at_strength
from debias.edits.interventions import Intervention, SAEClamp, SteeringVector, check_two_groups, fit_steering
from debias.edits.record import EditRecord

if TYPE_CHECKING:
    from debias.edits.mask import Mask


class InferenceEdit:
    """`intervention` applied to every forward of `model` until `disabled()`; `features`: the SAE features it acts
    on (none for a steering vector)."""

    mask: Mask | None = None
    saves_delta = False
    merged = False  # nothing to merge: see `merge`

    def __init__(self, model: nn.Module, intervention: Intervention, features: tuple[int, ...] = ()):
        self.model, self.intervention, self.features = model, intervention, tuple(int(f) for f in features)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(intervention.applied(model))

    @contextlib.contextmanager
    def disabled(self):
        self._stack.close()
        try:
            yield
        finally:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(self.intervention.applied(self.model))

    def parameters(self) -> list[nn.Parameter]:
        return []

    def changed_parameters(self) -> int:
        return 0

    def changed_entries(self) -> int:
        return 0

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.intervention.method} has no trainable state; the checkpoint holds "
                             f"{sorted(state)[:4]}")

    def base_layers(self) -> dict[str, nn.Module]:
        return {}

    def given_weights(self) -> None:
        return None  # no weight changes

    def merge(self) -> None:
        raise TypeError(f"{type(self.intervention).__name__} is an inference-time intervention (a forward hook): "
                        "it changes no weight and cannot become a plain checkpoint")

    unmerge = merge

    def scaled(self, alpha: float) -> contextlib.AbstractContextManager:
        """The intervention at α times its strength (`SAEClamp`: acts + s·(clamped − acts); `SteeringVector`:
        s · alpha · v)."""
        return at_strength(lambda: self.intervention.strength, self.intervention.set_strength, alpha)

    def record(self) -> EditRecord:
        """No weight changed; the features it acts on."""
        return EditRecord((), self.features)

    def save_adapter(self, directory: Path, base_model: str) -> bool:
        return False

    def describe(self) -> dict:
        """The intervention's method and parameters (JSON-serialisable), for reports."""
        return self.intervention.describe()


@dataclass
class ClampOptions:
    """`model.edit.options: {sae_clamp: {...}}`."""

    value: float = 0.0
    """The value the features are held at (0: ablation)."""

    def __post_init__(self):
        options.refuse(options.finite("value", self.value))


@dataclass
class SteeringOptions:
    """`model.edit.options: {steering_vector: {...}}`."""

    alpha: float | None = None
    """Coefficient of the unit steering vector v (v points from the second group's stereotyped contexts to the
    first's: gender, from male to female); None: calibrated on this model and layer, −(mean first − mean second)·v
    over the train prompts (moves the first group's average onto the second's along v)."""
    kind: SteeringKind = "mean_diff"
    """How v is fitted on the train profession prompts: mean_diff or probe (LinearSVC)."""

    def __post_init__(self):
        kinds = list(choices(SteeringKind))
        options.refuse(options.finite("alpha", self.alpha, optional=True),
                       f"kind must be one of {kinds}, got {self.kind!r}"
                       if self.kind not in kinds else None)


def clamp(ctx) -> SAEClamp:
    """`sae_clamp`'s hook: the run's features held at `options.value` (`ClampOptions`) through the SAE, error term
    kept."""
    if ctx.sae is None:
        raise ValueError("sae_clamp needs an SAE")
    return SAEClamp(ctx.sae, ctx.site, ctx.features, ctx.options.value)


def steering(ctx) -> SteeringVector:
    """`steering_vector`'s hook: `options.alpha` · v (`SteeringOptions`), v fitted on the train gap prompts (first vs
    second group; the bias must have two groups): the context's, else the bias's train split. No alpha: the strength
    calibrated on this model and layer (`fit_steering`: the first group's average moved onto the second's along v)."""
    check_two_groups(ctx.bias)
    if ctx.gap_texts is not None or ctx.texts:
        first, second = ctx.gap_prompts()[:2]
    else:
        from debias.prompts import load_gap_prompts

        first, second = load_gap_prompts("train", bias=ctx.bias).texts[:2]
    vector, calibrated = fit_steering(ctx.net, ctx.tokenizer, ctx.site, first, second, kind=ctx.options.kind,
                                      batch_size=ctx.eval_batch_size, max_length=ctx.max_length)
    given = ctx.options.alpha
    info = {"kind": ctx.options.kind, "n_first": len(first), "n_second": len(second),
            "alpha_from": "given" if given is not None else "calibrated: -(mean_first - mean_second) . v"}
    return SteeringVector(ctx.site, vector, calibrated if given is None else given, info)


def hooked(make: Callable[[EditContext], Intervention]) -> Callable[[EditContext], InferenceEdit]:
    """A method's builder from its hook's: the intervention `make(ctx)` held on `ctx.net`."""
    return lambda ctx: InferenceEdit(ctx.net, make(ctx), tuple(ctx.features or ()))
