"""The training fast path: compute once what the delta cannot change.

Only `W_out` of layers >= L is trained (L: the SAE's layer, or the lowest of `model.edit.layers` when a mask spans
several), so the residual stream entering decoder layer L (the input of the lowest layer that holds a trained
`W_out`) is the same at every step for a given text batch, and so are the original model's outputs (the
reference log-probs of the KL terms, the feature-ablated logits of the `ablation` term). `FastPath` memoises both:

- **upstream** (`active()`): while active, every forward of the network whose inputs (`input_ids`,
  `attention_mask`, `position_ids`, ...) were seen before skips decoder layers 0..L-1: they are swapped for a
  stand-in that returns the cached layer-L input, and the model's own forward does everything else (embedding
  scale, rotary positions, attention masks, per-layer attention types), so families need no special code. On a
  miss the full forward runs once and layer L's input is recorded. The feature term then costs layers L up to the
  SAE's (the forward stops at its hook) and the KL terms cost layers L..N and the unembedding.
- **reference** (`reference(key, compute)`): outputs of the original model (delta off, no grad) per text batch,
  e.g. neutral-text logits (vocab × 4 bytes per token).

Both share one budget (`budget_mb`); what does not fit is recomputed (the plain path), with the same result. With
`persist`, upstream activations are also kept on disk (`debias.training.upstream_store`), so a later run of the same
model finds them there. The
fast path switches itself off (plain path, one log line) for model families it has not been tested on, when a
dropout is active in the network (the cache would freeze one noise draw), under FSDP (ranks must run the same
collectives, so none may skip layers the others run), and for forwards it cannot key (input embeddings, a KV cache,
hidden-state outputs). Under DDP each rank caches its own shard of the data: the forward has no collectives.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
from typing import cast

import torch
from torch import nn

from debias.training.args import TrainArgs
from debias.training.layer_stack import layer_stack
from debias.training.upstream_store import UpstreamStore, identity
from debias.training.upstream_store import enabled as store_enabled

log = logging.getLogger(__name__)

#: `config.model_type`s whose fast path is tested to match the plain path (tests/test_fastpath.py).
SUPPORTED = ("llama", "gemma2", "gpt2", "qwen2", "mistral")
#: Keyword arguments of the decoder stack's forward that make a call uncacheable when set.
_UNCACHEABLE = ("inputs_embeds", "past_key_values", "output_hidden_states", "output_attentions",
                "encoder_hidden_states")


def _nbytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def _detach(value):
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _tensor_key(t: torch.Tensor) -> tuple:
    data = t.detach().to("cpu", copy=False).contiguous()
    return (tuple(t.shape), str(t.dtype), hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest())


def stochastic(net: nn.Module) -> bool:
    """Whether a forward of `net` in its current mode draws dropout noise."""
    if not net.training:
        return False
    if any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in net.modules()):
        return True
    config = getattr(net, "config", None)
    if config is not None:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name, value in config.to_dict().items():
            if ("dropout" in name or "pdrop" in name) and isinstance(value, (int, float)) and value > 0:
                return True
    return False


def sharded(net: nn.Module) -> bool:
    """Whether `net` holds FSDP-wrapped modules (FSDP1 wrappers, or FSDP2's `FSDP<Name>` classes)."""
    return any(type(m).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for m in net.modules())


class _Standin(nn.Module):
    """Takes the place of a skipped decoder layer: returns the cached input of layer L, whatever it is given."""

    def __init__(self, value: torch.Tensor, tuple_len: int | None):
        super().__init__()
        self.value, self.tuple_len = value, tuple_len

    def forward(self, *args, **kwargs):
        if self.tuple_len is None:
            return self.value
        return (self.value, *([None] * (self.tuple_len - 1)))


class FastPath:
    """Memoised upstream activations and original-model outputs for training weights of layers >= L.

    Args:
        net: the HF causal LM (the delta attached or not: only layers 0..L-1 and the stack's forward are touched).
        parameter: name of a weight of layer L in `net.named_parameters()`, the lowest trained one (e.g.
            `model.layers.24.mlp.down_proj.weight`); trained weights of higher layers need nothing more.
        budget_mb: memory the cache may hold, upstream activations and reference outputs together.
        upstream: a store of upstream activations to share, e.g. between the cells of `debias compare`, whose
            models differ only at or above layer L (keys hash the inputs, so any text set can share it).
        persist: keep upstream activations on disk across runs (`debias.training.upstream_store`, unless
            `$DEBIAS_ACTIVATION_CACHE` is 0): a miss in memory is looked up there before the full forward runs,
            and a recorded input is written there.
    """

    def __init__(self, net: nn.Module, parameter: str, budget_mb: float = 1024.0, upstream: dict | None = None,
                 persist: bool = False):
        self.net = net
        self.budget = int(budget_mb * 2**20)
        self.upstream: dict[tuple, tuple[torch.Tensor, int | None]] = {} if upstream is None else upstream
        self.used = sum(_nbytes(v) for v in self.upstream.values())
        self.model_type = getattr(getattr(net, "config", None), "model_type", None)
        stack_path, self.layer = layer_stack(net, parameter)
        self.layers = cast(nn.ModuleList, net.get_submodule(stack_path))  # layer_stack checked it is one
        self.stack = net.get_submodule(stack_path.rpartition(".")[0]) if "." in stack_path else net
        self.hidden_dtype = next(self.layers[self.layer].parameters()).dtype  # what layer L takes in
        self.store = UpstreamStore(lambda: identity(net, parameter)) if persist and store_enabled() else None
        self._signature = inspect.signature(type(self.stack).forward)
        params = self._signature.parameters.values()
        self._var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._takes_use_cache = "use_cache" in self._signature.parameters or self._var_kw is not None
        self.references: dict = {}
        self.stats = {"upstream_hits": 0, "upstream_misses": 0, "stored_hits": 0, "reference_hits": 0,
                      "reference_misses": 0, "over_budget": 0, "bypassed": 0}
        self._said: set[str] = set()
        self._active = False

    @classmethod
    def for_training(cls, net: nn.Module, parameter: str, args: TrainArgs, upstream: dict | None = None) -> FastPath:
        """The fast path of a `DebiasModule` with `model.train` arguments `args` (budget, persistence)."""
        return cls(net, parameter, args.cache_budget_mb, upstream, persist=args.persist_activations)

    # ----- when the fast path applies -----
    @property
    def supported(self) -> bool:
        return self.model_type in SUPPORTED

    def usable(self) -> bool:
        """Whether caching is valid now (a tested family, no dropout noise); logs the reason once if not."""
        if not self.supported:
            self._say("family", f"fast path: model_type {self.model_type!r} is not among the tested families "
                                f"{SUPPORTED}; training uses the plain path (full forward every step)")
            return False
        if sharded(self.net):
            self._say("fsdp", "fast path: the network is sharded (FSDP), whose forward gathers parameters across "
                              "ranks in lockstep; a cache hit on one rank and a miss on another would hang, so "
                              "training uses the plain path")
            return False
        if stochastic(self.net):
            self._say("dropout", "fast path: dropout is active in the network, so upstream activations and reference "
                                 "outputs change from step to step; training uses the plain path")
            return False
        return True

    def _say(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message)

    def _fits(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            self.stats["over_budget"] += 1
            self._say("budget", f"fast path: the cache budget ({self.budget / 2**20:.0f} MB) is full; batches that do "
                                "not fit are recomputed each step (plain path, same result). Raise cache_budget_mb "
                                "to cache more.")
            return False
        self.used += nbytes
        return True

    # ----- upstream activations -----
    @contextlib.contextmanager
    def active(self):
        """Inside the block, forwards of `net` reuse (or record) layer L's input; re-entrant."""
        if self._active or self.layer == 0 or not self.usable():
            yield
            return
        had = "forward" in self.stack.__dict__
        previous = self.stack.__dict__.get("forward")
        original = self.stack.forward
        self.stack.forward = lambda *args, **kwargs: self._forward(original, args, kwargs)
        self._active = True
        try:
            yield
        finally:
            self._active = False
            if had:
                self.stack.forward = previous
            else:
                del self.stack.forward

    def _arguments(self, args, kwargs) -> dict | None:
        """The stack forward's arguments by name, or None when they do not bind."""
        try:
            bound = self._signature.bind(self.stack, *args, **kwargs).arguments
        except TypeError:
            return None
        extra = bound.pop(self._var_kw, {}) if self._var_kw else {}
        bound.pop("self", None)
        return {**bound, **extra}

    def _key(self, arguments: dict | None) -> tuple | None:
        if arguments is None or not torch.is_tensor(arguments.get("input_ids")):
            return None
        if any(arguments.get(name) is not None and arguments.get(name) is not False for name in _UNCACHEABLE):
            return None
        key = []
        for name in sorted(arguments):
            value = arguments[name]
            if torch.is_tensor(value):
                key.append((name, _tensor_key(value), str(value.device)))
            elif isinstance(value, dict):  # a prepared attention-mask mapping
                return None
        return tuple(key)

    def _forward(self, original, args, kwargs):
        arguments = self._arguments(args, kwargs)
        key = self._key(arguments)
        if key is None:
            self.stats["bypassed"] += 1
            return original(*args, **kwargs)
        hit = self.upstream.get(key)
        if hit is None and self.store is not None:
            ids = cast(dict, arguments)["input_ids"]  # `_key` returned a key: the arguments bound, with input_ids
            hit = self.store.load(key, ids.device, self.hidden_dtype, tuple(ids.shape))
            if hit is not None:
                self.stats["stored_hits"] += 1
                if self._fits(_nbytes(hit[0])):
                    self.upstream[key] = hit
        if hit is not None:
            self.stats["upstream_hits"] += 1
            standin = _Standin(*hit)
            saved = [self.layers[i] for i in range(self.layer)]
            for i in range(self.layer):
                self.layers[i] = standin
            try:
                return original(*args, **({**kwargs, "use_cache": False} if self._takes_use_cache else kwargs))
            finally:
                for i, module in enumerate(saved):
                    self.layers[i] = module
        self.stats["upstream_misses"] += 1
        seen = []

        def record(module, inputs, output):
            seen.append(output)

        handle = self.layers[self.layer - 1].register_forward_hook(record)
        try:
            return original(*args, **kwargs)
        finally:
            handle.remove()
            if seen:
                out = seen[-1]
                value = (out[0] if isinstance(out, (tuple, list)) else out).detach()
                tuple_len = len(out) if isinstance(out, (tuple, list)) else None
                if self._fits(_nbytes(value)):
                    self.upstream[key] = (value, tuple_len)
                    if self.store is not None:
                        self.store.save(key, value, tuple_len)

    # ----- original-model outputs -----
    def reference(self, key, compute):
        """`compute()` (an original-model output, no grad), memoised under `key` when usable and within budget."""
        if not self.usable():
            return compute()
        if key in self.references:
            self.stats["reference_hits"] += 1
            return self.references[key]
        self.stats["reference_misses"] += 1
        value = compute()
        if self._fits(_nbytes(value)):
            self.references[key] = _detach(value)
        return value

    def clear(self) -> None:
        self.upstream.clear()
        self.references.clear()
        self.used = 0

    def cached_bytes(self) -> int:
        return self.used


def original_output(module, name: str, texts, compute):
    """`compute()` on `module`'s original model (delta off, no grad), memoised by its fast path per (name, texts)
    unless `module.use_fast_path` is off."""

    def run():
        with torch.no_grad(), module.delta.disabled():
            return compute()

    fast = getattr(module, "fastpath", None) if getattr(module, "use_fast_path", True) else None
    return run() if fast is None else fast.reference((name, tuple(texts)), run)
