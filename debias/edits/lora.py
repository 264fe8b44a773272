"""`lora`: a peft LoRA adapter on the W_out of the SAE's layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from debias.edits import options
from debias.edits.base import ADAPTER, WeightEdit


@dataclass
class LoraOptions:
    """`model.edit.options: {lora: {...}}`."""

    rank: int = 8
    """Rank of the adapter on W_out: at most the matrix's smaller side (checked once the model is loaded)."""

    def __post_init__(self):
        whole = isinstance(self.rank, int) and not isinstance(self.rank, bool)
        options.refuse(f"rank must be an integer >= 1, got {self.rank!r}" if not whole or self.rank < 1 else None)


def check_lora_rank(rank: int, shape: tuple[int, ...]) -> None:
    if not 1 <= rank <= min(shape):
        raise ValueError(f"LoRA rank must be in [1, {min(shape)}] (the smaller side of the {tuple(shape)} matrix), "
                         f"got {rank}")


def check_network(net: nn.Module, site, parameter: str, options: LoraOptions) -> None:
    """`lora` refuses a rank (`options.rank`) that does not fit the W_out `parameter`."""
    check_lora_rank(options.rank, tuple(net.get_parameter(parameter).shape))


class LoraDelta(WeightEdit):
    """A peft LoRA adapter (B·A, B initialised to zero) on the module that holds `parameter`."""

    def __init__(self, model: nn.Module, parameter: str, rank: int, alpha: float | None = None,
                 features: tuple[int, ...] = ()):
        from peft import LoraConfig, get_peft_model

        self.module_name = parameter.removesuffix(".weight")
        self.parameter = parameter
        check_lora_rank(rank, tuple(model.get_parameter(parameter).shape))
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(target_modules=[self.module_name], r=rank, lora_alpha=int(alpha or rank), lora_dropout=0.0)
        self.peft_model = get_peft_model(model, config)
        self.layer: Any = self.peft_model.get_base_model().get_submodule(self.module_name)  # peft's LoRA Linear
        self.rank, self.features = rank, tuple(features)  # the SAE features it is trained against, for its record

    def disabled(self):
        return self.peft_model.disable_adapter()

    def parameters(self) -> list[nn.Parameter]:
        return [self.layer.lora_A[ADAPTER].weight, self.layer.lora_B[ADAPTER].weight]

    def changed_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapter's own weights, as peft saves them."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft_model).items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.trainable_state())
        if set(state) != expected:
            raise ValueError(f"the checkpoint holds no LoRA state for {self.parameter} "
                             f"(keys {sorted(state)[:4]}, expected {sorted(expected)[:4]})")
        set_peft_model_state_dict(self.peft_model, state)

    @property
    def base_layer(self) -> nn.Module:
        return self.layer.base_layer

    def base_layers(self) -> dict[str, nn.Module]:
        """{edited parameter: the plain layer that holds it}."""
        return {self.parameter: self.layer.base_layer}

    def _merge_layers(self) -> None:
        self.layer.merge(safe_merge=True, adapter_names=[ADAPTER])

    def _unmerge_layers(self) -> None:
        if self.layer.merged:
            self.layer.unmerge()

    @contextlib.contextmanager
    def scaled(self, alpha: float) -> Iterator[None]:
        """peft's `set_scale(adapter, α)` (scaling = α · lora_alpha / r), so the update is α·B·A; the scale is put back
        after."""
        if self.merged:
            raise RuntimeError("the LoRA adapter is merged into W_out; unmerge() before scaling it")
        saved = dict(self.layer.scaling)
        try:
            self.layer.set_scale(ADAPTER, alpha)
            yield
        finally:
            self.layer.scaling.update(saved)


def build(ctx) -> LoraDelta:
    """`lora`: a LoRA adapter of rank `options.rank` (`LoraOptions`) on the run's W_out."""
    return LoraDelta(ctx.net, ctx.parameter, ctx.options.rank, features=tuple(ctx.features))
