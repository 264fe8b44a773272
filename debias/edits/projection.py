"""`feature_projection`: remove the chosen SAE features' decoder directions from what layer L's W_out writes, in
DAMA's spirit (Limisiewicz et al. 2024); computed, nothing trained.

    W_out ← (I − α·P) W_out,   P = Q Qᵀ,   Q [d_model, r]: an orthonormal basis of span(sae.W_dec[features])

W_out is [d_model, d_mlp] (HF Linear's [out, in]; GPT-2's Conv1D stores its transpose). A bias b of W_out (GPT-2's
`c_proj`) gets the same, b ← (I − α·P) b, so at α = 1 nothing the MLP writes has a component along the decoder
directions; α = 0 is the identity, α = 2 reflects. The update has rank r (|F| unless decoder rows are dependent),
so it is held as a frozen peft LoRA adapter on W_out's module: lora_A = Qᵀ W_out [r, d_mlp], lora_B = −α·Q
[d_model, r], scaling 1 (lora_alpha = r), lora_B's bias −α·P b. Merged it is a plain checkpoint; saved, a PEFT adapter.

Which hook space maps onto W_out's output (`check_site`): the decoder rows are directions of the hooked tensor, so P
acts on what W_out writes only where that tensor *is* W_out's output: the output (`HookSite.position`) of W_out's own
module, or of the MLP block that holds it and ends with it (llama / SmolLM2 / Qwen2 / Mistral / GPT-2
`blocks.L.hook_mlp_out`, Gemma-2 `blocks.L.mlp.hook_out`), checked on one forward. Refused: Gemma-2's
`blocks.L.hook_mlp_out` (the output of `post_feedforward_layernorm`: a per-token RMS normalisation with a learned
per-channel scale, so its directions are not W_out's), the residual stream (`hook_resid_*`: every earlier layer
summed), W_out's input (`mlp.hook_post`), and SAEs that centre or whiten their input (`normalize_activations`
layer_norm / covariance_whitening; a constant or per-token rescale keeps directions and is accepted).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from debias.edits import options
from debias.edits.base import ADAPTER, EditContext, WeightEdit, at_strength
from debias.models import hooks
from debias.models.hooks import HookSite

#: SAE input normalisations that map the hook's directions onto other directions (sae_lens `normalize_activations`).
MOVES_DIRECTIONS = ("layer_norm", "covariance_whitening")


def _alpha(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"projection alpha must be a finite number (1: remove the directions, 0: identity), "
                         f"got {value!r}")
    return float(value)


def _why(net: nn.Module, site: HookSite, w_module: str) -> str:
    """Why the tensor at `site` is not W_out's output, in words."""
    module = type(net.get_submodule(site.module_name)).__name__
    where = f"{site.hook_name} is the {site.position} of {site.module_name} ({module})"
    if site.module_name == w_module:
        return f"{where}: W_out's input (the MLP's hidden activations), not its output"
    if "norm" in module.lower():
        return f"{where}, a per-token normalisation with a learned scale of what W_out writes, not W_out's output space"
    if w_module.startswith(site.module_name + "."):
        return f"{where}: the residual stream, which adds the attention and every earlier layer to what W_out writes"
    return f"{where}, not W_out's output"


def check_site(net: nn.Module, site: HookSite, parameter: str) -> None:
    """Raise a one-line ValueError unless the tensor at `site` is the output of W_out's module (`parameter` without
    `.weight`) or of the MLP block that holds it and ends with it; the second is checked on a three-token forward."""
    w_module = parameter.removesuffix(".weight")
    mlp = w_module.rpartition(".")[0]
    expected = (f"feature_projection needs an SAE on the output of {w_module} or of {mlp} (blocks.{site.layer}"
                ".mlp.hook_out; hook_mlp_out where it is the MLP's output, as on llama / SmolLM2)")
    if site.position != "output" or site.module_name not in (w_module, mlp):
        raise ValueError(f"{expected}; {_why(net, site, w_module)}")
    if site.module_name == w_module:
        return
    written = HookSite(site.hook_name, site.layer, w_module, "output")
    device = next(net.parameters()).device
    training = net.training
    net.eval()
    try:
        with torch.no_grad(), hooks.capture(net, written) as w_out:
            acts = hooks.forward_until(net, site, input_ids=torch.tensor([[1, 2, 3]], device=device))
    finally:
        net.train(training)
    if w_out.value is None or not torch.equal(acts, w_out.value):
        raise ValueError(f"{expected}; {site.hook_name} ({site.module_name} output) differs from {w_module}'s output "
                         "on a test forward: the MLP does more after W_out")


def check_network(net: nn.Module, site: HookSite, parameter: str, method_options: Any) -> None:
    """`feature_projection` refuses an SAE site that is not W_out's output (`check_site`)."""
    check_site(net, site, parameter)


def check_sae(sae) -> None:
    """Raise a one-line ValueError if the SAE's input normalisation moves directions (centring, whitening)."""
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm in MOVES_DIRECTIONS:
        raise ValueError(f"feature_projection needs an SAE whose decoder directions are directions of the hook; this "
                         f"one has normalize_activations={norm!r} (expected none, expected_average_only_in or "
                         "constant_norm_rescale)")


def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """Q [d_model, r] float64 with orthonormal columns spanning the rows of `directions` [n, d_model]; r is their
    numerical rank (singular values above 1e-6 of the largest)."""
    u, s, _ = torch.linalg.svd(directions.detach().double().T, full_matrices=False)
    if s.numel() == 0 or not torch.isfinite(s).all() or s[0] <= 0:
        raise ValueError(f"the decoder rows to project out are zero or not finite (singular values {s.tolist()[:4]})")
    return u[:, s > s[0] * 1e-6].contiguous()


