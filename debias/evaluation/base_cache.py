"""The original model's evaluation, computed once: `fit`, `eval`, `export` and `compare` all start from the same
before-numbers, so they are stored under `cache_dir() / "eval"` and reused.

An entry is keyed by everything the numbers depend on:
- the model: its spec, the sha256 of each file of its directory (memoised by path, size and mtime, so each file is
  read once), the dtype and the device type. A model without local files (a hub id not in the Hugging Face cache)
  is not cached;
- the SAE (its config and a hash of its weights) and the features;
- the data: the DataModule's settings, a hash of every text it loaded and of the prompt-directory files the bias
  metrics read (and of the benchmark files, with `suites`);
- the evaluation arguments (`suites`, `cue_limit`);
- the code: the package version, torch / transformers / sae-lens versions and a hash of the sources that compute
  the numbers (`CODE_FILES`).
Only the original model (`edited=False`) is ever cached; the key names the model by its files, so a network changed
in memory after loading must use `evaluate_model` directly. `DEBIAS_EVAL_CACHE=0` turns the cache off. The original
model's validation-split metrics (`callbacks.ValidationMetrics`, `original_validation`) are kept the same way, under
`eval/validation`.

No wrong number is ever used: entries are written atomically (`debias.io.atomic_write`: flushed, then renamed), and
an entry that cannot be read, is not JSON (a torn write, garbage), lacks a field, holds a non-number where a number
belongs or was written for another key is recomputed with a warning naming its path. A cache that cannot be written
(read-only, disk full) warns, naming the path, and only costs the reuse: the run continues with the computed numbers.
The store and the hashes are `debias.json_store`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path

from debias.evaluation.heldout import BASE_ROWS
from debias.json_store import ENV, JsonStore, digest, dir_hashes, enabled, file_hashes, model_files, tensor_digest, warn
from debias.json_store import code_version as sources_version

__all__ = ["CODE_FILES", "ENV", "FORMAT", "REQUIRED", "STORE", "SUITES", "VALIDATION", "cache_key", "code_version",
           "enabled", "entry_path", "evaluate_original", "file_hashes", "model_files", "original_validation",
           "warn"]

FORMAT = 1
PACKAGE = Path(__file__).resolve().parents[1]
#: Sources whose code computes the before-numbers (relative to the package); a change to any of them is a new key.
CODE_FILES = ("evaluation/*.py", "prompts.py", "bias_spec.py", "bias_checks.py", "statements.py", "models/scoring.py",
              "models/continuation.py", "models/hooks.py", "models/load.py", "sae/ops.py", "edits/*.py",
              "training/module.py", "training/objective.py", "training/cache.py", "training/data.py")
#: Fields every entry must hold (with `suites`, also the suite scores).
REQUIRED = (*BASE_ROWS, "bias_gap_ci", "cue_margin_ci", "gap_per_profession")
SUITES = ("crows_pairs", "stereoset")
STORE = JsonStore("eval", "evaluation cache entry", required=REQUIRED)
#: The original model's validation-split behaviour metrics (`callbacks.ValidationMetrics`), beside the held-out ones.
VALIDATION = JsonStore("eval/validation", "validation cache entry", required=("bias_gap", "cue_margin"))


# ----- the key -----
@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The package and library versions, and a hash of the sources in `CODE_FILES`."""
    return sources_version(PACKAGE, CODE_FILES)


def cache_key(module, datamodule, suites: bool, cue_limit: int | None) -> dict | None:
    """Everything the original model's evaluation depends on, or None when the model cannot be identified."""
    from debias.prompts import default_prompt_dir

    files = model_files(module.model_path)
    if files is None:
        return None
    datamodule.setup("fit")
    hp = {k: v for k, v in datamodule.hparams.items() if k != "shuffle_seed"}  # the training order: no held-out number
    hp.update(bias=datamodule.bias, prompt_dir=datamodule.prompt_dir)  # a DebiasData's own, hparams or not
    prompt_dir = Path(hp["prompt_dir"]) if hp["prompt_dir"] else default_prompt_dir()
    data = {"settings": hp, "texts": digest({k: datamodule.texts[k] for k in sorted(datamodule.texts)}),
            "prompt_files": dir_hashes(prompt_dir)}
    if not hp["prompt_dir"]:  # the held-out gap and cue prompts come from the bias spec
        from debias.bias_spec import load_bias_spec

        spec = load_bias_spec(hp["bias"]).path
        data["bias_spec"] = {spec.name: file_hashes([spec])[str(spec)]}
    if suites:
        from debias.evaluation.suites import BENCHMARK_DIR

        data["benchmarks"] = dir_hashes(BENCHMARK_DIR)
    sae = module.sae
    return {
        "format": FORMAT,
        "model": {"id": module.model_id, "files": dir_hashes(files), "dtype": module.hparams["dtype"],
                  "max_length": module.train_args.max_length, "device": module.device.type},
        "sae": {"spec": module.sae_args.spec, "sae_id": module.sae_args.sae_id,
                "config": sae.cfg.to_dict() if sae is not None else None,
                "weights": tensor_digest(dict(sae.state_dict())) if sae is not None else None},
        "features": list(module.features), "data": data,
        "evaluation": {"suites": bool(suites), "cue_limit": cue_limit}, "code": code_version(),
    }


def entry_path(key: dict) -> Path:
    return STORE.entry_path(key)


def _non_numbers(metrics: dict, names: Iterable[str]) -> str | None:
    bad = [name for name in names if isinstance(metrics[name], bool) or not isinstance(metrics[name], (int, float))]
    return f"holds non-numbers for {bad}" if bad else None


def evaluate_original(module, datamodule, suites: bool = False, cue_limit: int | None = 256,
                      progress: str | bool | None = None) -> tuple[dict, bool]:
    """(`evaluate_model(module, datamodule, edited=False, ...)`, whether it came from the cache).

    The numbers are the same either way (a computed result goes through JSON as a cached one does).
    """
    from debias.evaluation.evaluate import evaluate_model

    metrics, path = STORE.get(
        lambda: cache_key(module, datamodule, suites, cue_limit),
        lambda: evaluate_model(module, datamodule, edited=False, suites=suites, cue_limit=cue_limit,
                               progress=progress),
        required=SUITES if suites else (), check=lambda metrics: _non_numbers(metrics, BASE_ROWS))
    return metrics, path is not None


def original_validation(module, datamodule, cue_limit: int | None, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """(`compute()`: the original model's validation-split behaviour metrics, `n_boot=1`, all numbers; whether they
    came from the cache). Keyed as `evaluate_original` is, with the evaluation `validation`, `cue_limit`, `n_boot`;
    the numbers are the same either way."""

    def key() -> dict | None:
        identity = cache_key(module, datamodule, False, cue_limit)
        if identity is not None:
            identity["evaluation"] = {"split": "validation", "cue_limit": cue_limit, "n_boot": 1}
        return identity

    metrics, path = VALIDATION.get(key, compute, check=lambda metrics: _non_numbers(metrics, metrics))
    return metrics, path is not None
