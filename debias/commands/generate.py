"""`debias generate`: complete prompts with a model, optionally under an inference-time intervention."""

from __future__ import annotations

import math
from typing import Literal

from debias.config import DEFAULT_MODEL, DType, SteeringKind, choices
from debias.edits import registry
from debias.evaluation.generate import _check_sampling, complete
from debias.prompts import default_prompts


def _check_command(intervention, features, value, alpha, steering, dtype, max_new_tokens, temperature) -> None:
    errors = _check_sampling(max_new_tokens, temperature, 1.0)
    for name, given, literal in (("steering", steering, SteeringKind), ("dtype", dtype, DType)):
        if given not in choices(literal):
            errors.append(f"{name} must be one of {list(choices(literal))}, got {given!r}")
    if intervention not in (None, *registry.names("inference")):
        errors.append(f"intervention must be one of {list(registry.names('inference'))}, got {intervention!r}")
    if intervention in registry.names("inference") and registry.get(intervention).needs_sae and not features:
        errors.append(f"--intervention {intervention} acts on SAE latents: it needs --features (their indices)")
    for name, number in (("value", value), ("alpha", alpha)):
        if name == "alpha" and number is None:  # calibrated on the model (`fit_steering`)
            continue
        if not (isinstance(number, (int, float)) and math.isfinite(number)):
            errors.append(f"{name} must be a finite number, got {number!r}")
    if errors:
        raise ValueError("; ".join(errors))


def _command_intervention(loaded, method, sae, sae_id, hook_name, features, value, alpha, steering):
    from dataclasses import fields

    from debias.edits.hook_builder import build_intervention
    from debias.models import hooks
    from debias.sae.load import load_sae_spec, sae_hook_name

    model, tok = loaded.model, loaded.tokenizer
    given = {"value": value, "alpha": alpha, "kind": steering}  # the flags, each the option of one method
    options_class = registry.get(method).options
    options = {f.name: given[f.name] for f in fields(options_class)} if options_class else None
    if not registry.get(method).needs_sae and sae is None:  # steer at hook_name (or the default SAE's hook)
        from debias.sae.build import DEFAULT_HOOK

        site = hooks.resolve_hook(model, hook_name or DEFAULT_HOOK, tok)
        return build_intervention(method, model, tok, site=site, options=options)
    sae_module = load_sae_spec(model, tok, loaded.model_id, sae, sae_id, hook_name)
    site = hooks.resolve_hook(model, sae_hook_name(sae_module), tok)
    return build_intervention(method, model, tok, sae_module, site, features, options)


def generate_command(model: str = DEFAULT_MODEL, prompt: list[str] | None = None, max_new_tokens: int = 32,
                     sample: bool = False, temperature: float = 1.0, seed: int = 0, chat: bool | None = None,
                     intervention: Literal["sae_clamp", "steering_vector"] | None = None, sae: str | None = None,
                     sae_id: str | None = None,
                     hook_name: str | None = None, features: list[int] | None = None, value: float = 0.0,
                     alpha: float | None = None, steering: SteeringKind = "mean_diff",
                     dtype: DType = "float32") -> list[str]:
    """Complete prompts with a model (optionally under an inference-time intervention); print and return them.

    Args:
        model: model spec (`smollm2-135m`, `tiny-llama`, a directory such as a `debias export` output, a hub id).
        prompt: prompts to complete; default: four held-out profession prompts and two held-out cue prompts.
        max_new_tokens: tokens generated per prompt.
        sample: sample (seeded) instead of greedy decoding.
        temperature: sampling temperature (with `sample`).
        seed: sampling seed.
        chat: apply the tokenizer's chat template (True), use raw text (False), or the template when the tokenizer
            has one (None, default). The bias prompts are raw-text continuations: pass --chat false for those.
        intervention: None (plain model), `sae_clamp` or `steering_vector`.
        sae: SAE for the intervention's hook site: a directory, a sae_lens release (with `sae_id`), `tiny:HOOK`,
            or `train` / None (the project's cached SAE build at `hook_name`, trained first if missing). A
            `steering_vector` without `sae` needs no SAE: it steers at `hook_name` (default: the SAE build's hook).
        sae_id: SAE id within a sae_lens release.
        hook_name: TransformerLens hook name (checked against a given SAE).
        features: SAE latent indices clamped by `sae_clamp` (required for it).
        value: value the clamped latents are set to (0 = ablation).
        alpha: steering strength: acts + alpha * v at every token, v the unit female-minus-male direction fitted on
            the TRAIN profession prompts (female- vs male-stereotyped professions; held-out prompts never used).
            Negative alpha steers towards the male side. None (the default): calibrated on this model and hook,
            -(mean female - mean male) . v over those prompts (minus the mean difference's length for `mean_diff`).
        steering: how v is fitted: `mean_diff` (difference of mean activations) or `probe` (linear SVM).
        dtype: model dtype (float32, bfloat16, float16).
    """
    _check_command(intervention, features, value, alpha, steering, dtype, max_new_tokens, temperature)
    from debias.models.load import load_model

    loaded = load_model(model, dtype=dtype)
    applied = None
    if intervention is not None:
        applied = _command_intervention(loaded, intervention, sae, sae_id, hook_name, features, value, alpha,
                                        steering)
        print(f"intervention: {applied.describe()}")
    prompts = list(prompt) if prompt else default_prompts()
    texts = complete(loaded.model, loaded.tokenizer, prompts, max_new_tokens, sample=sample, temperature=temperature,
                     seed=seed, chat=chat, intervention=applied)
    for p, t in zip(prompts, texts, strict=False):
        print(f"--- {p}\n{t.strip()}\n")
    return texts
