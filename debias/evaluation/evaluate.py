"""One evaluation path for every method and command: the held-out metrics of `debias.callbacks`, the standard
suites (`debias.suites`) and before/after completions, for the edited model or the original one.

`module` is a prepared `DebiasModule`: its `delta` is the method's edit (`debias.edits`), and the original model
is the same network with the edit disabled.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from debias.evaluation.heldout import edit_context, evaluate_heldout


def evaluate_model(module, datamodule, edited: bool = True, suites: bool = False, cue_limit: int | None = 256,
                   progress: str | bool | None = None) -> dict:
    """Held-out metrics of the edited (or original) model; with `suites`, CrowS-Pairs and StereoSet gender too.

    Runs on the module's fast path where it has one: layers below the edit are computed once per text batch.
    `progress` (a label such as "before", or True) shows a bar per phase.
    """
    label = progress if isinstance(progress, str) else ("after" if edited else "before")
    with module.fast_path():
        metrics = evaluate_heldout(module, datamodule, edited=edited, cue_limit=cue_limit,
                                   progress=label if progress else None)
        if suites:
            metrics.update(suite_scores(module, edited, bool(progress), domain=suite_domain(datamodule)))
    return metrics


def suite_domain(datamodule) -> str:
    """The suites' subset for the data's bias: the spec's name ("gender", "religion")."""
    from debias.bias_spec import load_bias_spec

    return load_bias_spec(datamodule.bias).name


def suite_scores(module, edited: bool = True, progress: bool = False, domain: str = "gender") -> dict:
    """CrowS-Pairs and StereoSet (`domain` subset: "gender" or "religion") of the edited (or original) model, each
    with its item count and bootstrap 95% intervals (evaluation only: nothing is trained or chosen on them)."""
    from debias.evaluation import suites

    with torch.no_grad(), edit_context(module, edited):
        return {"crows_pairs": suites.crows_pairs(module.net, module.tokenizer, progress=progress, domain=domain),
                "stereoset": suites.stereoset(module.net, module.tokenizer, progress=progress, domain=domain)}


def completions(module, datamodule, n: int = 4, max_new_tokens: int = 32) -> list[dict]:
    """Greedy completions of `n` held-out prompts by the original and the edited model: [{prompt, before, after}]."""
    from debias.evaluation.generate import report_completions
    from debias.prompts import heldout_completion_prompts

    prompts = heldout_completion_prompts(datamodule.prompt_dir, n, bias=datamodule.bias)
    print(f"debias: completing {len(prompts)} held-out prompts ({max_new_tokens} tokens, before and after)",
          file=sys.stderr, flush=True)
    return report_completions(module.net, module.tokenizer, prompts, lambda: edit_context(module, False),
                              contextlib.nullcontext, max_new_tokens=max_new_tokens)


