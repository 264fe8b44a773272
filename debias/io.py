"""Atomic writes of files and directories: a reader, or an interrupted run, never sees a half-written result.

A directory is built in a hidden sibling (`.NAME.XXXX`, holding a `.debias-pid` marker) and renamed into place.
A sibling left behind by a killed process (its pid no longer runs) is removed by the next write of the same name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

PID_MARKER = ".debias-pid"


def _write_synced(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist), write `data` and flush it to the disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to a temporary sibling of `path`, flush it to the disk, then rename it into place.

    A reader sees the old file or the whole new one, also after a kill or a crash; on any error (a full or
    read-only disk) `path` is untouched, the sibling removed, and the error raised.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # unique per writer
    try:
        _write_synced(tmp, data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # the error that matters is the write's
            tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON (floats for tensors and numpy scalars), written atomically."""
    atomic_write(path, json.dumps(obj, indent=2, default=float))


def read_regular(path: str | Path) -> bytes:
    """The bytes of `path`, which must be a regular file: a FIFO, device or directory planted at a cache path raises
    `OSError` at once instead of blocking the read (the open does not wait for a FIFO's writer)."""
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"not a regular file: {path}")
        return f.read()


def is_regular(path: str | Path) -> bool:
    """Whether `path` is a regular file (following links); False when it is missing or anything else."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def safetensors_problem(path: str | Path) -> str | None:
    """What makes `path` no whole safetensors file (not a regular file; a torn or garbage header, or data shorter
    than the header says: a truncated copy), or None. Reads the header only."""
    from safetensors import SafetensorError, safe_open

    if not is_regular(path):
        return "is not a regular file" if os.path.lexists(path) else "is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (OSError, SafetensorError) as err:
        return f"is not a whole safetensors file ({type(err).__name__}: {err})"
    return None


def non_finite(obj, where: str = "") -> list[str]:
    """The places (`a.b[1]`) in nested dicts and lists where `obj` holds a NaN or an infinity."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "the value"]
    if isinstance(obj, dict):
        return [bad for key, value in obj.items() for bad in non_finite(value, f"{where}.{key}" if where else str(key))]
    if isinstance(obj, (list, tuple)):
        return [bad for i, value in enumerate(obj) for bad in non_finite(value, f"{where}[{i}]")]
    return []


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable (not a regular file), torn or not an object
    (state to recompute)."""
    try:
        data = json.loads(read_regular(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_siblings(dest: Path) -> list[Path]:
    """Hidden build directories of `dest` whose writing process is gone (or that carry no marker)."""
    stale = []
    for tmp in dest.parent.glob(f".{dest.name}.*"):
        if not tmp.is_dir():
            continue
        marker = tmp / PID_MARKER
        try:
            pid = int(marker.read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not _alive(pid):
            stale.append(tmp)
    return stale


def clean_stale(dest: str | Path) -> list[Path]:
    """Remove what killed writers of `dest` left behind; returns the removed paths."""
    dest = Path(dest)
    removed = stale_siblings(dest) if dest.parent.is_dir() else []
    for tmp in removed:
        shutil.rmtree(tmp, ignore_errors=True)
    return removed


@contextlib.contextmanager
def atomic_dir(dest: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling of `dest` to fill; on success it becomes `dest`, on any error it is removed.

    `replace`: an existing `dest` is swapped out (and deleted) only after the new one is complete. Without it, a
    `dest` that appeared meanwhile (a concurrent writer) is kept and the new copy dropped.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    (tmp / PID_MARKER).write_text(str(os.getpid()))
    try:
        yield tmp
        if dest.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        elif not dest.exists():
            os.replace(tmp, dest)
        if dest.is_dir():
            (dest / PID_MARKER).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_weights_only(path: str | Path, what: str = "checkpoint"):
    """`torch.load(path, weights_only=True)` on the CPU; a file it refuses (pickled code, foreign objects, garbage)
    raises one line naming `path` and the reason, without torch's advice to load it with `weights_only=False`."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for code or foreign objects; others for garbage bytes
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        advice = ("Weights only load failed", "Check the documentation")
        reasons = [line for line in lines if not line.startswith(advice)]
        reason = reasons[0] if reasons else (lines[0] if lines else type(err).__name__)
        raise ValueError(f"{path} is not a {what} that loads as weights only ({reason}); debias never loads a "
                         "checkpoint that can run code") from None
