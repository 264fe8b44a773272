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
in memory after loading must use `evaluate_model` directly. `DEBIAS_EVAL_CACHE=0` turns the cache off.

No wrong number is ever used: entries are written atomically (`debias.io.atomic_write`: flushed, then renamed), and
an entry that cannot be read, is not JSON (a torn write, garbage), lacks a field, holds a non-number where a number
belongs or was written for another key is recomputed with a warning naming its path. A cache that cannot be written
(read-only, disk full) warns, naming the path, and only costs the reuse: the run continues with the computed numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from debias.config import package_versions
from debias.evaluation.heldout import BASE_ROWS
from debias.io import atomic_write, atomic_write_json
from debias.models.load import cache_dir

ENV = "DEBIAS_EVAL_CACHE"
FORMAT = 1
PACKAGE = Path(__file__).resolve().parents[1]
#: Sources whose code computes the before-numbers (relative to the package); a change to any of them is a new key.
CODE_FILES = ("evaluation/*.py", "prompts.py", "bias_spec.py", "bias_checks.py", "statements.py", "models/scoring.py",
              "models/continuation.py", "models/hooks.py", "models/load.py", "sae/ops.py", "edits/*.py",
              "training/module.py", "training/objective.py", "training/cache.py", "training/data.py")
#: Fields every entry must hold (with `suites`, also the suite scores).
REQUIRED = (*BASE_ROWS, "bias_gap_ci", "cue_margin_ci", "gap_per_profession")
SUITES = ("crows_pairs", "stereoset")


def enabled() -> bool:
    """False when `$DEBIAS_EVAL_CACHE` is 0 / false / no / off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


_warned: set[str] = set()


def warn(message: str, once: str | None = None) -> None:
    """`debias: warning: message` on stderr; with `once`, only the first time for that key in this process."""
    if once is not None:
        if once in _warned:
            return
        _warned.add(once)
    print(f"debias: warning: {message}", file=sys.stderr, flush=True)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----- file hashes, memoised by (path, size, mtime) -----
def _memo_path() -> Path:
    return cache_dir() / "eval" / "file-hashes.json"


def file_hashes(paths: list[Path]) -> dict[str, str]:
    """{path: sha256} of regular files; a file whose size and mtime are those of its memo entry is not re-read."""
    memo_path = _memo_path()
    try:  # anything unreadable, torn or foreign is no memo: the files are hashed again, nothing worse
        memo = json.loads(memo_path.read_bytes())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    out, changed = {}, False
    for path in paths:
        resolved = str(path.resolve())
        stat = path.stat()
        # ctime and inode too: a copy that keeps size and mtime (cp -p, rsync -a) is another file
        seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "ino": stat.st_ino}
        entry = memo.get(resolved)
        if not (isinstance(entry, dict) and all(entry.get(k) == v for k, v in seen.items())
                and isinstance(entry.get("sha256"), str)):
            h = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            entry = {**seen, "sha256": h.hexdigest()}
            memo[resolved], changed = entry, True
        out[str(path)] = entry["sha256"]
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo_path, memo)
        except OSError as err:
            warn(f"cannot write the file-hash memo {memo_path} ({err}); files are hashed again next run",
                 once=str(memo_path))
    return out


def _dir_hashes(directory: Path, recursive: bool = False) -> dict[str, str]:
    files = sorted(p for p in (directory.rglob("*") if recursive else directory.iterdir())
                   if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")
    return {str(p.relative_to(directory)): h for p, h in zip(files, file_hashes(files).values(), strict=True)}


def model_files(path: str) -> Path | None:
    """The directory holding the model's files: `path` itself, or a hub id's snapshot in the HF cache."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json")
    except ValueError:  # not a repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


