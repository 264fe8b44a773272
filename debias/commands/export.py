"""`debias export CONFIG CKPT OUT`: export a trained checkpoint of a config.

The mask, delta, merged weights, adapter and report all come from the checkpoint: its mask is used as it is, and a
checkpoint trained with other model arguments than the config's and `overrides` (any key, as `fit --ckpt_path`
checks: another base model, features, method or matrix), or without a trained edit, is refused before anything is
written.
"""

from __future__ import annotations

from pathlib import Path

from debias.commands.fit import build_cli, refuse_other_hparams
from debias.evaluation.base_cache import evaluate_original
from debias.evaluation.evaluate import evaluate_model
from debias.evaluation.heldout import format_table
from debias.io import load_weights_only


def load_checkpoint(path: str) -> dict:
    """A `debias fit` checkpoint, loaded without running any code it may carry (`weights_only=True`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("debias_edit"), dict):
        raise ValueError(f"{path} holds no trained debias edit: not a checkpoint written by `debias fit`")
    return checkpoint


def export(fit_config: str, ckpt_path: str, out: str, overwrite: bool = False,
           overrides: list[str] | None = None) -> None:
    """Export a trained checkpoint of a config (merged model, adapter, delta, mask, report).

    Args:
        fit_config: the `debias fit` YAML config the checkpoint was trained with.
        ckpt_path: a Lightning checkpoint written by `debias fit`.
        out: the export directory (must be empty unless `overwrite`).
        overwrite: replace a non-empty export directory.
        overrides: extra `fit`-style arguments.
    """
    from debias.edits.mask import InstabilityMask
    from debias.export import check_target
    from debias.export import export as write_export

    check_target(Path(out), overwrite)
    checkpoint = load_checkpoint(ckpt_path)
    cli = build_cli(["--config", fit_config, *(overrides or [])], run=False)
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, dict) or not saved:
        raise ValueError(f"{ckpt_path} records no model arguments (hyper_parameters), so nothing shows it was trained "
                         f"for {fit_config}; export a checkpoint written by `debias fit`")
    refuse_other_hparams(saved, cli.config.model.clone().as_dict(), f"checkpoint {ckpt_path}",
                         "export it with the config and overrides it was trained with")
    module, datamodule = cli.model, cli.datamodule
    record = checkpoint["debias_edit"]
    if record.get("mask"):
        module.preset_mask = InstabilityMask.from_record(record["mask"])
    module.prepare(datamodule)
    module.load_edit_state(checkpoint, source=ckpt_path)
    module.load_state_dict(checkpoint.get("state_dict", {}), strict=False)
    before = evaluate_original(module, datamodule, progress="before")[0]
    after = evaluate_model(module, datamodule, edited=True, progress="after")
    print(format_table(before, after))
    run = {"before": before, "after": after, "checkpoint": ckpt_path, "steps": checkpoint.get("global_step")}
    print(f"exported to {write_export(module, out, run, overwrite)}")
