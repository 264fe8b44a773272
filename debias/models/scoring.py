"""Next-token scoring of a causal LM: log-probabilities after prompts, target-token ids, margins and gaps, and
which tokens of a batch are real (attended, not BOS).

Groups: a bias spec (`debias.bias_spec`) names two or more groups, each with a next-token target (gender: " she",
" he"). A prompt of group g (stereotyped toward it, or cued with it) has the margin log p(target_g) - the mean over
the other groups h of log p(target_h); the gap is the sum over groups of the mean margin of that group's prompts.
With two groups that is mean_female(she - he) - mean_male(she - he), bit for bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from debias.bias_spec import BiasSpec


def _single_token(tokenizer, text: str) -> int | None:
    tok = tokenizer.encode(text, add_special_tokens=False)
    if len(tok) != 1:  # SentencePiece may add a prefix piece: take the token that `text` adds after a word
        ref = tokenizer.encode("a", add_special_tokens=False)
        both = tokenizer.encode("a" + text, add_special_tokens=False)
        if both[: len(ref)] == ref and len(both) == len(ref) + 1:
            tok = both[len(ref):]
    return tok[0] if len(tok) == 1 else None


def _pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))


def target_ids(tokenizer, spec_or_targets: BiasSpec | str | Path | Sequence[str] | Any = "gender") -> tuple[int, ...]:
    """Token ids of a bias's group targets, in group order: from a spec (or a shipped name / YAML path), from
    `GapPrompts` / `CuePrompts` (their `targets`), or from target texts. Raises a one-line ValueError naming the
    target, the spec and its pieces when a target is not a single token of `tokenizer`."""
    from debias.bias_spec import BiasSpec, load_bias_spec

    where = ""
    if isinstance(spec_or_targets, (str, Path, BiasSpec)):
        spec = load_bias_spec(spec_or_targets)
        texts, where = [spec.targets[g] for g in spec.groups], f" of bias {spec.name!r} ({spec.path})"
    elif hasattr(spec_or_targets, "targets") and hasattr(spec_or_targets, "bias"):
        texts, where = list(spec_or_targets.targets), f" of bias {spec_or_targets.bias!r}"
    else:
        texts = list(spec_or_targets)
    if len(texts) < 2:
        raise ValueError(f"need two or more group targets, got {texts}")
    ids = []
    for text in texts:
        tok = _single_token(tokenizer, text)
        if tok is None:
            raise ValueError(f"target {text!r}{where} is not a single token for this tokenizer: "
                             f"{_pieces(tokenizer, text)}")
        ids.append(tok)
    return tuple(ids)


def pronoun_ids(tokenizer, female: str = " she", male: str = " he") -> tuple[int, int]:
    """Token ids of the two pronouns (gender's targets); raises if either is not a single token."""
    ids = []
    for text in (female, male):
        tok = _single_token(tokenizer, text)
        if tok is None:
            raise ValueError(f"pronoun {text!r} is not a single token for this tokenizer: {_pieces(tokenizer, text)}")
        ids.append(tok)
    return ids[0], ids[1]


def takes_logits_to_keep(model) -> bool:
    """Whether `model`'s forward takes HF's `logits_to_keep` (by name, or through **kwargs as PEFT's wrappers do)."""
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


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
    out, keeps_logits = [], takes_logits_to_keep(model)
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
        # Only the last real position goes through the unembedding (vocab × hidden per token: most of the cost);
        # a model without `logits_to_keep`, or one that ignores it, returns every position, picked from as well.
        keep = {"logits_to_keep": last[:, None].to(device)} if keeps_logits else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       **keep).logits
        if logits.shape[1] == 1 and width > 1:
            picked = logits[:, 0]
        else:
            picked = logits[torch.arange(len(chunk), device=logits.device), last.to(logits.device)]
        out.append(picked.float().log_softmax(-1))
    return torch.cat(out)


def pronoun_margin(logprobs: torch.Tensor, she_id: int, he_id: int) -> torch.Tensor:
    """log p(she) - log p(he): [n, vocab] -> [n]."""
    return logprobs[:, she_id] - logprobs[:, he_id]


