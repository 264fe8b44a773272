"""The fast path's layer-L inputs, kept on disk across runs: the second `debias fit` or `debias eval` of a model
runs layers L..N only, also for texts the first run evaluated (held-out splits, suites, completions' prompts).

An entry is the input of layer L for one forward (`FastPath`'s key: a hash of every input tensor), stored as
`cache_dir() / "activations" / <identity> / <key hash>.safetensors` (tensors only: loading executes nothing). The
identity names what that input depends on, so another model, dtype, device, layer or code is another directory:
- an exact hash of every parameter and buffer below layer L (the embeddings, layers 0..L-1; a weight tied to the
  embeddings too), so a network changed in memory after loading gets its own entries;
- the model's config (the attention implementation included), the layer and its stack, the dtype and the device
  type;
- the package and library versions and the sources of the forward's callers (`CODE_FILES`).

No wrong activation is ever used: each entry is written atomically (`debias.io.atomic_write`) and holds its own key
and identity; one that cannot be read, was written for another key or identity, or whose shape or dtype is not that
of the forward, or that holds a NaN or an infinity, is recomputed with a warning naming its path; a non-finite input is
never stored, and a FIFO or anything else planted at an entry's path is never opened. A cache that cannot be written
(read-only, disk full, over `DEBIAS_ACTIVATION_CACHE_GB`, which must be finite) warns once, naming the path, and the
run goes on without persisting.
`DEBIAS_ACTIVATION_CACHE=0` turns it off.

Written by hand: safetensors stores tensors, but nothing in the stack keys a decoder's intermediate activations
by their inputs and by the weights that produce them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from debias import json_store
from debias.io import atomic_write, is_regular
from debias.models.load import cache_dir
from debias.training.layer_stack import layer_stack, upstream_of

ENV, ENV_GB = "DEBIAS_ACTIVATION_CACHE", "DEBIAS_ACTIVATION_CACHE_GB"
DEFAULT_GB = 8.0
FORMAT = 1
PACKAGE = Path(__file__).resolve().parents[1]
#: Sources that run the forward up to layer L; a change to any of them is a new identity.
CODE_FILES = ("training/cache.py", "training/upstream_store.py", "training/layer_stack.py", "models/load.py",
              "models/hooks.py")


def enabled() -> bool:
    """False when `$DEBIAS_ACTIVATION_CACHE` is 0 / false / no / off."""
    return json_store.enabled(ENV)


def _limit_bytes() -> int:
    raw = os.environ.get(ENV_GB, "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_GB
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb < 0:
        raise ValueError(f"${ENV_GB}={raw!r}: expected a finite number of gigabytes >= 0, e.g. 8")
    return int(gb * 2**30)


def identity(net: nn.Module, parameter: str) -> dict:
    """What the input of the layer holding `parameter` depends on besides the forward's inputs (module docstring)."""
    stack, index = layer_stack(net, parameter)
    tensors = {**dict(net.named_buffers()), **dict(net.named_parameters())}
    below = json_store.tensor_digest({name: tensors[name] for name in upstream_of(net, parameter, list(tensors))})
    config = getattr(net, "config", None)
    return {"format": FORMAT, "weights_below": below, "layer": f"{stack}.{index}",
            "device": next(cast(nn.ModuleList, net.get_submodule(stack))[index].parameters()).device.type,
            "config": json.loads(config.to_json_string()) if config is not None else None,
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "code": json_store.code_version(PACKAGE, CODE_FILES)}


def _key_digest(key: tuple) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()[:40]


class UpstreamStore:
    """Layer-L inputs on disk, one file per forward key, under a directory named by the network's identity.

    `identify()` returns the identity (`identity(...)`); it runs once, at the first lookup, since it hashes the
    weights below layer L.
    """

    def __init__(self, identify: Callable[[], dict]):
        self._identify = identify
        self.root = cache_dir() / "activations"
        self.limit = _limit_bytes()
        self.writable = True
        self._stored: int | None = None
        self.stats = {"loaded": 0, "written": 0, "rejected": 0}

    @functools.cached_property
    def identity(self) -> dict:
        return self._identify()

    @functools.cached_property
    def digest(self) -> str:
        return json_store.digest(self.identity)[:32]

    @property
    def directory(self) -> Path:
        return self.root / self.digest

    def path(self, key: tuple) -> Path:
        return self.directory / f"{_key_digest(key)}.safetensors"

    def load(self, key: tuple, device: torch.device, dtype: torch.dtype,
             shape: tuple[int, ...] | None) -> tuple[torch.Tensor, int | None] | None:
        """The stored input of layer L for `key` (`shape`: its leading dims, the forward's [batch, seq]), or None."""
        path = self.path(key)
        if not path.exists():
            return None
        if not is_regular(path):  # a FIFO or a directory planted there: never opened
            self._reject(path, "is not a regular file")
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, value = f.metadata() or {}, f.get_tensor("value")
        except (OSError, SafetensorError) as err:  # unreadable, torn, garbage, or without the tensor
            self._reject(path, f"is not a readable safetensors entry ({type(err).__name__}: {err})")
            return None
        if meta.get("key") != repr(key) or meta.get("identity") != self.digest:
            self._reject(path, "was written for another input or model")
            return None
        if value.dtype != dtype or (shape is not None and tuple(value.shape[:len(shape)]) != shape):
            self._reject(path, f"holds a {value.dtype} tensor of shape {tuple(value.shape)}, expected {dtype} with "
                               f"leading dims {shape}")
            return None
        if value.is_floating_point() and not torch.isfinite(value).all():
            self._reject(path, f"holds {int((~torch.isfinite(value)).sum())} non-finite values")
            return None
        tuple_len = json.loads(meta.get("tuple_len", "null"))
        self.stats["loaded"] += 1
        return value.to(device), tuple_len

    def _reject(self, path: Path, why: str) -> None:
        self.stats["rejected"] += 1
        json_store.warn(f"the activation cache entry {path} {why}; recomputing it")

    def save(self, key: tuple, value: torch.Tensor, tuple_len: int | None) -> None:
        """Store `value` for `key`; a cache that cannot take it warns once and is not written again this run."""
        if not self.writable or (value.is_floating_point() and not torch.isfinite(value).all()):
            return  # a non-finite input of layer L would be refused when read back
        data = save({"value": value.detach().to("cpu").contiguous()},
                    metadata={"key": repr(key), "identity": self.digest, "tuple_len": json.dumps(tuple_len)})
        path = self.path(key)
        try:
            if self._stored is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                # for people reading the cache; the code checks each entry's own metadata instead
                atomic_write(self.directory / "identity.json", json.dumps(self.identity, indent=1, default=str))
                self._stored = sum(p.stat().st_size for p in self.root.rglob("*.safetensors"))
            if self._stored + len(data) > self.limit:
                self.writable = False
                json_store.warn(f"the activation cache {self.root} holds {self._stored / 2**30:.1f} GB, its limit "
                      f"(${ENV_GB}, default {DEFAULT_GB:g}); new activations are not stored. Remove old entries "
                      f"(rm -r {self.root}) or raise the limit")
                return
            atomic_write(path, data)
        except OSError as err:
            self.writable = False
            json_store.warn(f"cannot write the activation cache {path} ({err}); continuing without storing activations")
            return
        self._stored += len(data)
        self.stats["written"] += 1
