"""`debias mask CONFIG`: compute the instability mask of a config and save it."""

from __future__ import annotations

from pathlib import Path

from debias.commands.fit import configured


def mask(fit_config: str, out: str = "runs/mask.safetensors", overrides: list[str] | None = None) -> None:
    """Compute the instability mask of a config's model, SAE and feature(s) on its train bias prompts; save it.

    Args:
        fit_config: a `debias fit` YAML config.
        out: where to write the mask (safetensors).
        overrides: extra `fit`-style arguments, e.g. ["--model.k=20"].
    """
    module, datamodule = configured(fit_config, overrides or [])
    module.prepare(datamodule)
    instability_mask = module.mask
    if instability_mask is None:
        raise ValueError(f"{fit_config}: the edit method {module.edit_args.method!r} has no mask to save; "
                         "use a mask method (e.g. --model.edit.method=instability)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    instability_mask.save(out)
    for key, value in instability_mask.stats().items():
        print(f"{key:>14}: {value}")
    print(f"saved to {out}")
