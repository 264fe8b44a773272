"""SAE quality on held-out corpus tokens: explained variance, L0, dead latents and CE loss recovered."""

from __future__ import annotations

import torch

from debias.models import hooks
from debias.sae import corpus
from debias.sae.corpus import capture_activations


def _token_loss(model, input_ids: torch.Tensor, real: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over targets that are real tokens, and their count."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:].to(device)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    keep = real[:, 1:].to(device)
    return losses[keep].sum().item(), int(keep.sum())


def _splice_at(mask: torch.Tensor, fn):
    """A hook function: t [batch, seq, d] with fn applied to its rows at mask [batch, seq] (in float32)."""
    def apply(t):
        m = mask.to(t.device)
        out = t.clone()
        out[m] = fn(t[m].float()).to(t.dtype)
        return out
    return apply


@torch.inference_mode()
def sae_metrics(model, tokenizer, sae, site: hooks.HookSite, val_tokens: torch.Tensor,
                ce_tokens: int = 4096, batch: int = 16) -> dict[str, float]:
    """Quality of `sae` on validation token ids [n_seq, seq_len] (real tokens only: no BOS, separators, pad).

    explained_variance = 1 - Σ|x - x̂|² / Σ|x - mean x|²; l0 = mean active latents per token; dead_fraction =
    latents never active on these tokens. CE losses on the sequences holding the first `ce_tokens` real tokens:
    clean, with x̂ spliced in at real tokens, and with the hooked activation zeroed there;
    ce_loss_recovered = (zero - sae) / (zero - clean).
    """
    real = corpus.non_special_tokens(tokenizer, val_tokens)
    x = capture_activations(model, site, val_tokens, real, batch, desc="validation")
    param = next(sae.parameters())
    feats = sae.encode(x.to(param.device, param.dtype))
    recon = sae.decode(feats).float().cpu()
    active = feats > 0
    metrics = {
        "explained_variance": 1 - ((x - recon) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item(),
        "l0": active.sum(-1).float().mean().item(),
        "dead_fraction": (~active.any(0)).float().mean().item(),
        "n_val_tokens": int(x.shape[0]),
    }
    n_seq = max(1, int((real.sum(1).cumsum(0) < ce_tokens).sum()) + 1)
    ids, mask = val_tokens[:n_seq], real[:n_seq]

    variants = {"clean": None, "sae": lambda a: sae(a.to(param.dtype)).float(), "zero": torch.zeros_like}
    for name, fn in variants.items():
        total, count = 0.0, 0
        for start in range(0, n_seq, batch):
            chunk, chunk_mask = ids[start:start + batch], mask[start:start + batch]
            if fn is None:
                loss, n = _token_loss(model, chunk, chunk_mask)
            else:
                with hooks.replace(model, site, _splice_at(chunk_mask, fn)):
                    loss, n = _token_loss(model, chunk, chunk_mask)
            total, count = total + loss, count + n
        metrics[f"ce_loss_{name}"] = total / max(count, 1)
    gap = metrics["ce_loss_zero"] - metrics["ce_loss_clean"]
    metrics["ce_loss_recovered"] = (metrics["ce_loss_zero"] - metrics["ce_loss_sae"]) / gap if gap else float("nan")
    metrics["n_ce_tokens"] = count
    return metrics
