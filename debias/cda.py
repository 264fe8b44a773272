"""Counterfactual pairs mined from the SAE's offline corpus (CDA-style): real sentences that name one group,
rewritten for every other group by the bias spec's swap list.

A mined sentence is cut after its last group word: the prefix differs between the versions, the continuation is
the same text in all of them ("Later that year she" / "Later that year he" + " moved to Paris to study law.").
Each pair is a `StatementItem` (prefixes per group, the continuation as the attribute, `group` = the group the
corpus sentence named), so the `counterfactual` term's forms apply unchanged: the continuation's log-likelihood,
or the next-token distribution right after the swapped word, should not depend on the group.

Kept only: sentences whose group words all belong to one group and all have swap partners (a sentence that also
says "Allah" or "her brother" has no clean counterfactual), of `MIN_WORDS`..`MAX_WORDS` words, with at least
`MIN_CONTINUATION_WORDS` words after the last group word. A sentence's split is a fixed function of its own text
(`debias.sae.corpus.is_validation`), so a sentence that two passages share is never in both splits. The corpus
holds no evaluation suite and no held-out prompt.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from debias.bias_checks import group_words_in, word_pattern
from debias.bias_spec import BiasSpec, load_bias_spec, swap
from debias.sae.corpus import is_validation, passages
from debias.statements import StatementItem

MIN_WORDS, MAX_WORDS, MIN_CONTINUATION_WORDS = 6, 30, 3
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(passage: str) -> Iterator[str]:
    """The sentences of a passage (split after . ! ? before a capital or a quote), whitespace collapsed."""
    for sentence in _SENTENCE_END.split(passage):
        text = " ".join(sentence.split())
        if text:
            yield text


def counterfactual_item(sentence: str, spec: BiasSpec) -> StatementItem | None:
    """The sentence as a pair of `spec`'s groups, or None where it has no clean counterfactual (see module doc)."""
    if not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
        return None
    found = group_words_in(spec.words, sentence)
    if len(found) != 1:
        return None
    (group,) = found
    swappable = {w for d, table in spec.partners.items() if d[0] == group for w in table}
    if any(word.lower() not in swappable for word in found[group]):
        return None
    last = list(word_pattern(tuple(swappable)).finditer(sentence))[-1]
    continuation = sentence[last.end():]
    if len(continuation.split()) < MIN_CONTINUATION_WORDS or not continuation.startswith(" "):
        return None  # "mother's" or "mother-in-law": the word goes on past the swap
    # Swapped whole, then cut: a word's partner can depend on the word after it ("Christian nations").
    versions = [sentence if g == group else swap(sentence, spec, to=g) for g in spec.groups]
    assert all(v.endswith(continuation) for v in versions)  # the continuation holds no group word
    prefixes = tuple(v[:len(v) - len(continuation)] for v in versions)
    if len(set(prefixes)) != len(prefixes):
        return None
    return StatementItem(prefixes, continuation, spec.groups.index(group))


def mine_pairs(spec: BiasSpec, passages: Iterable[str], limit: int, split: str | None = None) -> list[StatementItem]:
    """The first `limit` counterfactual pairs in `passages` (in their order), one per distinct sentence; with
    `split`, only sentences of that split ("train" / "validation")."""
    items: list[StatementItem] = []
    seen: set[str] = set()
    for passage in passages:
        for sentence in sentences(passage):
            if sentence in seen or (split is not None and is_validation(sentence) != (split == "validation")):
                continue
            seen.add(sentence)
            item = counterfactual_item(sentence, spec)
            if item is not None:
                items.append(item)
                if len(items) == limit:
                    return items
    return items


def load_pairs(split: str, limit: int, bias: str | Path | BiasSpec = "gender") -> list[StatementItem]:
    """Up to `limit` mined pairs of the corpus's `split` ("train" or "validation"); a clear error when none."""
    spec = load_bias_spec(bias)
    if limit < 1:
        raise ValueError(f"data.cda_pairs must be >= 1 when objective.cda > 0, got {limit}")
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
    items = mine_pairs(spec, passages(), limit, split)
    if not items:
        raise ValueError(f"no counterfactual pair of bias {spec.name!r} in the {split} corpus (no sentence names "
                         "exactly one group with swappable words); set objective.cda to 0")
    return items
