"""What a latent writes to the logits: the tokens its decoder direction raises and lowers most
(`debias.features.rank.decoder_logits`: through the model's final norm and unembedding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from debias.features.rank import decoder_logits


@dataclass(frozen=True)
class LogitEffects:
    """The `k` tokens whose logits a latent's decoder direction raises most (`top`) and lowers most (`bottom`), as
    (token text, logit change) pairs; `note` says why there are none."""

    top: list[tuple[str, float]]
    bottom: list[tuple[str, float]]
    note: str = ""


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
