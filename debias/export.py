"""Export the edit: a merged HF checkpoint, a model card, a PEFT adapter and the edit as plain files.

Layout of the export directory:
    config.json, model.safetensors, tokenizer files   the merged model (`from_pretrained(dir)`)
    README.md                                         model card (`debias.model_card`)
    adapter/                                          PEFT adapter (masked methods on nn.Linear layers, LoRA)
    debias/mask.safetensors, debias/delta.safetensors  the edit as plain files (masked methods only; several matrices
                                                      with `model.edit.layers`: `JointMask`, `EditRecord`)
    debias/report.json
    steer.pt                                          an inference-time edit (`sae_clamp`, `steering_vector`): the
                                                      harness's steer file; no weights, the base is unchanged
Everything is written into a hidden sibling directory, then renamed into place (`debias.io.atomic_dir`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from debias.config import package_versions
from debias.io import atomic_dir
from debias.model_card import model_card

#: An edit value this many times the matrix's largest weight is a blown-up run, not an edit.
ABSURD = 1000.0
STEER_FILE = "steer.pt"  # an inference-time edit's export: lm-evaluation-harness's `steer_path`
PACKAGES = ("debias", "torch", "transformers", "lightning", "peft", "sae-lens", "transformer-lens", "torchmetrics")


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty directory unless `overwrite`, and one that is not a debias export (no
    `debias/report.json`: a source tree, a model, a user's folder) even with `overwrite`."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"export target {path} exists and is not a directory")
    if not (path.is_dir() and any(path.iterdir())):
        return
    if not (path / "debias" / "report.json").is_file():
        raise FileExistsError(f"export directory {path} is not empty and is not a debias export (it has no "
                              "debias/report.json), so it is never replaced, even with overwrite; choose a new or "
                              "empty directory")
    if not overwrite:
        raise FileExistsError(f"export directory {path} is not empty; set overwrite (`--export.overwrite true` "
                              "for fit, `--overwrite true` for export) to replace it")


def merged_state_dict(module) -> dict[str, torch.Tensor]:
    """The HF model's state dict with the edit merged, under the keys it had before the edit wrapped its layers."""
    edit = module.delta
    edit.merge()
    try:
        wrapped = module.net.state_dict()
        edited = {parameter.removesuffix("weight") + key: value for parameter, base in edit.base_layers().items()
                  for key, value in base.state_dict().items()}
        return {key: (edited[key] if key in edited else wrapped[key]).detach().clone() for key in module.original_keys}
    finally:
        edit.unmerge()


def environment() -> dict:
    """Package versions and the git commit of the working directory (if any)."""
    versions = package_versions(PACKAGES)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": sys.version.split()[0], "versions": versions, "git_commit": commit}


def build_report(module, run: dict) -> dict:
    """`report.json`: what was edited, metrics before/after (from `run`) and how to reproduce it; the base model's
    file hashes (`base_model_files`) let `debias eval` refuse a base directory that changed since."""
    from debias.json_store import dir_hashes, model_files

    hp = dict(module.hparams)
    base_files = model_files(module.model_path)
    return {
        "base_model": module.model_path, "base_model_spec": module.model_id,
        "base_model_files": dir_hashes(base_files) if base_files is not None else None,
        "hook_name": module.site.hook_name,
        "layer": module.site.layer, "parameter": module.parameter, "method": module.edit_args.method,
        "layers": module.layers_edited, "parameters": module.parameters_edited,
        "k_per_parameter": _k_per_parameter(module.mask), "features": module.features, "k": module.k,
        "changed_parameters": module.delta.changed_parameters(),
        "changed_entries": module.changed_entries(),
        "feature_selection": module.feature_selection,
        "identity_selection": module.identity.record if getattr(module, "identity", None) is not None else None,
        "numel": module.numel,
        "mask_strategy": module.mask.strategy if module.mask is not None else None,
        "mask_seed": module.edit_args.mask_seed,
        "config": hp, **run, **environment(),
    }


def _k_per_parameter(mask) -> dict[str, int] | None:
    """{edited parameter: its k} of a masked edit (the matrices of a joint mask, `model.edit.layers`)."""
    if mask is None:
        return None
    return {part.parameter: part.k for part in mask.parts}


def export(module, out_dir: str | Path, run: dict, overwrite: bool = False) -> Path:
    """Write the export directory for a trained `DebiasModule` atomically (`debias.io.atomic_dir`); returns its path.

    Merged weights, adapter, mask, delta and report all come from the module's one edit (of every matrix it edits).
    """
    out = Path(out_dir)
    check_target(out, overwrite)
    check_edit(module)
    hook_only = is_inference(module)
    with atomic_dir(out, replace=True) as tmp:
        if hook_only:  # no weight changed: the base's weights stay where they are, the edit is `steer.pt`
            run = {**run, "steer_file": write_steer(module, tmp)}
        else:
            module.net.save_pretrained(tmp, state_dict=merged_state_dict(module))
            module.delta.save_adapter(tmp / "adapter", module.model_path)
        module.tokenizer.save_pretrained(tmp)
        (tmp / "debias").mkdir()
        if module.delta.saves_delta:
            module.delta.mask.save(tmp / "debias" / "mask.safetensors")
            module.delta.record().save(tmp / "debias" / "delta.safetensors")
        report = build_report(module, run)
        (tmp / "debias" / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (tmp / "README.md").write_text(str(model_card(report)))
    if report["changed_entries"] == 0 and not hook_only:
        print(f"debias: warning: the edit changed nothing (all values are 0 after {report.get('steps')} steps); "
              f"{out} holds the base model", flush=True)
    return out


def is_inference(module) -> bool:
    """Whether the module's edit is an inference-time hook (`sae_clamp`, `steering_vector`): no weight changes."""
    from debias.edits import registry

    return registry.get(module.edit_args.method).kind == "inference"


def write_steer(module, folder: Path) -> dict:
    """`folder/steer.pt`, the harness's steer file of an inference-time edit (`debias.edits.steer_file`); what the
    report records: its name, hookpoint and whether it is exact, or `path: null` and why the format cannot hold it
    (a clamp of several latents)."""
    from debias.edits.steer_file import save_steer_entries, steer_entries

    try:
        entries = steer_entries(module.delta, module.net)
        save_steer_entries(entries, folder / STEER_FILE)
    except ValueError as err:
        print(f"debias: no {STEER_FILE}: {err}", flush=True)
        return {"path": None, "why": str(err)}
    (hookpoint, entry), = entries.items()
    return {"path": STEER_FILE, "hookpoint": hookpoint, "action": entry["action"], "exact": entry["debias"]["exact"]}


def check_edit(module) -> None:
    """Refuse to export an edit with a non-finite or absurd value (a blown-up training run)."""
    for param in module.delta.parameters():
        values = param.detach()
        if not torch.isfinite(values).all():
            raise ValueError(f"the trained edit has {int((~torch.isfinite(values)).sum())} non-finite values; "
                             "nothing was exported (lower model.train.lr)")
    if not module.delta.parameters():
        return  # computed or inference-time: nothing trained to blow up
    scale = max(float(base.weight.detach().abs().max()) for base in module.delta.base_layers().values())
    for param in module.delta.parameters():
        largest = float(param.detach().abs().max()) if param.numel() else 0.0
        if largest > ABSURD * max(scale, 1e-6):
            raise ValueError(f"the trained edit has a value of {largest:.3g}, over {ABSURD:g}× the largest weight of "
                             f"{', '.join(module.parameters_edited)} ({scale:.3g}); nothing was exported (lower "
                             "model.train.lr)")
