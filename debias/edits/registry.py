"""One table of methods: name -> how to build its edit, what kind of edit it is, what networks it refuses, how
reports show it. Nothing else in the package names a method.

Adding a method is one module with its builder `build(EditContext) -> Edit` (an `Edit`, `debias.edits.base`) and,
if it takes options, their dataclass beside it (`lora.LoraOptions`), and one `register(Method(...))` call; its name is
then a valid `model.edit.method`, and its options valid `model.edit.options: {NAME: {...}}` (`debias.edits.options`).
`GRID_VARIANTS` are extra rows of `debias compare`: a method with some of its arguments fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from debias.edits import inference, lora, options, projection, sparse
from debias.edits.base import Edit, EditContext

Kind = Literal["mask", "weight", "inference"]


@dataclass(frozen=True)
class Method:
    """A method: `mask` (a sparse delta on k chosen entries), `weight` (another weight edit: trained, or computed
    with no parameters to train, as `feature_projection`) or `inference` (a forward hook, nothing trained, no
    checkpoint).

    What a method can do is declared here (needs a mask: `kind`; its own options: `options`, a dataclass beside its
    builder, built from `model.edit.options`; the networks it refuses: `check`; a rank sweep: `ranked`; its export
    files: `export_files`) or, where it depends on the network it was built on, by its edit
    (`Edit.save_adapter`: no adapter on GPT-2's `Conv1D`; `Edit.scaled`; `Edit.saves_delta`)."""

    name: str
    kind: Kind
    build: Callable[[EditContext], Edit]
    summary: str
    colour: str = "black"
    # what ranks a mask's entries
    mask_from: Literal["feature", "bias", "random", "feature_effect", "random_features", "all"] | None = None
    export_files: str = ""  # the model card's list of the edit's own files
    # refuses, before any SAE build or mask, a network the method cannot edit: check(net, site, parameter, options)
    check: Callable[[Any, Any, str, Any], None] | None = None
    ranked: bool = False  # a low-rank adapter (its options have `rank`): `debias compare` makes a cell per rank
    options: type | None = None  # the dataclass of its `model.edit.options` (None: it takes none)
    needs_sae: bool = False  # building it reads the SAE's latents (not only its hook site): needs an SAE and features
    # an inference method's hook alone, not yet applied (`hook_builder.build_intervention`: `debias generate`)
    intervention: Callable[[EditContext], Any] | None = None


_SPARSE_FILES = ("`adapter/` (PEFT, where the layer type has it); `debias/delta.safetensors` (indices + values, "
                 "apply with `debias.apply_delta(model, path)`); `debias/mask.safetensors`; ")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("instability", "mask", partial(sparse.build_masked, mask_from="feature"),
           "top-k entries by the SAE feature(s)' gradient",
           "tab:red", "feature", _SPARSE_FILES, needs_sae=True),
    Method("random", "mask", partial(sparse.build_masked, mask_from="random"), "k random entries (seeded): a control",
           "tab:gray", "random",
           _SPARSE_FILES),
    Method("bias_gradient", "mask", partial(sparse.build_masked, mask_from="bias"),
           "top-k entries by the train bias gap's own gradient, no SAE",
           "tab:blue", "bias", _SPARSE_FILES),
    Method("feature_effect", "mask", partial(sparse.build_masked, mask_from="feature_effect"),
           "top-k entries by the train gap's gradient taken only through the SAE feature(s), error term fixed",
           "tab:pink", "feature_effect", _SPARSE_FILES, needs_sae=True),
    Method("random_features", "mask", partial(sparse.build_masked, mask_from="random_features"),
           "instability with the features replaced by as many live latents drawn at random (seeded): a control",
           "salmon", "random_features", _SPARSE_FILES, needs_sae=True),
    Method("dense", "weight", sparse.build_dense, "every entry of W_out", "tab:purple", "all"),
    Method("lora", "weight", lora.build, "a peft LoRA adapter (rank: `options.rank`)", "tab:green",
           export_files="`adapter/` (PEFT LoRA); ", check=lora.check_network, ranked=True, options=lora.LoraOptions),
    Method("sae_clamp", "inference", inference.hooked(inference.clamp),
           "the features clamped to `options.value` at the hook, error term kept", "tab:brown",
           export_files="`steer.pt` (lm-evaluation-harness `steered` model; one latent only); ",
           options=inference.ClampOptions, needs_sae=True, intervention=inference.clamp),
    Method("steering_vector", "inference", inference.hooked(inference.steering),
           "`options.alpha` · v added at the hook (v fitted on train prompts)", "tab:cyan",
           export_files="`steer.pt` (lm-evaluation-harness `steered` model); ",
           options=inference.SteeringOptions, intervention=inference.steering),
    Method("feature_projection", "weight", projection.build,
           "the features' decoder directions projected out of W_out's output: W_out ← (I − α·P) W_out, "
           "α = `options.alpha`, no training", "tab:olive",
           export_files="`adapter/` (PEFT LoRA, rank = number of features); ", check=projection.check_network,
           options=projection.ProjectionOptions, needs_sae=True),
)}

MethodName = str
"""A `model.edit.method`: a key of `METHODS`, checked against the live table when a config is parsed
(`check_name`), so a method registered later is as valid as a shipped one."""


def register(method: Method) -> Method:
    """Add `method` to the table (refuses a name taken, so no entry is overwritten); returns it."""
    if method.name in METHODS or method.name in GRID_VARIANTS:
        raise ValueError(f"method {method.name!r} is already registered; choose another name")
    METHODS[method.name] = method
    return method


def check_name(name: object, flag: str = "model.edit.method") -> str | None:
    """The one-line problem with a method name (None: it is registered), listing the known methods."""
    if isinstance(name, str) and name in METHODS:
        return None
    return f"{flag} must be one of the registered methods {list(METHODS)}, got {name!r}"


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


def check_network(name: str, net, site, parameter: str, method_options) -> None:
    """Refuse, before any SAE build or mask, what method `name` cannot do on this network (its `Method.check`: e.g.
    a LoRA rank that does not fit W_out, a `feature_projection` hook that is not W_out's output); `method_options`:
    its options (`parse_options`)."""
    check = get(name).check
    if check is not None:
        check(net, site, parameter, method_options)


def parse_options(name: str, given) -> tuple[Any, list[str]]:
    """(method `name`'s options dataclass, built from its entry of `given` (`model.edit.options`, keyed by method) or
    its defaults, None for a method without options; the problems of every entry, one line each: a method that takes
    no options, a key its options lack, naming the methods that take it, or a bad value)."""
    return options.build(name, given, {n: m.options for n, m in METHODS.items()})


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
