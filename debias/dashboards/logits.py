"""What a latent writes to the logits: its decoder direction read through the model's final norm and unembedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from debias.models import hooks


@dataclass(frozen=True)
class LogitEffects:
    """The `k` tokens whose logits a latent's decoder direction raises most (`top`) and lowers most (`bottom`), as
    (token text, logit change) pairs; `note` says why there are none."""

    top: list[tuple[str, float]]
    bottom: list[tuple[str, float]]
    note: str = ""


#: How the page describes the numbers.
METHOD = ("W_dec[i] through the final norm, then W_U: the model's own final norm applied to the decoder direction "
          "alone, minus its value at zero (so its gain, and a LayerNorm's centring, are folded in, and its bias "
          "drops out), times the unembedding. The scale is that of a residual made only of this direction; the "
          "ranking is what the model's last layers make of it (Gemma-2's final logit soft-cap is monotone and "
          "left out).")


@torch.no_grad()
def decoder_logits(model, sae, latents: list[int]) -> torch.Tensor | None:
    """[n_latents, vocab] logit change of each latent's decoder direction (`METHOD`); None when the SAE reads a
    space of another width than the residual stream (e.g. the MLP hidden layer), which the unembedding cannot read.
    """
    w_u = model.get_output_embeddings().weight  # [vocab, d_model]
    if sae.W_dec.shape[1] != w_u.shape[1]:
        return None
    norm = model.get_submodule(hooks.resolve_hook(model, "ln_final.hook_out").module_name)
    dirs = sae.W_dec[list(latents)].to(w_u)  # [n, d_model]
    # The norm's forward, not a hand-written fold: it covers RMSNorm, Gemma's (1 + w) gain and LayerNorm alike.
    folded = norm(dirs.unsqueeze(0)).squeeze(0) - norm(torch.zeros_like(dirs[:1]).unsqueeze(0)).squeeze(0)
    return (folded @ w_u.T).float().cpu()


def logit_effects(model, tokenizer, sae, latents: list[int], k: int = 10) -> dict[int, LogitEffects]:
    """{latent: its `k` most raised and most lowered tokens} (`decoder_logits`)."""
    if k < 1:
        raise ValueError(f"the number of logit effects shown must be >= 1, got {k}")
    logits = decoder_logits(model, sae, latents)
    if logits is None:
        width = model.get_output_embeddings().weight.shape[1]
        note = (f"the SAE reads a {sae.W_dec.shape[1]}-wide space, not the {width}-wide residual stream: its decoder "
                "directions have no direct logit effect")
        return {f: LogitEffects([], [], note) for f in latents}
    k = min(k, logits.shape[1])

    def pairs(values: torch.Tensor, ids: torch.Tensor) -> list[tuple[str, float]]:
        return [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True)]

    out = {}
    for f, row in zip(latents, logits, strict=True):
        top, bottom = row.topk(k), row.topk(k, largest=False)
        out[f] = LogitEffects(pairs(top.values, top.indices), pairs(bottom.values, bottom.indices))
    return out
