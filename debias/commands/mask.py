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
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    module.mask.save(out)
    for key, value in module.mask.stats().items():
        print(f"{key:>14}: {value}")
    print(f"saved to {out}")
