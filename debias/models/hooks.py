"""TransformerLens hook names on a plain Hugging Face model.

The mapping from TL names to HF modules comes from transformer-lens 3.x's `TransformerBridge` architecture adapters
(e.g. Gemma-2's `blocks.L.hook_mlp_out` is the output of `post_feedforward_layernorm`, not of `mlp`). The bridge
replaces modules in the model it wraps, so it is booted on a weightless copy built from the config (meta device)
and only the resulting table (TL name -> module path, input/output) is kept. All hooks then go on the HF model.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


@dataclass(frozen=True)
class HookSite:
    """Where a TL hook's tensor lives in an HF model: the `position` ("output"/"input") of module `module_name`."""

    hook_name: str
    layer: int  # block index; -1 outside the blocks (embeddings, final norm, unembedding)
    module_name: str
    position: str


_TABLES: dict[tuple, dict[str, tuple[str, str | None, str | None]]] = {}


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or `model` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _hf_config(base: nn.Module) -> PreTrainedConfig:
    """`base.config`, checked to be a transformers config (hook names are only known for HF models)."""
    from transformers import PreTrainedConfig

    config = getattr(base, "config", None)
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(
            f"{type(base).__name__} has no transformers config (`.config` is {type(config).__name__}); "
            "hook names can only be resolved on a Hugging Face model"
        )
    return config


def _placeholder_tokenizer():
    # The mapping does not depend on the tokenizer; a real one would be re-loaded by name (hub access) and
    # modified in place by the bridge, so it gets a two-word stand-in.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _boot_shadow(base: nn.Module, materialise: bool):
    """Boot a bridge on a weightless copy of `base`; returns (bridge, {id(original module): module path})."""
    from transformer_lens.model_bridge import TransformerBridge

    config = copy.deepcopy(_hf_config(base))
    config._attn_implementation = "eager"  # the mapping does not depend on it; other kernels may not be installed
    with torch.device("meta"):
        shadow = type(base)(config)
    if materialise:  # uninitialised CPU storage: pages are only touched where the bridge reads (fused QKV split)
        shadow = shadow.to_empty(device="cpu")
    names = {id(mod): name for name, mod in shadow.named_modules()}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            config.name_or_path or "model", hf_model=shadow, tokenizer=_placeholder_tokenizer(), device="cpu"
        )
    return bridge, names


def _hook_table(base: nn.Module) -> dict[str, tuple[str, str | None, str | None]]:
    """{TL hook name: (canonical name, module path in `base` or None, "output"/"input" or None)}, cached."""
    config = _hf_config(base)
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    key = (type(base), type(config), n_layers)
    if key in _TABLES:
        return _TABLES[key]
    try:
        bridge, names = _boot_shadow(base, materialise=False)
    except NotImplementedError:  # adapters that split fused weights at boot cannot read meta tensors
        bridge, names = _boot_shadow(base, materialise=True)
    table = {}
    for hook_name, hook_point in bridge.hook_dict.items():
        canonical = hook_point.name or hook_name
        component_path, _, kind = canonical.rpartition(".")
        module_name = position = None
        if kind in ("hook_in", "hook_out"):
            try:
                original = bridge.get_submodule(component_path).original_component
            except AttributeError:
                original = None
            if id(original) in names:
                module_name, position = names[id(original)], ("input" if kind == "hook_in" else "output")
        table[hook_name] = (canonical, module_name, position)
    _TABLES[key] = table
    return table


def resolve_hook(model: nn.Module, hook_name: str, tokenizer=None) -> HookSite:
    """The HF module (path in `model.named_modules()`) whose output or input is TL's `hook_name`.

    `tokenizer` is accepted for symmetry with the bridge's API; the mapping does not use it. `model` is not
    modified (the bridge boots on a weightless copy of its architecture).
    """
    base = _base_model(model)
    table = _hook_table(base)
    if hook_name not in table:
        near = difflib.get_close_matches(hook_name, list(table), n=5, cutoff=0.5)
        raise ValueError(
            f"unknown hook name {hook_name!r} for {type(base).__name__} "
            f"({getattr(_hf_config(base).get_text_config(), 'num_hidden_layers', '?')} layers); "
            f"nearby valid names: {near or sorted(table)[:5]}"
        )
    canonical, module_name, position = table[hook_name]
    if module_name is None or position is None:  # the table sets both or neither
        raise ValueError(
            f"hook {hook_name!r} (= {canonical!r}) is computed inside a module, not the input or output of one; "
            "it cannot be hooked on the plain HF model"
        )
    if base is not model:
        prefix = next(name for name, mod in model.named_modules() if mod is base)
        module_name = f"{prefix}.{module_name}" if module_name else prefix
    match = re.match(r"blocks\.(\d+)\.", canonical)
    return HookSite(hook_name, int(match.group(1)) if match else -1, module_name, position)


