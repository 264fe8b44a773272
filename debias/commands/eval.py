"""`debias eval MODEL`: evaluate any model against its base through the one evaluation path.

The base is `--base_model`, else the one a `debias` export's `debias/report.json` names, else the config's; the
console names it and where it came from. A base taken from a report is checked against the export: where the report
records the base's file hashes (`base_model_files`), the directory must still hold those files; and the export may
differ from that base only in the weights the report says were edited (`parameters`). Either mismatch, a report that
is not a JSON object, or one that cannot be read is refused in one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from debias.evaluation.base_cache import evaluate_original
from debias.evaluation.evaluate import completions, evaluate_model
from debias.io import read_regular


def read_report(model: str) -> tuple[dict, Path | None]:
    """(the export's `debias/report.json`, its path), or ({}, None) when `model` is no `debias` export."""
    path = Path(model) / "debias" / "report.json"
    if not path.exists():
        return {}, None
    try:
        report = json.loads(read_regular(path))
    except OSError as err:
        raise ValueError(f"cannot read the export report {path} ({err.strerror or err})") from None
    except ValueError as err:  # not JSON, or not UTF-8
        raise ValueError(f"the export report {path} is not valid JSON ({err})") from None
    if not isinstance(report, dict):
        raise ValueError(f"the export report {path} holds a JSON {type(report).__name__}, not an object: not a report "
                         "written by debias")
    return report, path


def check_base_files(report: dict, report_path: Path, base: str) -> None:
    """Refuse a base directory whose files are not those `report_path` recorded (`base_model_files`), if any."""
    recorded = report.get("base_model_files")
    if not isinstance(recorded, dict) or not recorded:
        return
    from debias.json_store import dir_hashes, model_files
    from debias.models.load import resolve_model_path

    files = model_files(resolve_model_path(base))
    now = dir_hashes(files) if files is not None else {}
    differ = sorted(name for name in {*recorded, *now} if recorded.get(name) != now.get(name))
    if differ:
        raise ValueError(f"{report_path} records base model {base!r} with other files than {files} now holds "
                         f"({', '.join(differ[:3])} differ); pass --base_model with the model it was exported from")


def check_untouched(module, report: dict, report_path: Path, model: str) -> None:
    """Refuse an export that differs from its recorded base in weights the report's edit never touched: the base
    directory holds another model."""
    edited = report.get("parameters")
    if not (isinstance(edited, list) and edited and all(isinstance(p, str) for p in edited)):
        return
    others = [name for name in module.delta.base_layers() if name not in edited]  # every weight that differs
    if others:
        raise ValueError(f"{model} differs from base model {module.model_id!r} (named in {report_path}) in "
                         f"{len(others)} weights its edit never touched (e.g. {others[0]}), so that directory holds "
                         "another model than the one it was exported from; pass --base_model with that model")


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

    if out and Path(out).is_dir():  # refused before the evaluation, not after it
        raise ValueError(f"--out {out} is a directory; expected the path of a JSON file to write")
    report, report_path = read_report(model)
    if report.get("steer_file") is not None:
        raise ValueError(f"{model} is the export of an inference-time edit ({report.get('method')}): it holds no "
                         "weights, only the hook (steer.pt); evaluate it with `lm_eval --model steered` (its "
                         "README.md) or `debias compare`")
    where = "--base_model" if base_model else f"named in {report_path}" if report.get("base_model_spec") else None
    from_report = report_path if not base_model and report.get("base_model_spec") else None  # checked against it
    base_model = base_model or report.get("base_model_spec")
    if from_report is not None:
        check_base_files(report, from_report, str(base_model))
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
    if from_report is not None:
        check_untouched(module, report, from_report, model)
    print(f"debias: eval: {model} against base model {module.model_id!r} ({module.model_path}; "
          f"{where or f'the config {fit_config}'})", flush=True)
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
