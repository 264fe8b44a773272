"""Results computed once and reused across runs: a keyed JSON store under `cache_dir()`, and the hashes keys are
made of (files, memoised by path, size and mtime; tensors; sources).

An entry is `cache_dir() / kind / <sha256 of its key>.json` = {"key", <payload>, "seconds", "written"}. No wrong
result is ever used: entries are written atomically (`debias.io.atomic_write`: flushed, then renamed), and an entry
that cannot be read (or is not a regular file: a FIFO planted there never blocks the run), is not JSON (a torn write,
garbage), has no payload, was written for another key, lacks a required field, holds a NaN or an infinity anywhere
or fails the caller's check is recomputed with a warning naming its path. A payload holding a NaN or an infinity is
never stored. A store that cannot be written (read-only, disk full) warns, naming the path, and only costs the reuse.
Each store has its own switch (`JsonStore.env`): `DEBIAS_EVAL_CACHE=0` turns the evaluation stores off,
`DEBIAS_FEATURE_CACHE=0` the feature-choice store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from debias.config import package_versions
from debias.io import atomic_write, atomic_write_json, non_finite, read_regular
from debias.models.load import cache_dir

ENV = "DEBIAS_EVAL_CACHE"  # the evaluation stores' switch (the default of `JsonStore.env`)


def enabled(env: str = ENV) -> bool:
    """False when `$env` (default `$DEBIAS_EVAL_CACHE`) is 0 / false / no / off."""
    return os.environ.get(env, "1").strip().lower() not in ("0", "false", "no", "off")


_warned: set[str] = set()


def warn(message: str, once: str | None = None) -> None:
    """`debias: warning: message` on stderr; with `once`, only the first time for that key in this process."""
    if once is not None:
        if once in _warned:
            return
        _warned.add(once)
    print(f"debias: warning: {message}", file=sys.stderr, flush=True)


def digest(obj) -> str:
    """sha256 of `obj` as sorted JSON (`str` of what JSON cannot hold)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the names, shapes, dtypes and bytes of `tensors`."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)  # the bytes in place, not a copy
    return h.hexdigest()


# ----- file hashes, memoised by (path, size, mtime) -----
def memo_path() -> Path:
    return cache_dir() / "eval" / "file-hashes.json"


def file_hashes(paths: list[Path]) -> dict[str, str]:
    """{path: sha256} of regular files; a file whose size and mtime are those of its memo entry is not re-read."""
    memo_file = memo_path()
    try:  # anything unreadable, torn or foreign is no memo: the files are hashed again, nothing worse
        memo = json.loads(read_regular(memo_file))
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
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo_file, memo)
        except OSError as err:
            warn(f"cannot write the file-hash memo {memo_file} ({err}); files are hashed again next run",
                 once=str(memo_file))
    return out


def dir_hashes(directory: Path, recursive: bool = False) -> dict[str, str]:
    """{relative path: sha256} of the files of `directory` (hidden files and `.md` notes left out)."""
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


def code_version(package: Path, patterns: Iterable[str]) -> dict:
    """The package and library versions, and a hash of the sources matching `patterns` (relative to `package`)."""
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(package.glob(pattern)):
            h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"versions": package_versions(("debias", "torch", "transformers", "sae-lens")), "sources": h.hexdigest()}


# ----- the store -----
def entry_path(kind: str, key: dict) -> Path:
    """Where the entry of `key` lives: `cache_dir() / kind / <sha256 of key>.json`."""
    return cache_dir() / kind / f"{digest(key)[:40]}.json"


def as_json(obj):
    """`obj` as it reads back from JSON (floats for tensors and numpy scalars): computed equals cached exactly."""
    return json.loads(json.dumps(obj, default=float))


@dataclass(frozen=True)
class JsonStore:
    """One kind of entry: `kind` (its directory under `cache_dir()`), `what` (how warnings name an entry),
    `payload` (the entry's field holding the result), `sources` (what the key names, for the warning about an entry
    written for another key), `required` (the fields every payload must hold) and `env` (the environment variable
    whose 0 / false / no / off turns this store off)."""

    kind: str
    what: str
    payload: str = "metrics"
    sources: str = "model, data or code"
    required: tuple[str, ...] = ()
    env: str = ENV

    def entry_path(self, key: dict) -> Path:
        return entry_path(self.kind, key)

    def read(self, path: Path, key: dict, required: Iterable[str] = (),
             check: Callable[[dict], str | None] | None = None) -> dict | None:
        """The entry's payload; None (with a warning for a damaged entry) when there is no usable one. `check`
        returns what is wrong with a payload (`holds non-numbers for [...]`), or None."""
        try:
            raw = read_regular(path)
        except FileNotFoundError:
            return None
        except OSError as err:  # an unreadable file or directory
            warn(f"cannot read the {self.what} {path} ({err}); recomputing")
            return None
        try:
            entry = json.loads(raw)
        except ValueError as err:  # torn or garbage: bad UTF-8 is a ValueError too
            warn(f"the {self.what} {path} is not valid JSON ({err}); recomputing")
            return None
        payload = entry.get(self.payload) if isinstance(entry, dict) else None
        if not isinstance(payload, dict):
            warn(f"the {self.what} {path} has no {self.payload}; recomputing")
            return None
        if entry.get("key") != json.loads(json.dumps(key, default=str)):
            warn(f"the {self.what} {path} was written for another {self.sources}; recomputing")
            return None
        missing = [name for name in (*self.required, *required) if name not in payload]
        if missing:
            warn(f"the {self.what} {path} lacks {missing}; recomputing")
            return None
        bad = non_finite(payload)
        problem = f"holds non-finite numbers at {bad[:5]}" if bad else check(payload) if check is not None else None
        if problem:
            warn(f"the {self.what} {path} {problem}; recomputing")
            return None
        return payload

    def write(self, path: Path, key: dict, payload: dict, seconds: float) -> None:
        """Store `payload` under `key`, atomically; a store that cannot be written warns and the run continues. A
        payload holding a NaN or an infinity is not stored (a warning names where): no later run reuses it."""
        bad = non_finite(payload)
        if bad:
            warn(f"not writing the {self.what} {path}: the computed {self.payload} hold non-finite numbers at "
                 f"{bad[:5]}, which no later run may reuse")
            return
        entry = {"key": key, self.payload: payload, "seconds": seconds, "written": time.time()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(entry, indent=1, default=str))
        except OSError as err:
            warn(f"cannot write the {self.what} {path} ({err}); continuing without caching")

    def get(self, key: Callable[[], dict | None], compute: Callable[[], dict], required: Iterable[str] = (),
            check: Callable[[dict], str | None] | None = None) -> tuple[dict, Path | None]:
        """(the payload, the entry it was read from, or None when computed now).

        `key()` is called only when the store is enabled; None (nothing identifies the inputs) computes without
        caching. A computed payload goes through JSON as a cached one does, so both are the same.
        """
        identity = key() if enabled(self.env) else None
        if identity is None:
            return as_json(compute()), None
        path = self.entry_path(identity)
        required = tuple(required)
        cached = self.read(path, identity, required, check)
        if cached is not None:
            return cached, path
        start = time.perf_counter()
        payload = as_json(compute())
        self.write(path, identity, payload, time.perf_counter() - start)
        return payload, None
