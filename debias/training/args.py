"""`DebiasModule`'s typed argument groups (YAML: `model.sae`, `model.edit`, `model.train`).

Choices are `Literal`s, so jsonargparse checks them and lists them in `--help`; each group's `__post_init__`
collects every problem at once, naming the flag, before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from debias.config import DType, MaskStrategy, moved
from debias.edits import registry
from debias.edits.registry import MethodName
from debias.sae.build import SAETrainSettings


def _choices(group: str, obj) -> list[str]:
    """A problem for each `Literal` field whose value is not one of its choices (jsonargparse checks them on the
    command line and in YAML; this covers the Python API)."""
    problems, hints = [], get_type_hints(type(obj))
    for f in fields(obj):
        hint = hints[f.name]
        options = [a for a in (hint, *get_args(hint)) if get_origin(a) is Literal]
        allowed = [v for literal in options for v in get_args(literal)]
        value = getattr(obj, f.name)
        if allowed and value not in allowed and not (value is None and type(None) in get_args(hint)):
            problems.append(f"{group}.{f.name} must be one of {allowed}, got {value!r}")
    return problems


def _raise(group: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"invalid {group} arguments:\n  - " + "\n  - ".join(problems))


Group = TypeVar("Group")


def as_group(cls: type[Group], value: Any, name: str) -> Group:
    """`value` as a `cls` argument group: itself, the defaults for None, or one built from a plain dict (what
    jsonargparse and a checkpoint's `hyper_parameters` give); an unknown key is refused by name."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping) or is_dataclass(value):
        raise TypeError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]  # cls is one of the dataclasses here
    unknown = [key for key in value if key not in known]
    if unknown:
        raise ValueError(moved(f"{name}.{unknown[0]}", value[unknown[0]])
                         or f"{name} has no key {unknown[0]!r}; expected some of {known}")
    return cls(**value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SAEArgs:
    """Which SAE reads the model, and which of its latents the edit removes."""

    spec: str = "tiny:blocks.1.hook_mlp_out"
    """A directory saved with `sae.save_model`, a sae_lens release (with `sae_id`), `train` (the project's own SAE for
    this model, built with `build` when not cached), or `tiny:HOOK_NAME` (a random SAE, for `tiny-*` models)."""
    sae_id: str | None = None
    """The SAE's id within a sae_lens release."""
    build: SAETrainSettings | None = None
    """How `spec: train` builds the SAE (hook, width, k, tokens, seed); every field keys the cache."""
    features: list[int] | None = None
    """Latent indices whose driving weights are edited; None: chosen at fit time on the train split
    (`debias.features.select`: top `n_features` by attribution to the train gap, confirmed by joint ablation)."""
    n_features: int = 9
    """How many latents the fit-time rule picks when `features` is None."""
    feature_target: Literal["gap", "statements", "both"] = "gap"
    """Which train gap the fit-time rule ranks and confirms latents by: `gap` (next-token gap of the bias prompts),
    `statements` (statement gap of the spec's sentence-level statements) or `both` (each normalised by its gap)."""
    n_identity_features: int = 9
    """How many latents carry group identity for `objective.identity`: the top ones by attribution to the train
    factual margin, confirmed by joint ablation (`debias.training.identity_term`); only chosen when it is > 0."""

    def __post_init__(self):
        self.build = as_group(SAETrainSettings, self.build, "model.sae.build") if self.build is not None else None
        problems = _choices("model.sae", self)
        if self.features is not None and (not self.features or any(f < 0 for f in self.features)):
            problems.append(f"model.sae.features must be a non-empty list of latent indices >= 0, got {self.features}")
        if self.n_features < 1:
            problems.append(f"model.sae.n_features must be >= 1, got {self.n_features}")
        if self.n_identity_features < 1:
            problems.append(f"model.sae.n_identity_features must be >= 1, got {self.n_identity_features}")
        _raise("model.sae", problems)


@dataclass
class EditArgs:
    """What is edited, and how (`debias.edits.registry.METHODS`): the fields every method shares, and the chosen
    method's own `options` (a dataclass registered with it)."""

    method: MethodName = "instability"
    """instability | random | bias_gradient | feature_effect | random_features (masked sparse deltas on the SAE
    layer's W_out, or on the W_out of `layers`), dense, lora (trained weight edits), sae_clamp, steering_vector
    (inference-time hooks, nothing trained), feature_projection (the features' decoder directions projected out of
    W_out: computed, not trained)."""
    fraction: float | None = 0.01
    """Share of W_out's entries a masked method trains: entries = max(1, floor(fraction × numel)), numel of all
    `layers`."""
    entries: int | None = None
    """Number of W_out entries a masked method trains (the mask's k); overrides `fraction`."""
    layers: list[int] | None = None
    """Masked methods only: the layers whose W_out one mask spans, e.g. [18, 21, 24, 27], ranked jointly (the top
    entries of all of them; `entries` and `fraction` count the entries of all of them). None: the SAE's layer alone."""
    mask_strategy: MaskStrategy = "gradient"
    """How instability, bias_gradient, feature_effect and random_features rank entries by their gradient g: |g| or
    |g · w|."""
    mask_path: str | None = None
    """Use this saved mask (`debias mask`) instead of computing one; it brings its own k."""
    mask_seed: int = 0
    """Seed of the mask's random draws: the entries of `random`, and the latents `random_features` draws."""
    rank_null_space_energy: float | None = None
    """Rank the mask inside the null space of the prompts the edit must keep: project each W_out's ranking gradient
    off the directions holding this share of the energy of its inputs on the train factual and cue prompts (those of
    `model.train.null_space_energy`) before the top k, so the mask takes entries whose input units are quiet on
    them. None: rank the raw gradient. Masked methods ranked by a gradient only (not random, not a mask_path)."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each method's own options, keyed by method and checked against its registered dataclass
    (`registry.Method.options`, `debias.edits.options`); the run's method uses its entry, `debias compare` the others'.
    lora: {rank: 8}; sae_clamp: {value: 0.0}; steering_vector: {alpha: null (calibrated), kind: mean_diff | probe};
    feature_projection: {alpha: 1.0}; the other methods take none. Omitted keys keep their defaults."""

    def __post_init__(self):
        problems = [p + (" (a random mask is method: random)" if "mask_strategy" in p else "")
                    for p in _choices("model.edit", self)]
        problems += [p for p in [registry.check_name(self.method)] if p]  # the live table: registered methods count
        masked = registry.names("mask")
        if self.method in registry.METHODS and self.method not in masked and self.entries is not None:
            problems.append(f"model.edit.entries={self.entries} was given, but method {self.method!r} has no mask "
                            f"(entries applies to {list(masked)})")
        if self.entries is None and self.fraction is None:
            problems.append("give model.edit.fraction or model.edit.entries")
        if self.entries is not None and self.entries < 1:
            problems.append(f"model.edit.entries must be >= 1, got {self.entries}")
        if self.entries is None and self.fraction is not None and not (_finite(self.fraction)
                                                                       and 0 < self.fraction <= 1):
            problems.append(f"model.edit.fraction must be in (0, 1], got {self.fraction}")
        problems += _layer_problems(self.method, self.layers)
        problems += _rank_energy_problems(self.method, self.rank_null_space_energy, self.mask_path)
        if self.mask_path is not None and not Path(self.mask_path).is_file():
            problems.append(f"model.edit.mask_path={self.mask_path!r}: no such file")
        self.method_options: Any = None  # the method's options dataclass, built from `options` (None: it takes none)
        if self.method in registry.METHODS:
            self.method_options, option_problems = registry.parse_options(self.method, self.options)
            problems += option_problems
        _raise("model.edit", problems)

    @property
    def masked(self) -> bool:
        return registry.get(self.method).kind == "mask"


def _rank_energy_problems(method: str, energy, mask_path: str | None) -> list[str]:
    """`model.edit.rank_null_space_energy`: in (0, 1], for a method whose mask this run ranks by a gradient."""
    if energy is None:
        return []
    if not (_finite(energy) and 0 < energy <= 1):
        return [f"model.edit.rank_null_space_energy must be in (0, 1] or null, got {energy}"]
    ranked = [m for m in registry.names("mask") if m != "random"]
    if method in registry.METHODS and method not in ranked:
        return [f"model.edit.rank_null_space_energy={energy} was given, but method {method!r} ranks no gradient "
                f"(it applies to {ranked})"]
    if mask_path is not None:
        return [f"model.edit.rank_null_space_energy={energy} was given with model.edit.mask_path={mask_path!r}: a "
                "given mask is used as it is; drop one of them"]
    return []


def _layer_problems(method: str, layers) -> list[str]:
    """`model.edit.layers`: a non-empty list of distinct layer indices >= 0, for a masked method only (the upper bound,
    the model's number of layers, is checked once it is loaded: `debias.edits.joint.edited_matrices`)."""
    if layers is None:
        return []
    masked, problems = registry.names("mask"), []
    if method in registry.METHODS and method not in masked:
        problems.append(f"model.edit.layers={layers} was given, but method {method!r} edits the SAE layer's W_out "
                        f"only (layers applies to {list(masked)})")
    if not isinstance(layers, (list, tuple)) or not layers:
        return problems + [f"model.edit.layers must be a non-empty list of layer indices, got {layers!r}"]
    odd = [i for i in layers if not isinstance(i, int) or isinstance(i, bool)]
    if odd:
        return problems + [f"model.edit.layers must hold layer indices (integers), got {odd[0]!r} in {layers}"]
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        problems.append(f"model.edit.layers={layers} repeats layer {repeated[0]}; expected each layer at most once")
    negative = [i for i in layers if i < 0]
    if negative:
        problems.append(f"model.edit.layers={layers}: layer {negative[0]} is outside the model (expected "
                        "0 <= i < the model's number of layers)")
    return problems


@dataclass
class TrainArgs:
    """How the edit is trained."""

    lr: float = 1e-2
    """Adam learning rate of the edit; (0, 1] (larger steps blow a delta up without a word)."""
    max_length: int = 64
    """Tokens per text (longer texts are truncated)."""
    cache_activations: bool = True
    """Train on cached layer-L inputs and original-model outputs (`debias.training.cache`): each step reruns only
    layers L..N; same result as the plain path, which runs where it does not apply."""
    cache_budget_mb: float = 1024.0
    """Memory the training cache may hold (reference logits cost vocab × 4 bytes per token)."""
    null_space_energy: float | None = None
    """Retention by construction (AlphaEdit): after every step, project the update of each edited W_out off the
    directions holding this share of the energy of its inputs on the train factual and cue prompts (0.99 keeps
    ~100-200 of SmolLM2's 1,536), then re-mask it (`debias.edits.null_space`). None: off."""
    lr_decay: float = 0.0
    """The share of the run's last steps (`trainer.max_steps`) over which the learning rate falls linearly to 0, so
    Adam's late see-saw between the removal and retention terms settles; 0: constant (no scheduler); [0, 1)."""
    persist_activations: bool = True
    """Keep the cached layer-L inputs on disk (`debias.training.upstream_store`), so the next run of the same model
    skips layers 0..L-1 for every text a run saw before; `$DEBIAS_ACTIVATION_CACHE=0` turns it off too."""

    def __post_init__(self):
        problems = _choices("model.train", self)
        if not (_finite(self.lr) and 0 < self.lr <= 1):
            problems.append(f"model.train.lr must be a finite number in (0, 1], got {self.lr}")
        if self.max_length < 2:
            problems.append(f"model.train.max_length must be >= 2, got {self.max_length}")
        if self.null_space_energy is not None and not (_finite(self.null_space_energy)
                                                       and 0 < self.null_space_energy <= 1):
            problems.append(f"model.train.null_space_energy must be in (0, 1] or null, got {self.null_space_energy}")
        if not (_finite(self.lr_decay) and 0 <= self.lr_decay < 1):
            problems.append(f"model.train.lr_decay must be a number in [0, 1), got {self.lr_decay}")
        if not (_finite(self.cache_budget_mb) and self.cache_budget_mb >= 0):
            problems.append(f"model.train.cache_budget_mb must be a finite number >= 0, got {self.cache_budget_mb}")
        _raise("model.train", problems)


def check_dtype(dtype: str) -> None:
    from debias.config import choices

    if dtype not in choices(DType):
        raise ValueError(f"model.dtype must be one of {list(choices(DType))}, got {dtype!r}")
