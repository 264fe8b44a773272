"""`DebiasModule`: a HF causal LM, an SAE at one layer, and the edit a method puts on that layer's `W_out`.

Construction loads the model (and an SAE that exists); `setup` / `prepare` does the work: building the project's SAE
when it is not cached, choosing features, computing the mask and attaching the edit. The original model is the same
network with the edit disabled: no second copy is held. Checkpoints keep only the edit's trainable state and its
record (`debias.training.checkpoint`), so `DebiasModule.load_from_checkpoint(path, weights_only=True)` gives the
trained edit back with no DataModule. Any DataModule meeting `debias.training.protocol.DebiasData` trains it.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any, cast

import torch
from lightning.pytorch import LightningModule

from debias.edits import registry
from debias.edits.base import EditContext
from debias.edits.joint import edited_matrices
from debias.edits.mask import Mask, resolve_k
from debias.models import hooks
from debias.models.scoring import real_token_mask, target_ids
from debias.training import optimizer
from debias.training.args import EditArgs, SAEArgs, TrainArgs, as_group, check_dtype
from debias.training.cache import FastPath
from debias.training.checkpoint import KEY, edit_record, restore_edit
from debias.training.console import say
from debias.training.identity_term import IdentityLatents, fit_identity
from debias.training.layer_stack import upstream_of
from debias.training.module_sae import build_settings, check_sae, load_sae
from debias.training.objective import ObjectiveWeights, loss_terms, token_kl
from debias.training.preserve import null_space_for, preserved_batches, project_delta
from debias.training.protocol import DebiasData, check_data


class DebiasModule(LightningModule):
    """Train (or apply) one method's edit of the SAE layer's `W_out` (`debias.edits.registry`); a masked method's may
    span the `W_out` of several layers (`model.edit.layers`, `parameters_edited`)."""

    # The groups are annotated as their dataclasses only, though a dict of their fields is accepted at run time
    # (`as_group`): with `| dict` in the signature, jsonargparse would take a mistyped key as a plain dict instead of
    # refusing it while parsing, with the key and a hint.
    def __init__(self, base_model: str, dtype: str = "float32", sae: SAEArgs | None = None,
                 edit: EditArgs | None = None, objective: ObjectiveWeights | None = None,
                 train: TrainArgs | None = None):
        """
        Args:
            base_model: hub id, local HF directory, or a spec (`smollm2-135m`, `tiny-llama`, ...).
            dtype: the model weights' dtype (float32, bfloat16, float16); the edit trains in float32.
            sae / edit / objective / train: `SAEArgs` (the SAE and its latents), `EditArgs` (the method),
                `ObjectiveWeights` (the loss terms' weights), `TrainArgs` (lr, text length, the fast path); each the
                dataclass or a dict of its fields (as YAML and checkpoints hold them); None: its defaults.
        """
        super().__init__()
        check_dtype(dtype)
        self.sae_args, self.edit_args = as_group(SAEArgs, sae, "model.sae"), as_group(EditArgs, edit, "model.edit")
        self.objective = as_group(ObjectiveWeights, objective, "model.objective")
        self.train_args = as_group(TrainArgs, train, "model.train")
        # Plain values only: checkpoints load with weights_only=True.
        self.save_hyperparameters({"base_model": base_model, "dtype": dtype, "sae": asdict(self.sae_args),
                                   "edit": asdict(self.edit_args), "objective": asdict(self.objective),
                                   "train": asdict(self.train_args)})
        self.features = list(self.sae_args.features or [])
        self.feature_selection: dict = {"rule": "given in the config"} if self.features else {}
        from debias.models.load import load_model  # looked up at call time: tests stand in for the loader

        loaded = load_model(base_model, dtype=dtype)
        self.net, self.tokenizer, self.model_id = loaded.model, loaded.tokenizer, loaded.model_id
        self.model_path = loaded.path or loaded.model_id
        self.sae = load_sae(self, build_missing=False)
        hook_name = self.sae.cfg.metadata.hook_name if self.sae is not None else build_settings(self).hook_name
        self.site = hooks.resolve_hook(self.net, hook_name, self.tokenizer)
        check_sae(self)
        self.parameter = hooks.w_out_name(self.net, self.site.layer)
        # every W_out the edit trains and their layers, ascending: [parameter] unless model.edit.layers names others
        self.layers_edited, self.parameters_edited = edited_matrices(self.net, self.site.layer, self.edit_args.layers)
        self.original_keys = list(self.net.state_dict())  # the HF checkpoint's keys, before an edit wraps a layer
        self.groups: tuple[str, ...] = ()  # the data's bias spec, its groups and their target ids: set by `prepare`
        self.targets: tuple[int, ...] = ()
        self.bias_spec: str | None = None
        self.numel = sum(self.net.get_parameter(p).numel() for p in self.parameters_edited)
        method = registry.get(self.edit_args.method)
        registry.check_network(method.name, self.net, self.site, self.parameter, self.edit_args.method_options)
        k, fraction = self.edit_args.entries, self.edit_args.fraction
        self.k = resolve_k(self.numel, None if k is not None else fraction, k) if method.kind == "mask" else None
        self.mask: Mask | None = None  # the mask of a masked method, once prepared
        self.preset_mask: Mask | None = None  # set before `prepare`: use it instead of computing one
        self.delta: Any = None  # the method's edit (an `Edit`), attached by `prepare`
        self.fastpath: FastPath | None = None
        self.use_fast_path = True
        """False: training and evaluation take the plain path (full forwards), keeping the fast path's cache for when it
        is turned back on. `model.train.cache_activations: false` builds no fast path at all."""
        self.null_space: Any = None  # a NullSpace (`model.train.null_space_energy`), fitted by `prepare`
        self.identity: IdentityLatents | None = None  # `objective.identity`'s latents, chosen by `prepare`
        self.shared_upstream: dict | None = None  # set before `prepare` to share cached activations across runs
        self.feature_baseline: torch.Tensor
        self.register_buffer("feature_baseline", torch.ones(max(len(self.features), self.sae_args.n_features)))
        self.strict_loading = False  # checkpoints hold only the trainable state

    def ensure_sae(self) -> None:
        """Build (or load) the SAE if construction left it for later; the SAE build can take many minutes."""
        if self.sae is None:
            how = f" in {build_settings(self).compute_dtype}" if self.sae_args.spec == "train" else ""
            say(f"building the SAE for {self.model_id} at {self.site.hook_name}{how} (cached afterwards)")
            self.sae = load_sae(self, build_missing=True)
            check_sae(self)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                             max_length=self.train_args.max_length)
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def real(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return real_token_mask(batch["input_ids"], batch["attention_mask"], self.tokenizer.bos_token_id)

    def setup(self, stage: str) -> None:
        self.prepare(check_data(getattr(self.trainer, "datamodule", None)))  # set by Trainer.fit(datamodule=...)

    def prepare(self, datamodule: DebiasData) -> None:
        """Build the SAE if needed, choose features, build the method's edit from `datamodule`'s train texts and
        attach it; idempotent."""
        if self.delta is not None:
            return
        datamodule = check_data(datamodule)
        self.ensure_sae()
        datamodule.setup("fit")
        self.bias_spec, self.groups = datamodule.bias, tuple(datamodule.groups)
        self.targets = target_ids(self.tokenizer, datamodule.bias)
        terms = ("counterfactual", "factual_kl", "cda", "identity")
        datamodule.require_items([n for n in terms if getattr(self.objective, n) > 0])
        self.choose_features(datamodule)
        if self.objective.identity > 0:  # the latents that carry group identity, kept by objective.identity
            self.identity = fit_identity(self, datamodule.items.get("factual"), datamodule, datamodule.eval_batch_size)
        self.feature_baseline = self.feature_baseline[: len(self.features)].clone()
        statements = self.sae_args.feature_target != "gap"  # features chosen on statements fire on statements
        batches = [self.tokenize(b) for b in datamodule.mask_batches(statements)]
        self.build_edit(datamodule, batches)
        if self.train_args.null_space_energy is not None:
            self.null_space = null_space_for(self, datamodule, self.train_args.null_space_energy)
        with self.fast_path():
            self.feature_baseline.copy_(self.mean_feature_acts(batches))
        if not (self.feature_baseline > 0).all():
            silent = [f for f, b in zip(self.features, self.feature_baseline.tolist(), strict=False) if b <= 0]
            raise ValueError(f"feature(s) {silent} never fire on the train bias prompts; nothing to remove")

    def build_edit(self, data: DebiasData | None, batches: list[dict]) -> None:
        """Build the method's edit from `data`'s train texts and the tokenised mask `batches` and attach it; with no
        data (`load_from_checkpoint`), from `preset_mask` and the module's own features alone."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        from_data: dict[str, Any] = {"texts": {}} if data is None else dict(
            texts=data.texts, eval_batch_size=data.eval_batch_size, bias=data.bias, gap_texts=data.gap_texts(),
            preserved=lambda: preserved_batches(self, data))
        context = EditContext(
            net=self.net, tokenizer=self.tokenizer, sae=self.sae, site=self.site, parameter=self.parameter,
            parameters=self.parameters_edited, layers=self.layers_edited, features=self.features, k=self.k,
            args=self.edit_args, options=self.edit_args.method_options, mask_batches=batches,
            max_length=self.train_args.max_length, model_id=self.model_id,
            sae_name=":".join(filter(None, [self.sae_args.spec, self.sae_args.sae_id])), preset_mask=self.preset_mask,
            broadcast=strategy.broadcast if strategy is not None else (lambda obj: obj), **from_data)
        self.attach_edit(registry.get(self.edit_args.method).build(context))

    def choose_features(self, datamodule: DebiasData) -> list[int]:
        """The configured features, or (when none are) the rule's choice on `datamodule`'s train prompts."""
        datamodule.setup("fit")
        self.ensure_sae()
        if not self.features:
            from debias.features.choice_cache import choose_features

            self.features, how = choose_features(self, datamodule, record=self.feature_selection)  # cached per model
            say(f"selected features {self.features} ({how})")
        return self.features

    def attach_edit(self, edit) -> None:
        """Hold `edit` (debias.edits) on the network; training and evaluation go through it.

        The fast path caches the input of layer L, the lowest edited one: methods edit `W_out` of layers >= L only,
        and an edit of given weights (`Edit.given_weights`: another model, `debias eval`) gets it when all the
        weights that differ sit there.
        """
        self.delta = edit
        self.mask = edit.mask
        if self.mask is not None:
            self.k = self.mask.k  # a loaded mask (`mask_path`) brings its own k
        upstream: list[str] = []  # weights below layer L that differ: methods leave them alone, another model may not
        given = edit.given_weights()
        if given is not None:
            upstream = upstream_of(self.net, self.parameters_edited[0], given)
            more = f" and {len(upstream) - 1} more" if len(upstream) > 1 else ""
            if upstream:
                say(f"evaluation on the full path ({upstream[0]}{more} differs; the fast path needs every "
                    f"difference in layers >= {self.layers_edited[0]})")
            elif not self.train_args.cache_activations:
                say("evaluation on the full path (model.train.cache_activations is false)")
            else:
                say(f"evaluation on the fast path (only weights of layers >= {self.layers_edited[0]} differ)")
        if self.train_args.cache_activations and not upstream:
            # The cached input is that of the lowest layer the forward must run: an edited one, or the SAE's hook.
            anchor = self.parameter if self.site.layer < self.layers_edited[0] else self.parameters_edited[0]
            self.fastpath = FastPath.for_training(self.net, anchor, self.train_args, self.shared_upstream)

    @torch.no_grad()
    def mean_feature_acts(self, batches: list[dict]) -> torch.Tensor:
        """[n_features] mean activation over real tokens, original model."""
        total, count = torch.zeros(len(self.features), device=self.device), 0
        with self.delta.disabled():
            for batch in batches:
                real = self.real(batch)
                total += (self.latents(batch) * real.unsqueeze(-1)).sum(dim=(0, 1))
                count += int(real.sum())
        return total / max(count, 1)

    def latents(self, batch: dict, acts: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, seq, n_features] SAE activations of the chosen features."""
        from debias.sae.ops import encode_features

        if acts is None:
            acts = hooks.forward_until(self.net, self.site, **batch)
        return encode_features(self.sae, acts, self.features)

    def train(self, mode: bool = True):
        """The frozen network stays in eval mode (no dropout): the original model is deterministic."""
        super().train(mode)
        self.net.eval()
        if self.sae is not None:
            self.sae.eval()
        return self

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(**batch).logits

    def fast_path(self) -> contextlib.AbstractContextManager:
        """Context in which the network's forwards take the fast path (cached layer-L inputs and original outputs,
        `debias.training.cache`) where the module has one and `use_fast_path` is on; otherwise a no-op."""
        if self.fastpath is None or not self.use_fast_path:
            return contextlib.nullcontext()
        return self.fastpath.active()

    def loss_terms(self, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """Unweighted value of every active term on one training batch, on the fast path where there is one."""
        with self.fast_path():
            return loss_terms(self, texts)

    def loss(self, texts: dict[str, list[str]], terms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The training loss on one batch (texts by set, as `train_dataloader` yields them): Σ weight × term over
        the active terms of `model.objective`. `terms`: this batch's `loss_terms`, when already computed."""
        terms = self.loss_terms(texts) if terms is None else terms
        weights = self.objective.active()
        return cast(torch.Tensor, sum(weights[name] * value for name, value in terms.items()))

    def training_step(self, batch: dict, batch_idx: int):
        terms = self.loss_terms(batch)
        loss = self.loss(batch, terms)
        if not torch.isfinite(loss):
            # Skip the update, so the weights (and the last checkpoint) stay the last good ones, and stop.
            say(f"loss is {loss.item()} at step {self.global_step}: stopping; the edit keeps its last finite value")
            self.trainer.should_stop = True
            return None
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, batch_size=len(batch["bias"]))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["bias"]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:  # after the step: `null_space_energy`
        if self.null_space is not None:
            project_delta(self.null_space, self.delta)

    def on_train_batch_start(self, batch, batch_idx: int):
        """A computed or inference-time edit (`feature_projection`, `sae_clamp`: no parameters) trains nothing; fit
        still evaluates and exports it."""
        if not self.delta.parameters():
            self.trainer.should_stop = True
            return -1

    def configure_optimizers(self):
        if params := self.delta.parameters():
            return optimizer.configure(params, self.train_args, self._trainer)  # None outside a Trainer
        how = ("an inference-time intervention (a forward hook)" if registry.get(self.edit_args.method).kind ==
               "inference" else "computed")
        say(f"method {self.edit_args.method!r} is {how}, not trained: fit evaluates and exports it as built")
        return None

    @torch.no_grad()
    def evaluate_batch(self, texts: list[str], kind: str) -> dict[str, torch.Tensor]:
        """Per-token held-out quantities of the current model: `kind` is "bias" or "neutral"."""
        batch = self.tokenize(texts)
        if kind == "bias":
            return {"latents": self.latents(batch), "real": self.real(batch)}
        logits = self(batch)
        with self.delta.disabled():
            ref = self(batch)
        targets = batch["input_ids"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                reduction="none")
        next_real = batch["attention_mask"][:, 1:].bool()
        return {"nll": nll.view_as(targets), "nll_mask": next_real,
                "kl": token_kl(ref, logits), "kl_mask": batch["attention_mask"].bool()}

    def validation_step(self, batch: list[str], batch_idx: int, dataloader_idx: int = 0):
        sets = check_data(getattr(self.trainer, "datamodule", None)).val_sets()  # set by Trainer.fit(datamodule=...)
        return self.evaluate_batch(batch, sets[dataloader_idx])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {"feature_baseline": self.feature_baseline.detach().clone()}
        checkpoint[KEY] = edit_record(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_edit_state(checkpoint, source="the checkpoint")
        # The frozen network is the base model's, loaded by __init__, not the checkpoint's: its own weights stand in
        # for it, so Lightning's load_state_dict finds every key and warns of none missing.
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint.get("state_dict", {})}

    def load_edit_state(self, checkpoint: dict, source: str) -> None:
        """Restore a checkpoint's edit (rebuilt from its record when `prepare` has not run); refuses one without a
        trained state, or one of another method or matrix."""
        restore_edit(self, checkpoint, source)

    def changed_entries(self) -> int:
        """Weights the edit changed (the non-zero delta values of a masked edit)."""
        return self.delta.changed_entries()
