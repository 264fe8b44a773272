"""Neutral text at scale for the preservation KL (`objective.kl`): single sentences of the SAE's offline corpus
(`debias.sae.corpus`, train passages only) that name no group of the bias spec.

The shipped `neutral_train.txt` holds 40 project-written texts (32 train, 8 validation); at `objective.kl` 300 a
handful of batches cycling every few steps is what the edit learns to keep. `data.neutral_train: corpus:N` draws N
sentences instead: the first sentence of `MIN_WORDS`..`MAX_WORDS` words with no group word (the spec's swap list and
`words`, whole words in any case) from each corpus passage in the corpus's fixed order, so the draw is a fixed
function of the corpus and the spec. The corpus holds no evaluation suite and no held-out prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

from debias.bias_checks import group_words_in
from debias.bias_spec import BiasSpec, load_bias_spec
from debias.cda import sentences
from debias.sae.corpus import split_passages

MIN_WORDS, MAX_WORDS = 10, 25
PREFIX = "corpus:"


def corpus_count(source: str, key: str = "neutral_train") -> int | None:
    """N of a `corpus:N` source (None for any other source); raises, naming `data.{key}` and the value, on a bad N."""
    if not source.startswith(PREFIX):
        return None
    n = source[len(PREFIX):]
    if not re.fullmatch(r"[0-9]+", n) or int(n) < 2:
        raise ValueError(f"data.{key} {source!r}: expected corpus:N with N an integer >= 2 (N sentences of the SAE's "
                         "offline corpus that name no group)")
    return int(n)


def neutral_sentences(bias: str | Path | BiasSpec, n: int) -> list[str]:
    """`n` corpus sentences that name no group of `bias` (see the module doc); raises if the corpus has fewer."""
    spec = bias if isinstance(bias, BiasSpec) else load_bias_spec(bias)
    out: list[str] = []
    for passage in split_passages("train"):
        for sentence in sentences(passage):
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and not group_words_in(spec.words, sentence):
                out.append(sentence)
                break
        if len(out) == n:
            return out
    raise ValueError(f"data.neutral_train 'corpus:{n}': the corpus has only {len(out)} passages with a sentence of "
                     f"{MIN_WORDS}-{MAX_WORDS} words naming no group of bias {spec.name!r}; ask for fewer")