def _module(model: nn.Module, name: str) -> nn.Module:
    """The module at `name` now (it may have been wrapped since resolution), tolerating a peft wrapper prefix."""
    with contextlib.suppress(AttributeError):
        return model.get_submodule(name)
    hits = [n for n, _ in model.named_modules() if n.endswith("." + name)]
    if hits:
        return model.get_submodule(min(hits, key=len))
    parts = name.split(".")
    for i in range(1, len(parts)):
        with contextlib.suppress(AttributeError):
            return model.get_submodule(".".join(parts[i:]))
    raise ValueError(f"no module {name!r} in {type(model).__name__}")


def w_out_name(model: nn.Module, layer: int) -> str:
    """Name (in `model.named_parameters()`) of layer `layer`'s MLP output weight (TL's W_out: reads `mlp.hook_post`)."""
    site = resolve_hook(model, f"blocks.{layer}.mlp.hook_post")
    module = _module(model, site.module_name)
    name = next(n for n, m in model.named_modules() if m is module)
    get_base = getattr(module, "get_base_layer", None)
    if callable(get_base):  # peft wrapper: the weight sits on the base layer
        base = get_base()
        name = next(n for n, m in model.named_modules() if m is base)
        module = base
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"{name} ({type(module).__name__}) has no 2-D weight to edit")
    return f"{name}.weight"


def weight_layout(module: nn.Module) -> str:
    """"out_in" for nn.Linear (weight [out, in]), "in_out" for transformers' Conv1D (weight [in, out])."""
    from transformers.pytorch_utils import Conv1D

    get_base = getattr(module, "get_base_layer", None)
    if callable(get_base):
        module = get_base()
    if isinstance(module, Conv1D):
        return "in_out"
    if isinstance(module, nn.Linear):
        return "out_in"
    raise ValueError(f"unknown weight layout for {type(module).__name__}; expected nn.Linear or Conv1D")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_first(out, new):
    return type(out)((new, *out[1:])) if isinstance(out, (tuple, list)) else new


def _input_key(args, kwargs):
    """Where the hooked input sits: an int for a positional argument, else a keyword."""
    if args:
        return 0
    if "hidden_states" in kwargs:
        return "hidden_states"
    return next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def _hook(model: nn.Module, site: HookSite, on_tensor):
    """Hook `site`; `on_tensor(t)` returns a replacement tensor or None (keep)."""
    module = _module(model, site.module_name)
    if site.position == "output":
        def hook(mod, args, out):
            new = on_tensor(_first(out))
            return None if new is None else _with_first(out, new)

        handle = module.register_forward_hook(hook)
    elif site.position == "input":
        def hook(mod, args, kwargs):
            key = _input_key(args, kwargs)
            new = on_tensor(args[key] if isinstance(key, int) else kwargs[key])
            if new is None:
                return None
            if isinstance(key, int):
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        raise ValueError(f"HookSite.position must be 'output' or 'input', got {site.position!r}")
    try:
        yield
    finally:
        handle.remove()


class Captured:
    """`.value`: the hooked tensor [batch, seq, d] of the latest forward (None before one)."""

    value: torch.Tensor | None = None


@contextlib.contextmanager
def capture(model: nn.Module, site: HookSite):
    """Record the hooked tensor on each forward inside the block (grad-connected)."""
    captured = Captured()

    def keep(t):
        captured.value = t

    with _hook(model, site, keep):
        yield captured


@contextlib.contextmanager
def replace(model: nn.Module, site: HookSite, fn):
    """Inside the block, the hooked tensor t [batch, seq, d] is replaced by fn(t)."""
    with _hook(model, site, fn):
        yield


class _Stop(Exception):
    pass


def forward_until(model: nn.Module, site: HookSite, **model_inputs) -> torch.Tensor:
    """Run `model(**model_inputs)` only until the hooked tensor exists; returns it [batch, seq, d]."""
    result = []

    def stop(t):
        result.append(t)
        raise _Stop

    model_inputs.setdefault("use_cache", False)
    with _hook(model, site, stop), contextlib.suppress(_Stop):
        model(**model_inputs)
    if not result:
        raise RuntimeError(f"the forward never reached {site.module_name} ({site.hook_name})")
    return result[0]


def hooked_dim(model: nn.Module, site: HookSite) -> int:
    """Size of the hooked tensor's last dimension (d_model for the residual stream / MLP output)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return forward_until(model, site, input_ids=torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]
