"""Where the first run's SAE build spends its time, and what bfloat16 buys: capture throughput against a plain forward
of the same layers, SAE training time, and the explained variance each SAE reaches on float32 validation activations.

    python scripts/sae_build_profile.py                      # SmolLM2, 65k training tokens, both dtypes
    python scripts/sae_build_profile.py --tokens 350000      # the default build's size

The capture is `debias.sae.corpus.capture_activations` (the forward stops at the hook); the plain forward is the
decoder stack cut after the hook's layer, with no hook. Both run under `torch.inference_mode`. The SAE is
`debias.sae.build.fit_topk_sae` with `SAETrainSettings(compute_dtype=...)`: bfloat16 runs capture and SAE steps under
torch.autocast. Explained variance is always measured on validation activations captured in float32, the ones the
SAE reads at fit time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _plain_forward_rate(model, layer: int, ids: torch.Tensor, batch: int, autocast: bool) -> float:
    """Tokens/s of the decoder stack through `layer`, no hooks (the capture's compute floor)."""
    stack = model.model
    kept, stack.layers = stack.layers, stack.layers[: layer + 1]
    try:
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, len(ids), batch):
                stack(input_ids=ids[i:i + batch], use_cache=False)
        return ids.numel() / (time.perf_counter() - start)
    finally:
        stack.layers = kept


def _explained_variance(sae, acts: torch.Tensor) -> float:
    with torch.no_grad():
        err = ((acts - sae(acts)) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    return 1 - err.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65_536, help="training tokens captured (default 65536)")
    parser.add_argument("--val-tokens", type=int, default=16_384)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()

    from debias.models import hooks
    from debias.models.load import load_model
    from debias.sae import corpus
    from debias.sae.build import SAETrainSettings, fit_topk_sae

    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    base = SAETrainSettings(n_tokens=args.tokens, bias_prompt_file=None)
    site = hooks.resolve_hook(model, base.hook_name, tok)
    train_ids = corpus.token_sequences(tok, corpus.split_passages("train", []), base.seq_len, args.tokens)
    val_ids = corpus.token_sequences(tok, corpus.split_passages("validation"), base.seq_len, args.val_tokens)
    val = corpus.capture_activations(model, site, val_ids, corpus.non_special_tokens(tok, val_ids),
                                     base.capture_batch, desc="capture validation (float32)")
    rows = []
    for dtype in args.dtypes:
        bf16 = dtype == "bfloat16"
        settings = SAETrainSettings(n_tokens=args.tokens, bias_prompt_file=None, compute_dtype=dtype)
        plain = _plain_forward_rate(model, site.layer, train_ids, settings.capture_batch, bf16)
        start = time.perf_counter()
        acts = corpus.capture_activations(model, site, train_ids, corpus.non_special_tokens(tok, train_ids),
                                          settings.capture_batch, desc=f"capture ({dtype})", autocast=bf16)
        capture_s = time.perf_counter() - start
        start = time.perf_counter()
        sae, trainer = fit_topk_sae(acts, settings)
        train_s = time.perf_counter() - start
        rows.append({"compute_dtype": dtype, "tokens": int(train_ids.numel()),
                     "plain_forward_tokens_per_s": round(plain), "capture_tokens_per_s": round(train_ids.numel()
                                                                                              / capture_s),
                     "capture_s": round(capture_s, 1), "sae_steps": trainer.n_training_steps,
                     "sae_train_s": round(train_s, 1), "sae_step_ms": round(1000 * train_s / trainer.n_training_steps),
                     "val_explained_variance": round(_explained_variance(sae, val), 4),
                     "threads": torch.get_num_threads()})
        print(json.dumps(rows[-1]), flush=True)
    print("| compute dtype | plain forward tok/s | capture tok/s | capture s | SAE steps | SAE train s | ms/step | "
          "val EV |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['compute_dtype']} | {r['plain_forward_tokens_per_s']} | {r['capture_tokens_per_s']} | "
              f"{r['capture_s']} | {r['sae_steps']} | {r['sae_train_s']} | {r['sae_step_ms']} | "
              f"{r['val_explained_variance']} |")


if __name__ == "__main__":
    main()
