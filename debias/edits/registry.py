"""One table of methods: name -> how to build its edit, what kind of edit it is, how reports show it.

Adding a method is one `Method` entry here and one module with its builder `build(EditContext) -> Edit`.
`GRID_VARIANTS` are extra rows of `debias compare`: a method with some of its arguments fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from debias.edits import interventions, lora, projection, sparse
from debias.edits.base import Edit, EditContext

Kind = Literal["mask", "weight", "inference"]


@dataclass(frozen=True)
class Method:
    """A method: `mask` (a sparse delta on k chosen entries), `weight` (another weight edit: trained, or computed
    with no parameters to train, as `feature_projection`) or `inference` (a forward hook, nothing trained, no
    checkpoint)."""

    name: str
    kind: Kind
    build: Callable[[EditContext], Edit]
    summary: str
    colour: str = "black"
    # what ranks a mask's entries
    mask_from: Literal["feature", "bias", "random", "feature_effect", "random_features", "all"] | None = None
    export_files: str = ""  # the model card's list of the edit's own files


_SPARSE_FILES = ("`adapter/` (PEFT, where the layer type has it); `debias/delta.safetensors` (indices + values, "
                 "apply with `debias.apply_delta(model, path)`); `debias/mask.safetensors`; ")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("instability", "mask", partial(sparse.build_masked, source="feature"),
           "top-k entries by the SAE feature(s)' gradient",
           "tab:red", "feature", _SPARSE_FILES),
    Method("random", "mask", partial(sparse.build_masked, source="random"), "k random entries (seeded): a control",
           "tab:gray", "random",
           _SPARSE_FILES),
    Method("bias_gradient", "mask", partial(sparse.build_masked, source="bias"),
           "top-k entries by the train bias gap's own gradient, no SAE",
           "tab:blue", "bias", _SPARSE_FILES),
    Method("feature_effect", "mask", partial(sparse.build_masked, source="feature_effect"),
           "top-k entries by the train gap's gradient taken only through the SAE feature(s), error term fixed",
           "tab:pink", "feature_effect", _SPARSE_FILES),
    Method("random_features", "mask", partial(sparse.build_masked, source="random_features"),
           "instability with the features replaced by as many live latents drawn at random (seeded): a control",
           "salmon", "random_features", _SPARSE_FILES),
    Method("dense", "weight", sparse.build_dense, "every entry of W_out", "tab:purple", "all"),
    Method("lora", "weight", lora.build, "a peft LoRA adapter (rank `lora_rank`)", "tab:green",
           export_files="`adapter/` (PEFT LoRA); "),
    Method("sae_clamp", "inference", interventions.build_clamp,
           "the features clamped to `clamp_value` at the hook, error term kept", "tab:brown"),
    Method("steering_vector", "inference", interventions.build_steering,
           "`steering_alpha` · v added at the hook (v fitted on train prompts)", "tab:cyan"),
    Method("feature_projection", "weight", projection.build,
           "the features' decoder directions projected out of W_out's output: W_out ← (I − α·P) W_out, "
           "α = `projection_alpha`, no training", "tab:olive",
           export_files="`adapter/` (PEFT LoRA, rank = number of features); "),
)}

MethodName = Literal["instability", "random", "bias_gradient", "feature_effect", "random_features", "dense", "lora",
                     "sae_clamp", "steering_vector", "feature_projection"]
"""The `model.edit.method` choices: the keys of `METHODS` (a test keeps the two equal)."""


@dataclass(frozen=True)
class Variant:
    """A grid row that is `method` with `args` (EditArgs fields) fixed; `layer_offsets`: its mask spans the W_out of
    the SAE's layer plus these offsets (`model.edit.layers`), those inside the model."""

    name: str
    method: str
    args: dict = field(default_factory=dict)
    colour: str = "black"
    layer_offsets: tuple[int, ...] | None = None


GRID_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("instability_gxw", "instability", {"mask_strategy": "grad_x_weight"}, "tab:orange"),
    # layers above the SAE's would get no entries: its features do not depend on them
    Variant("instability_3layers", "instability", colour="darkred", layer_offsets=(-2, -1, 0)),
)}


def grid_layers(name: str, sae_layer: int, total: int) -> list[int] | None:
    """The layers whose W_out a grid row's mask spans (None: the SAE layer's alone); refuses a row left with one."""
    offsets = GRID_VARIANTS[name].layer_offsets if name in GRID_VARIANTS else None
    if offsets is None:
        return None
    layers = sorted({sae_layer + o for o in offsets if 0 <= sae_layer + o < total})
    if len(layers) < 2:
        raise ValueError(f"grid row {name!r} spans the SAE layer {sae_layer} with offsets {list(offsets)}, which leave "
                         f"{layers} inside this model's {total} layers; expected at least 2 (drop {name!r} from "
                         "--methods)")
    return layers


def check_network(name: str, net, site, parameter: str, args) -> None:
    """Refuse, before any SAE build or mask, what method `name` cannot do on this network: a LoRA rank that does not
    fit W_out, a `feature_projection` hook that is not W_out's output."""
    if name == "lora":
        lora.check_lora_rank(args.lora_rank, tuple(net.get_parameter(parameter).shape))
    if name == "feature_projection":
        projection.check_site(net, site, parameter)


def get(name: str) -> Method:
    """The method called `name`; the error lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return METHODS[name]


def names(*kinds: Kind) -> tuple[str, ...]:
    """Method names of the given kinds (all when none are given), in table order."""
    return tuple(n for n, m in METHODS.items() if not kinds or m.kind in kinds)


def grid_entry(name: str) -> tuple[Method, dict]:
    """The method behind a grid row (a method or a `GRID_VARIANTS` name) and the arguments the row fixes."""
    if name in GRID_VARIANTS:
        variant = GRID_VARIANTS[name]
        return METHODS[variant.method], dict(variant.args)
    return get(name), {}


def colour(name: str) -> str:
    """The plot colour of a method or grid variant (black for anything else)."""
    if name in GRID_VARIANTS:
        return GRID_VARIANTS[name].colour
    return METHODS[name].colour if name in METHODS else "black"
