"""`debias export CONFIG CKPT OUT`: export a trained checkpoint of a config.

The module is `DebiasModule.load_from_checkpoint(CKPT, weights_only=True)`: the mask, delta, merged weights, adapter
and report all come from the checkpoint's edit record, its mask used as it is. The config (with `overrides`) gives the
data the report evaluates on, and must name the model arguments the checkpoint was trained with: one trained with
others (any key, as `fit --ckpt_path` checks: another base model, features, method or matrix), or without a trained
edit, is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from debias.commands.fit import build_cli, refuse_other_hparams
from debias.evaluation.base_cache import evaluate_original
from debias.evaluation.evaluate import evaluate_model
from debias.evaluation.heldout import format_table
from debias.io import load_weights_only
from debias.training.module import DebiasModule
from debias.training.protocol import DebiasData


def load_checkpoint(path: str) -> dict:
    """A `debias fit` checkpoint, loaded without running any code it may carry (`weights_only=True`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("debias_edit"), dict):
        raise ValueError(f"{path} holds no trained debias edit: not a checkpoint written by `debias fit`")
    return checkpoint


def checked_data(checkpoint: dict, ckpt_path: str, fit_config: str, overrides: list[str] | None) -> DebiasData:
    """The DataModule of `fit_config` with `overrides`, once the checkpoint is shown to be trained with the model
    arguments they name (refused otherwise, naming every key that differs)."""
    cli = build_cli(["--config", fit_config, *(overrides or [])], run=False)
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, dict) or not saved:
        raise ValueError(f"{ckpt_path} records no model arguments (hyper_parameters), so nothing shows it was trained "
                         f"for {fit_config}; export a checkpoint written by `debias fit`")
    refuse_other_hparams(saved, cli.config.model.clone().as_dict(), f"checkpoint {ckpt_path}",
                         "export it with the config and overrides it was trained with")
    return cli.datamodule  # the CLI's own module goes with `cli`: the checkpoint builds the one exported


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
    from debias.export import check_target
    from debias.export import export as write_export

    check_target(Path(out), overwrite)
    checkpoint = load_checkpoint(ckpt_path)
    datamodule = checked_data(checkpoint, ckpt_path, fit_config, overrides)
    # The checkpoint, already read safely above, builds the module and its trained edit (map_location: on the CPU, as
    # the config's module was).
    module = DebiasModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    module.ensure_sae()  # the held-out feature metrics read the SAE; built (and cached) if it is not yet
    datamodule.setup("fit")
    before = evaluate_original(module, datamodule, progress="before")[0]
    after = evaluate_model(module, datamodule, edited=True, progress="after")
    print(format_table(before, after))
    from debias.bias_spec import load_bias_spec

    run = {"before": before, "after": after, "checkpoint": ckpt_path, "steps": checkpoint.get("global_step"),
           "bias": load_bias_spec(datamodule.bias).name}  # the axis: the model card's tag, as `fit` records it
    print(f"exported to {write_export(module, out, run, overwrite)}")
