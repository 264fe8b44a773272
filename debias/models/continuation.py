"""Log-likelihood of a continuation after a context, batched: the scoring of statements and factual items.

Context and continuation are tokenized separately and concatenated (the context with the tokenizer's special
tokens, the continuation without), as the suites do, so a continuation's tokens do not depend on its context.
Follows the ambient grad mode, so the same call scores for evaluation and trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from debias.models.scoring import takes_logits_to_keep
from debias.statements import StatementItem, statement_texts


@dataclass
class ContinuationBatch:
    """Right-padded ids and mask, and for each continuation token: its row, the position predicting it, its id."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    n: int

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def continuation_batch(tokenizer, contexts: list[str], continuations: list[str], device=None) -> ContinuationBatch:
    """The batch scoring `continuations[i]` after `contexts[i]`."""
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    heads = tokenizer(list(contexts))["input_ids"]
    tails = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    for text, head, tail in zip(contexts, heads, tails, strict=True):
        if not head or not tail:
            raise ValueError(f"empty context or continuation after tokenization: {text!r}")
    width = max(len(h) + len(t) for h, t in zip(heads, tails, strict=True))
    ids = torch.full((len(heads), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(heads), width), dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for row, (head, tail) in enumerate(zip(heads, tails, strict=True)):
        seq = head + tail
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        rows += [row] * len(tail)
        positions += range(len(head) - 1, len(seq) - 1)
        targets += tail
    as_long = {"dtype": torch.long, "device": device}
    return ContinuationBatch(ids.to(device), mask.to(device), torch.tensor(rows, **as_long),
                             torch.tensor(positions, **as_long), torch.tensor(targets, **as_long), len(heads))


def picked_logits(logits: torch.Tensor, batch: ContinuationBatch) -> torch.Tensor:
    """[m, vocab] float32 logits at the positions predicting each continuation token."""
    return logits[batch.rows, batch.positions].float()


def continuation_logits(model, batch: ContinuationBatch) -> torch.Tensor:
    """`picked_logits` of `model`'s forward on `batch`, with only the picked positions through the unembedding (HF's
    boolean `logits_to_keep`, which keeps them in the same row-major order) where the model takes it: the same values,
    at a fraction of the vocab × hidden cost per token. A model that returns every position is picked from."""
    keep = {}
    if takes_logits_to_keep(model):
        mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=batch.input_ids.device)
        mask[batch.rows, batch.positions] = True
        keep["logits_to_keep"] = mask
    logits = model(**batch.model_inputs(), **keep).logits
    if logits.dim() == 2:
        return logits.float()
    return picked_logits(logits, batch)


def summed_logprobs(picked: torch.Tensor, batch: ContinuationBatch) -> torch.Tensor:
    """[n] log p(continuation | context): the sum over its tokens."""
    token = picked.log_softmax(-1).gather(-1, batch.targets[:, None])[:, 0]
    return torch.zeros(batch.n, device=picked.device, dtype=token.dtype).index_add(0, batch.rows, token)


def continuation_logprobs(model, tokenizer, contexts: list[str], continuations: list[str],
                          batch_size: int = 16) -> torch.Tensor:
    """[n] log p(continuations[i] | contexts[i]) under `model` (a HF causal LM)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(contexts), batch_size):
        batch = continuation_batch(tokenizer, contexts[start:start + batch_size],
                                   continuations[start:start + batch_size], device)
        out.append(summed_logprobs(continuation_logits(model, batch), batch))
    return torch.cat(out) if out else torch.zeros(0)


def statement_logprobs(model, tokenizer, items: list[StatementItem], batch_size: int = 16) -> torch.Tensor:
    """[n, groups] log p(attribute | each group's prefix)."""
    contexts, attributes = statement_texts(items)
    return continuation_logprobs(model, tokenizer, contexts, attributes, batch_size).view(len(items), -1)
