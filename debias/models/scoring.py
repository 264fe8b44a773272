"""Next-token scoring of a causal LM: log-probabilities after prompts, target-token ids, margins and gaps, and
which tokens of a batch are real (attended, not BOS).
"""

from __future__ import annotations

import torch


def pronoun_ids(tokenizer, female: str = " she", male: str = " he") -> tuple[int, int]:
    """Token ids of the two pronouns; raises if either is not a single token."""
    ids = []
    for text in (female, male):
        tok = tokenizer.encode(text, add_special_tokens=False)
        if len(tok) != 1:  # SentencePiece may add a prefix piece: take the token that `text` adds after a word
            ref = tokenizer.encode("a", add_special_tokens=False)
            both = tokenizer.encode("a" + text, add_special_tokens=False)
            if both[: len(ref)] == ref and len(both) == len(ref) + 1:
                tok = both[len(ref):]
        if len(tok) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
            raise ValueError(f"pronoun {text!r} is not a single token for this tokenizer: {pieces}")
        ids.append(tok[0])
    return ids[0], ids[1]


def next_token_logprobs(model, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Log-softmax [n, vocab] (float32) of the next token after the last real token of each prompt.

    Pads on `tokenizer.padding_side` and passes position ids, so left and right padding give the unbatched
    result. Follows the ambient grad mode (wrap in `torch.no_grad()` for evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = tokenizer(list(prompts))["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt tokenizes to zero tokens")
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            sl = slice(width - len(seq), width) if tokenizer.padding_side == "left" else slice(0, len(seq))
            ids[row, sl] = torch.tensor(seq)
            mask[row, sl] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        last = width - 1 - mask.flip(-1).argmax(-1)  # index of the last real token, either padding side
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device)).logits
        picked = logits[torch.arange(len(chunk), device=logits.device), last.to(logits.device)]
        out.append(picked.float().log_softmax(-1))
    return torch.cat(out)


def pronoun_margin(logprobs: torch.Tensor, she_id: int, he_id: int) -> torch.Tensor:
    """log p(she) - log p(he): [n, vocab] -> [n]."""
    return logprobs[:, she_id] - logprobs[:, he_id]


def _group_gap(margins: torch.Tensor, is_female: torch.Tensor) -> torch.Tensor:
    is_female = is_female.to(torch.bool)
    if not is_female.any() or is_female.all():
        raise ValueError("the stereotype gap needs at least one female- and one male-stereotyped prompt")
    return margins[is_female].mean() - margins[~is_female].mean()


def gap_from_logprobs(logprobs: torch.Tensor, she_id: int, he_id: int, is_female: torch.Tensor) -> torch.Tensor:
    """Differentiable gap (scalar): mean margin of female prompts - mean of male; logprobs [n, vocab]."""
    return _group_gap(pronoun_margin(logprobs, she_id, he_id), is_female.to(logprobs.device))


def real_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """[batch, seq] bool: attended tokens that are not the BOS token."""
    real = attention_mask.bool()
    if bos_token_id is not None:
        real = real & (input_ids != bos_token_id)
    return real
