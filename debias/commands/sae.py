"""`debias sae train`: train (or reuse) the project's TopK SAE and print its quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from debias.models.load import DEFAULT_MODEL, load_model
from debias.sae.build import DEFAULT_HOOK, PACKAGED_BIAS_TRAIN, SAETrainSettings, ensure_sae, train_sae


def sae_train_command(model: str = DEFAULT_MODEL, hook_name: str = DEFAULT_HOOK, d_sae: int = 4096, k: int = 64,
                      n_tokens: int = 350_000, epochs: float = 2.0, lr: float = 1e-3, batch_size: int = 1024,
                      sae_seed: int = 0, val_tokens: int = 16_384, ce_tokens: int = 4_096,
                      bias_prompt_file: str | None = str(PACKAGED_BIAS_TRAIN), out: str | None = None,
                      force: bool = False, compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto") -> dict:
    """Train (or reuse) the TopK SAE of `model` at `hook_name`; print and return its metrics.

    `out` None: the shared cache (what `debias fit` uses); otherwise a directory written from scratch.
    `bias_prompt_file`: train bias prompts added to the corpus (default: the packaged train split; None: none).
    `compute_dtype`: the capture's forward and the SAE's steps under autocast (bfloat16) or in float32; auto:
    bfloat16 where the CPU runs it natively, else float32.
    `sae_seed`: seeds the SAE's initial weights and the order of its training batches.
    """
    settings = SAETrainSettings(hook_name=hook_name, d_sae=d_sae, k=k, n_tokens=n_tokens, epochs=epochs, lr=lr,
                                batch_size=batch_size, sae_seed=sae_seed, val_tokens=val_tokens, ce_tokens=ce_tokens,
                                bias_prompt_file=bias_prompt_file, compute_dtype=compute_dtype)
    loaded = load_model(model)
    if out is None:
        path = ensure_sae(loaded.model, loaded.tokenizer, loaded.model_id, settings, force=force)
    else:
        path = Path(out)
        train_sae(loaded.model, loaded.tokenizer, settings, path, model_id=loaded.model_id)
    metrics = json.loads((path / "metrics.json").read_text())
    metrics["path"] = str(path)
    summary = {k: metrics[k] for k in ("explained_variance", "l0", "dead_fraction", "ce_loss_recovered", "total_s")}
    print(json.dumps({"path": str(path), **summary}, indent=2))
    return metrics
