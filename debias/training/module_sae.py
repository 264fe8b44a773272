"""The SAE a `DebiasModule` reads: loaded at construction when it exists, built on first need when it is the
project's own (`model.sae.spec: train`, many minutes), and checked against the module's hook and features."""

from __future__ import annotations

from typing import Any


def build_settings(module: Any) -> Any:
    """How `spec: train` builds the module's SAE (`model.sae.build`, or the defaults)."""
    from debias.sae.build import SAETrainSettings

    return module.sae_args.build or SAETrainSettings()


def load_sae(module: Any, build_missing: bool) -> Any:
    """The SAE of `model.sae.spec`; None when it is the project's build, not cached yet, and not `build_missing`."""
    from debias.sae.build import sae_cache_path
    from debias.sae.load import load_sae_spec

    args = module.sae_args
    if args.spec == "train" and not build_missing and not (sae_cache_path(module.model_id, build_settings(module))
                                                           / "metrics.json").is_file():
        return None
    return load_sae_spec(module.net, module.tokenizer, module.model_id, args.spec, args.sae_id, build=args.build)


def check_sae(module: Any) -> None:
    """Freeze the module's SAE and refuse one that reads another hook, does not fit the model, or lacks a feature."""
    from debias.sae.load import check_features, check_sae_fits

    sae = module.sae
    if sae is None:
        return
    sae.requires_grad_(False)
    if sae.cfg.metadata.hook_name != module.site.hook_name:
        raise ValueError(f"the SAE reads {sae.cfg.metadata.hook_name!r}, expected {module.site.hook_name!r}")
    check_sae_fits(sae, module.net, module.site)
    if module.features:
        check_features(sae, module.features)
