"""The fit-time feature choice (`select.select_features`), computed once per model, SAE and selection setting: a
run with `model.sae.features` null reuses the features and the `feature_selection` record from
`cache_dir() / "features"` (a `debias.json_store.JsonStore`: atomic writes, a damaged or foreign entry recomputed
with a warning naming it, `DEBIAS_FEATURE_CACHE=0` turns it off; `DEBIAS_EVAL_CACHE` does not). An entry whose
features repeat a latent, or that its own record contradicts (the record's features, the candidates it kept), is
damaged too.

An entry is keyed by everything the choice depends on:
- the model: its spec, the sha256 of each file of its directory, the dtype, `max_length` and the device type. A
  model without local files (a hub id not in the Hugging Face cache) is not cached;
- the SAE: its spec, config and a hash of its weights;
- the selection: `n_features`, `feature_target`, `prompt_dir`, the bias, the bias spec file's sha256 and the prompt
  directory's files;
- the code: the package and library versions and a hash of the sources that choose (`CODE_FILES`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from debias.json_store import JsonStore, code_version, dir_hashes, file_hashes, model_files, tensor_digest

if TYPE_CHECKING:
    from debias.features.select import SelectTarget

FORMAT = 1
PACKAGE = Path(__file__).resolve().parents[1]
#: Sources whose code chooses the features (relative to the package); a change to any of them is a new key.
CODE_FILES = ("features/*.py", "sae/ops.py", "sae/corpus.py", "prompts.py", "bias_spec.py", "bias_checks.py",
              "statements.py", "models/hooks.py", "models/scoring.py", "models/continuation.py", "models/load.py")
ENV = "DEBIAS_FEATURE_CACHE"  # its own switch: turning the evaluation cache off keeps the chosen features
STORE = JsonStore("features", "feature-choice cache entry", payload="choice",
                  sources="model, SAE, selection setting or code", required=("features", "record"), env=ENV)


def choice_key(module, datamodule, target: str | None = None, n: int | None = None) -> dict | None:
    """Everything `module`'s feature choice on `datamodule` depends on, or None when the model cannot be identified.

    `module` is a `DebiasModule` with its SAE; `datamodule` a `DebiasData` (`debias.training.protocol`); `target` /
    `n`: another selection than the module's `feature_target` / `n_features` (the identity latents)."""
    from debias.bias_spec import load_bias_spec
    from debias.prompts import default_prompt_dir

    files = model_files(module.model_path)
    if files is None:
        return None
    sae = module.sae
    spec = load_bias_spec(datamodule.bias).path
    prompt_dir = Path(datamodule.prompt_dir) if datamodule.prompt_dir else default_prompt_dir()
    device = next(module.net.parameters()).device.type  # where the selection's forwards run
    return {
        "format": FORMAT,
        "model": {"id": module.model_id, "files": dir_hashes(files), "dtype": module.hparams["dtype"],
                  "max_length": module.train_args.max_length, "device": device},
        "sae": {"spec": module.sae_args.spec, "sae_id": module.sae_args.sae_id, "config": sae.cfg.to_dict(),
                "weights": tensor_digest(dict(sae.state_dict()))},
        "selection": {"n_features": n or module.sae_args.n_features,
                      "feature_target": target or module.sae_args.feature_target,
                      "prompt_dir": datamodule.prompt_dir, "bias": str(datamodule.bias),
                      "bias_spec": {spec.name: file_hashes([spec])[str(spec)]},
                      "prompt_files": dir_hashes(prompt_dir)},
        "code": code_version(PACKAGE, CODE_FILES),
    }


def _problem(d_sae: int, n: int, choice: dict) -> str | None:
    """What makes a cached choice unusable: features that are not distinct latent indices of the SAE, more than `n`
    of them, or features its own record contradicts (the record's `features`, or the candidates it kept)."""
    features, record = choice["features"], choice["record"]
    if not (isinstance(features, list) and features and all(type(f) is int and 0 <= f < d_sae for f in features)):
        return f"holds {features!r} for features, not latent indices of an SAE of {d_sae}"
    if len(set(features)) != len(features) or len(features) > n:
        return f"holds {features!r} for features, not at most {n} distinct latents"
    if not (isinstance(record, dict) and isinstance(record.get("rule"), str)):
        return "holds no selection record with its rule"
    candidates = record.get("candidates")
    kept = [c.get("index") for c in candidates if isinstance(c, dict) and c.get("kept") is True] \
        if isinstance(candidates, list) else None
    if record.get("features") != features or (kept is not None and kept != features):
        return (f"holds features {features!r}, but its record names {record.get('features')!r} (kept candidates "
                f"{kept!r})")
    return None


def choose_features(module, datamodule, record: dict, target: SelectTarget | None = None,
                    n: int | None = None) -> tuple[list[int], str]:
    """(the rule's features for `module` on `datamodule`'s train prompts, how they were chosen: the rule, or
    `cached: PATH`); `record` gets the selection's record (`select_features`'s), the same either way. `target` / `n`:
    another selection than `model.sae.feature_target` / `n_features` (`factual`: the identity latents)."""
    from debias.features import select

    target = target or cast("SelectTarget", module.sae_args.feature_target)
    n = n or module.sae_args.n_features

    def compute() -> dict:
        chosen: dict = {}
        features = select.select_features(module.net, module.tokenizer, module.sae, module.site, n=n,
                                          prompt_dir=datamodule.prompt_dir, record=chosen, bias=datamodule.bias,
                                          target=target)
        return {"features": features, "record": chosen}

    choice, path = STORE.get(lambda: choice_key(module, datamodule, target, n), compute,
                             check=lambda choice: _problem(module.sae.cfg.d_sae, n, choice))
    record.update(choice["record"])
    return list(choice["features"]), f"cached: {path}" if path is not None else choice["record"]["rule"]