def _check_index(group_index: torch.Tensor, n_groups: int) -> None:
    if group_index.numel() and not 0 <= int(group_index.min()) <= int(group_index.max()) < n_groups:
        raise ValueError(f"group_index must lie in [0, {n_groups}), got values in "
                         f"[{int(group_index.min())}, {int(group_index.max())}]")


def group_margins(logprobs: torch.Tensor, target_ids: Sequence[int], group_index: torch.Tensor) -> torch.Tensor:
    """[n]: log p(target of the prompt's group) - mean over the other groups of log p(their target).

    logprobs [n, vocab]; `target_ids` one per group (`target_ids(...)`); group_index [n] long in [0, n_groups).
    Differentiable. Two groups: she - he for female prompts, he - she for male ones, exactly.
    """
    n_groups = len(target_ids)
    group_index = group_index.to(device=logprobs.device, dtype=torch.long)
    if n_groups < 2:
        raise ValueError(f"margins need two or more group targets, got {list(target_ids)}")
    if logprobs.ndim != 2 or group_index.shape != logprobs.shape[:1]:
        raise ValueError(f"expected logprobs [n, vocab] and group_index [n], got {list(logprobs.shape)} and "
                         f"{list(group_index.shape)}")
    _check_index(group_index, n_groups)
    targets = logprobs[:, torch.as_tensor(list(target_ids), dtype=torch.long, device=logprobs.device)]  # [n, G]
    return own_group_margins(targets, group_index)


def group_means(margins: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> list[torch.Tensor]:
    """The mean of `margins` [n] over each group's prompts (n_groups scalars); raises if a group has none."""
    group_index = group_index.to(device=margins.device, dtype=torch.long)
    if margins.ndim != 1 or margins.shape != group_index.shape:
        raise ValueError(f"expected margins and group_index of the same shape [n], got {list(margins.shape)} and "
                         f"{list(group_index.shape)}")
    _check_index(group_index, n_groups)
    members = [group_index == g for g in range(n_groups)]
    empty = [g for g, m in enumerate(members) if not m.any()]
    if empty:
        raise ValueError(f"the stereotype gap needs at least one prompt of each of the {n_groups} groups; "
                         f"group index(es) {empty} have none")
    return [margins[m].mean() for m in members]


def own_group_margins(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """[n] item i's score under its own group minus the mean over the other groups; scores [n, groups] (e.g. an
    attribute's log-likelihood after each group's subject)."""
    own = scores.gather(1, group[:, None]).squeeze(1)
    is_own = torch.nn.functional.one_hot(group, scores.shape[1]).bool()
    others = scores.masked_fill(is_own, 0.0).sum(1) / (scores.shape[1] - 1)  # two groups: the other one, exactly
    return own - others


def group_gap(margins: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Scalar: the sum over groups of the mean margin of that group's prompts (`group_margins`); 0 = no
    stereotype. Two groups: mean female (she - he) - mean male (she - he), exactly."""
    means = group_means(margins, group_index, n_groups)
    total = means[0]
    for mean in means[1:]:
        total = total + mean
    return total


def gap_from_logprobs(logprobs: torch.Tensor, target_ids: Sequence[int], group_index: torch.Tensor) -> torch.Tensor:
    """Differentiable gap (scalar) of logprobs [n, vocab]: `group_gap` of `group_margins(logprobs, target_ids,
    group_index)`; `target_ids` one token per group, `group_index` [n] long (each prompt's group)."""
    if isinstance(target_ids, int) or not isinstance(group_index, torch.Tensor):
        raise TypeError(f"gap_from_logprobs(logprobs, target_ids, group_index) takes a sequence of target ids and a "
                        f"[n] long group_index tensor, got {type(target_ids).__name__} and "
                        f"{type(group_index).__name__}")
    return group_gap(group_margins(logprobs, target_ids, group_index), group_index, len(target_ids))


def legacy_group_index(is_female: torch.Tensor) -> torch.Tensor:
    """[n] long group index of a two-group bool flag: True (the first group, "female") -> 0, False -> 1."""
    return (~is_female.to(torch.bool)).long()


def real_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """[batch, seq] bool: attended tokens that are not the BOS token."""
    real = attention_mask.bool()
    if bos_token_id is not None:
        real = real & (input_ids != bos_token_id)
    return real