class FeatureProjection(WeightEdit):
    """W_out ← (I − α·P) W_out as a frozen peft LoRA adapter on `parameter`'s module (see the module docstring).

    `directions` [n, d_model]: the features' decoder rows. `set_strength(alpha)` moves along α without rebuilding.
    """

    def __init__(self, model: nn.Module, parameter: str, directions: torch.Tensor, alpha: float = 1.0,
                 features: list[int] | None = None):
        from peft import LoraConfig, get_peft_model

        self.parameter, self.module_name = parameter, parameter.removesuffix(".weight")
        self.features = [int(f) for f in features or []]
        base = model.get_submodule(self.module_name)
        self.fan_in_fan_out = hooks.weight_layout(base) == "in_out"
        self.basis = orthonormal_basis(directions)
        d_model = self._w_out(model.get_parameter(parameter)).shape[0]
        if self.basis.shape[0] != d_model:
            raise ValueError(f"decoder directions have dimension {self.basis.shape[0]}, but {parameter} writes "
                             f"{d_model}")
        self.has_bias = getattr(base, "bias", None) is not None
        for p in model.parameters():
            p.requires_grad_(False)
        rank = self.basis.shape[1]
        config = LoraConfig(target_modules=[self.module_name], r=rank, lora_alpha=rank, lora_dropout=0.0,
                            lora_bias=self.has_bias, fan_in_fan_out=self.fan_in_fan_out)
        self.peft_model = get_peft_model(model, config)
        self.layer: Any = self.peft_model.get_base_model().get_submodule(self.module_name)  # peft's LoRA Linear
        for p in self.layer.parameters():
            p.requires_grad_(False)
        self.alpha = 0.0
        self._write_factors(_alpha(alpha))

    def _w_out(self, weight: torch.Tensor) -> torch.Tensor:
        """W_out [d_model, d_mlp] float64, whatever the module's storage layout."""
        weight = weight.detach().double()
        return weight.T if self.fan_in_fan_out else weight

    def _write_factors(self, alpha: float) -> None:
        q, base = self.basis, self.layer.base_layer
        lora_a, lora_b = self.layer.lora_A[ADAPTER], self.layer.lora_B[ADAPTER]
        with torch.no_grad():
            lora_a.weight.copy_((q.T @ self._w_out(base.weight)).to(lora_a.weight))
            lora_b.weight.copy_((-alpha * q).to(lora_b.weight))
            if self.has_bias:
                lora_b.bias.copy_((-alpha * q @ (q.T @ base.bias.detach().double())).to(lora_b.bias))
        self.alpha = alpha

    def set_strength(self, alpha: float) -> None:
        """Evaluate at strength `alpha` from now on (1: the directions removed, 0: the original W_out)."""
        if self.merged:
            raise RuntimeError("the projection is merged into W_out; unmerge() before set_strength()")
        self._write_factors(_alpha(alpha))

    def disabled(self) -> contextlib.AbstractContextManager:
        return self.peft_model.disable_adapter()

    def parameters(self) -> list[nn.Parameter]:
        """Nothing: the edit is computed, not trained."""
        return []

    def changed_parameters(self) -> int:
        """The adapter's numbers (rank × (d_model + d_mlp), plus d_model for a bias); 0 at α = 0."""
        return 0 if self.alpha == 0 else sum(p.numel() for p in self.layer.lora_A.parameters()) + sum(
            p.numel() for p in self.layer.lora_B.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What rebuilds the edit: α, the basis Q and the features it spans."""
        return {"alpha": torch.tensor(self.alpha, dtype=torch.float64), "basis": self.basis.clone(),
                "features": torch.tensor(self.features, dtype=torch.long)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"alpha", "basis", "features"}:
            raise ValueError(f"the checkpoint holds no feature_projection state for {self.parameter} "
                             f"(keys {sorted(state)[:4]}, expected ['alpha', 'basis', 'features'])")
        features = [int(f) for f in state["features"].tolist()]
        if features != self.features or tuple(state["basis"].shape) != tuple(self.basis.shape):
            raise ValueError(f"the checkpoint projects out features {features}; this run's are {self.features}")
        self.basis = state["basis"].double().to(self.basis.device).contiguous()
        self.set_strength(float(state["alpha"]))

    def base_layers(self) -> dict[str, nn.Module]:
        """{edited parameter: the plain layer that holds it}."""
        return {self.parameter: self.layer.base_layer}

    def _merge_layers(self) -> None:
        self.layer.merge(safe_merge=True, adapter_names=[ADAPTER])

    def _unmerge_layers(self) -> None:
        if self.layer.merged:
            self.layer.unmerge()

    def scaled(self, alpha: float) -> contextlib.AbstractContextManager:
        """W_out ← (I − α·s·P) W_out inside the block, s the strength as built."""
        return at_strength(lambda: self.alpha, self.set_strength, alpha)


@dataclass
class ProjectionOptions:
    """`model.edit.options: {feature_projection: {...}}`."""

    alpha: float = 1.0
    """Strength α of W_out ← (I − α·P) W_out: 1 removes the decoder directions, 0 is the identity."""

    def __post_init__(self):
        options.refuse(options.finite("alpha", self.alpha))


def build(ctx: EditContext) -> FeatureProjection:
    """`feature_projection`: the run's features' decoder directions projected out of W_out at `options.alpha`
    (`ProjectionOptions`)."""
    check_site(ctx.net, ctx.site, ctx.parameter)
    check_sae(ctx.sae)
    directions = ctx.sae.W_dec.detach()[list(ctx.features)]
    return FeatureProjection(ctx.net, ctx.parameter, directions, ctx.options.alpha, ctx.features)
