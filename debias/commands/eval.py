"""`debias eval MODEL`: evaluate any model against its base through the one evaluation path."""

from __future__ import annotations

import json
from pathlib import Path

from debias.evaluation.base_cache import evaluate_original
from debias.evaluation.evaluate import completions, evaluate_model


def eval_command(model: str, fit_config: str = "configs/smollm2.yaml", base_model: str | None = None,
                 features: list[int] | None = None, suites: bool = True, out: str | None = None,
                 overrides: list[str] | None = None) -> dict:
    """Evaluate any model against its base: held-out feature activation, bias gap (95% CI), explicit-cue margin
    (over-erasure), LM loss, KL to the base, and CrowS-Pairs / StereoSet gender, before and after.

    The base model's numbers come from the evaluation cache when it holds them (`DEBIAS_EVAL_CACHE=0`: always
    recompute). When every weight that differs from the base sits in a decoder layer at or above the SAE's, the
    layers below are computed once per text batch (the fast path); otherwise every forward runs in full.

    Args:
        model: the model to evaluate: a `debias` export, an HF directory or a hub id (same architecture as the base).
        fit_config: a `debias fit` config naming the SAE, the prompts and (unless `base_model`) the base model.
        base_model: the model to compare against (default: a `debias` export's own base, else the config's).
        features: SAE latents to measure (default: a `debias` export's, else the config's, else the config's rule).
        suites: also score CrowS-Pairs and StereoSet (the domain of the config's bias).
        out: write the results here as JSON (atomically).
        overrides: extra `debias fit` arguments, e.g. ["--model.dtype=bfloat16"].
    """
    from debias.commands.fit import build_cli
    from debias.edits.state_diff import StateDiffEdit
    from debias.evaluation.heldout import format_table
    from debias.models.load import load_model

    exported = Path(model) / "debias" / "report.json"
    report = json.loads(exported.read_text()) if exported.is_file() else {}
    base_model = base_model or report.get("base_model_spec")
    features = features or report.get("features")
    args = ["--config", fit_config, *(overrides or []), "--export.export_dir=null"]
    if base_model:
        args.append(f"--model.base_model={base_model}")
    if features:
        args.append(f"--model.sae.features={json.dumps(features)}")
    cli = build_cli(args, run=False)
    module, data = cli.model, cli.datamodule
    module.choose_features(data)
    edited = load_model(model, dtype=module.hparams["dtype"]).model
    try:
        module.attach_edit(StateDiffEdit(module.net, edited.state_dict()))
    except ValueError as err:
        raise ValueError(f"{model} does not fit base model {module.model_id!r} ({err}); pass --base_model") from err
    del edited
    result = {"model": model, "base_model": module.model_id, "features": module.features,
              "changed_parameters": module.delta.changed_parameters(),
              "before": evaluate_original(module, data, suites=suites, progress="before")[0],
              "after": evaluate_model(module, data, edited=True, suites=suites, progress="after"),
              "completions": completions(module, data)}
    print(format_table(result["before"], result["after"]))
    if out:
        from debias.io import atomic_write_json

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
        print(f"written to {out}")
    return result
