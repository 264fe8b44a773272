"""An inference-time method's hook built outside a run (`debias generate`, scripts), through the registry: the
same builder that `fit` uses, given only a model, a tokenizer and the method's options."""

from __future__ import annotations

from debias.edits import registry
from debias.edits.base import EditContext
from debias.edits.interventions import Intervention
from debias.models import hooks
from debias.models.hooks import HookSite


def build_intervention(method: str, model, tokenizer, sae=None, site: HookSite | None = None,
                       features: list[int] | None = None, options: dict | None = None, bias: str = "gender",
                       gap_texts: list[list[str]] | None = None) -> Intervention:
    """Inference-time method `method`'s hook on `model`, outside a run (`debias generate`, scripts), not yet applied
    (`with intervention.applied(model):`). `options`: its `model.edit.options` entry (`ClampOptions`,
    `SteeringOptions`); `site` defaults to the SAE's hook site; `gap_texts`: the texts a steering vector is fitted on,
    one list per group (default: the bias's train gap prompts)."""
    found = registry.get(method)
    if found.intervention is None:
        raise ValueError(f"method {method!r} is not an inference-time intervention; expected one of "
                         f"{list(registry.names('inference'))}")
    if found.needs_sae and sae is None:
        raise ValueError(f"{method} needs an SAE")
    if site is None:
        if sae is None:
            raise ValueError(f"{method} needs a hook site: pass `site` or an SAE")
        from debias.sae.load import sae_hook_name  # sae_lens loads only when an SAE is given

        site = hooks.resolve_hook(model, sae_hook_name(sae), tokenizer)
    parsed, problems = registry.parse_options(method, {method: options} if options else None)
    if problems:
        raise ValueError("; ".join(problems))
    ctx = EditContext(net=model, tokenizer=tokenizer, sae=sae, site=site, parameter="", features=list(features or []),
                      k=None, args=None, options=parsed, texts={}, mask_batches=[], bias=bias, gap_texts=gap_texts)
    return found.intervention(ctx)