# ----- the key -----
@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The package and library versions, and a hash of the sources in `CODE_FILES`."""
    h = hashlib.sha256()
    for pattern in CODE_FILES:
        for path in sorted(PACKAGE.glob(pattern)):
            h.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"versions": package_versions(("debias", "torch", "transformers", "sae-lens")), "sources": h.hexdigest()}


def cache_key(module, datamodule, suites: bool, cue_limit: int | None) -> dict | None:
    """Everything the original model's evaluation depends on, or None when the model cannot be identified."""
    from debias.prompts import default_prompt_dir

    files = model_files(module.model_path)
    if files is None:
        return None
    datamodule.setup("fit")
    hp = {k: v for k, v in datamodule.hparams.items() if k != "seed"}  # the training order: no held-out number
    prompt_dir = Path(hp["prompt_dir"]) if hp.get("prompt_dir") else default_prompt_dir()
    data = {"settings": hp, "texts": _digest({k: datamodule.texts[k] for k in sorted(datamodule.texts)}),
            "prompt_files": _dir_hashes(prompt_dir)}
    if not hp.get("prompt_dir"):  # the held-out gap and cue prompts come from the bias spec
        from debias.bias_spec import load_bias_spec

        spec = load_bias_spec(hp.get("bias", "gender")).path
        data["bias_spec"] = {spec.name: file_hashes([spec])[str(spec)]}
    if suites:
        from debias.evaluation.suites import BENCHMARK_DIR

        data["benchmarks"] = _dir_hashes(BENCHMARK_DIR)
    sae = module.sae
    return {
        "format": FORMAT,
        "model": {"id": module.model_id, "files": _dir_hashes(files), "dtype": module.hparams["dtype"],
                  "max_length": module.train_args.max_length, "device": module.device.type},
        "sae": {"spec": module.sae_args.spec, "sae_id": module.sae_args.sae_id,
                "config": sae.cfg.to_dict() if sae is not None else None,
                "weights": _tensor_digest(dict(sae.state_dict())) if sae is not None else None},
        "features": list(module.features), "data": data,
        "evaluation": {"suites": bool(suites), "cue_limit": cue_limit}, "code": code_version(),
    }


def entry_path(key: dict) -> Path:
    return cache_dir() / "eval" / f"{_digest(key)[:40]}.json"


def _read(path: Path, key: dict, suites: bool) -> dict | None:
    """The entry's metrics; None (with a warning for a damaged entry) when there is no usable one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:  # an unreadable file or directory
        warn(f"cannot read the evaluation cache entry {path} ({err}); recomputing")
        return None
    try:
        entry = json.loads(raw)
    except ValueError as err:  # torn or garbage: bad UTF-8 is a ValueError too
        warn(f"the evaluation cache entry {path} is not valid JSON ({err}); recomputing")
        return None
    metrics = entry.get("metrics") if isinstance(entry, dict) else None
    if not isinstance(metrics, dict):
        warn(f"the evaluation cache entry {path} has no metrics; recomputing")
        return None
    if entry.get("key") != json.loads(json.dumps(key, default=str)):
        warn(f"the evaluation cache entry {path} was written for another model, data or code; recomputing")
        return None
    missing = [name for name in (*REQUIRED, *(SUITES if suites else ())) if name not in metrics]
    if missing:
        warn(f"the evaluation cache entry {path} lacks {missing}; recomputing")
        return None
    not_numbers = [name for name in BASE_ROWS if isinstance(metrics[name], bool)
                   or not isinstance(metrics[name], (int, float))]
    if not_numbers:
        warn(f"the evaluation cache entry {path} holds non-numbers for {not_numbers}; recomputing")
        return None
    return metrics


def evaluate_original(module, datamodule, suites: bool = False, cue_limit: int | None = 256,
                      progress: str | bool | None = None) -> tuple[dict, bool]:
    """(`evaluate_model(module, datamodule, edited=False, ...)`, whether it came from the cache).

    The numbers are the same either way (a computed result goes through JSON as a cached one does).
    """
    from debias.evaluation.evaluate import evaluate_model

    def compute() -> dict:
        metrics = evaluate_model(module, datamodule, edited=False, suites=suites, cue_limit=cue_limit,
                                 progress=progress)
        return json.loads(json.dumps(metrics, default=float))

    key = cache_key(module, datamodule, suites, cue_limit) if enabled() else None
    if key is None:
        return compute(), False
    path = entry_path(key)
    cached = _read(path, key, suites)
    if cached is not None:
        return cached, True
    start = time.perf_counter()
    metrics = compute()
    entry = {"key": key, "metrics": metrics, "seconds": time.perf_counter() - start, "written": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(entry, indent=1, default=str))
    except OSError as err:
        warn(f"cannot write the evaluation cache entry {path} ({err}); continuing without caching")
    return metrics, False
