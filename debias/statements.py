"""Sentence-level data of a bias spec: stereotype statements and factual statements, as counterfactual items.

A statement item is one prefix template filled with one row of counterfactual subjects, followed by one
attribute phrase: "In my experience, my sister" / "... my brother" + " is bad at math.". Its log-likelihood is
the attribute's, given each group's prefix, so the subject word's own frequency drops out. Each attribute phrase
(of every group) of a split is paired with a seeded sample of that split's template x subject-row combinations.

A factual item is a statement an edit must keep ("My mother is a" + " woman"), with the partner words of the
other groups (" man") that the margin compares it with.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from debias.bias_checks import word_pattern
from debias.bias_spec import BiasSpec, load_bias_spec, swap


class StatementItem(NamedTuple):  # a NamedTuple: Lightning moves batches with apply_to_collection (no frozen dataclass)
    """One attribute after each group's prefix; `group` indexes the group the attribute stereotypes."""

    prefixes: tuple[str, ...]  # one per group, in the spec's group order
    attribute: str
    group: int
    domain: str = ""  # the attribute's domain tag ("" when the spec has none)


class FactualItem(NamedTuple):
    """`context` + `words[group]` is true ("My mother is a" + " woman"); `words` holds each group's word."""

    context: str
    words: tuple[str, ...]  # one per group, leading space included
    group: int


def statement_texts(items: list[StatementItem]) -> tuple[list[str], list[str]]:
    """(contexts, continuations) that score `items`: each item's prefixes in group order, item-major, each with
    the item's attribute."""
    return [p for item in items for p in item.prefixes], [item.attribute for item in items for _ in item.prefixes]


def item_groups(items: list[StatementItem] | list[FactualItem]) -> torch.Tensor:
    """[n] long: the group index of each item."""
    return torch.tensor([item.group for item in items], dtype=torch.long)


def _fill(template: str, subject: str) -> str:
    return template.format(subject=subject, Subject=subject[:1].upper() + subject[1:])


def _spec_with_statements(bias: str | Path | BiasSpec) -> BiasSpec:
    spec = load_bias_spec(bias)
    if not spec.subjects:
        raise ValueError(f"bias spec {spec.path} has no `statements` (templates and subjects); the sentence-level "
                         "gap and the counterfactual term need them (format: debias/data/biases/README.md)")
    return spec


#: How many (template, subject row) pairings each attribute phrase gets per split: every template x row x phrase
#: would be 160 x 8 x 14 = 17,920 train statements for gender, most of them the same phrase again. A seeded sample
#: per phrase keeps every phrase, template and row in play at a size that a mask pass or an evaluation can afford.
PAIRINGS = {"train": 8, "validation": 3, "heldout": 6}


def load_statements(split: str, bias: str | Path | BiasSpec = "gender", pairings: int | None = -1,
                    seed: int = 0) -> list[StatementItem]:
    """Statements of `split` (train / validation / heldout): attribute phrase x (template, subject row). Each phrase
    is paired with `pairings` (template, row) combinations drawn with `seed` (-1: `PAIRINGS[split]`; None: every
    combination). The order interleaves the groups and phrases (each group's first phrase, then each group's second,
    ...; then the next pairing), so any prefix of the list is balanced. A plural row ("women" / "men") takes the
    phrase's plural form.
    """
    spec = _spec_with_statements(bias)
    if pairings == -1:
        pairings = PAIRINGS.get(split)
    templates, rows = spec.statement_templates[split], spec.subjects[split]
    plural = spec.subject_plural.get(split, ())
    combos = tuple((t, r) for t in range(len(templates)) for r in range(len(rows)))
    per_group = [spec.attributes[g][split] for g in spec.groups]
    chosen = {a: _sample(a, combos, pairings, seed) for phrases in per_group for a in phrases}
    items = []
    for j in range(max(len(c) for c in chosen.values())):
        for i in range(max(map(len, per_group))):
            for index, phrases in enumerate(per_group):
                if i >= len(phrases) or j >= len(chosen[phrases[i]]):
                    continue
                attribute, (t, r) = phrases[i], chosen[phrases[i]][j]
                prefixes = tuple(_fill(templates[t], rows[r][g]) for g in spec.groups)
                text = spec.attribute_plurals[attribute] if r < len(plural) and plural[r] else attribute
                items.append(StatementItem(prefixes, text, index, spec.attribute_domains.get(attribute, "")))
    return items


@lru_cache(maxsize=65536)
def _sample(attribute: str, combos: tuple[tuple[int, int], ...], pairings: int | None,
            seed: int) -> tuple[tuple[int, int], ...]:
    """A seeded choice of `pairings` combinations for one phrase, in template-major order: the same on every
    machine (a str seed hashes with sha512, not with Python's randomised `hash`)."""
    if pairings is None or pairings >= len(combos):
        return combos
    return tuple(sorted(random.Random(f"{seed}:{attribute}").sample(combos, pairings)))


def load_factual(split: str, bias: str | Path | BiasSpec = "gender") -> list[FactualItem]:
    """The factual statements of `split`, cut at their group word, with each other group's partner word."""
    spec = load_bias_spec(bias)
    items = []
    for statement in spec.factual[split]:
        text = statement.prompt + statement.target
        match = word_pattern(tuple(spec.words[statement.group])).search(text, len(statement.prompt))
        assert match is not None  # the spec's checks require a word of the group in the target
        word = match.group(0)
        words = tuple(" " + (word if g == statement.group else swap(word, spec, to=g)) for g in spec.groups)
        unswapped = [g for g, w in zip(spec.groups, words, strict=True) if g != statement.group and w == " " + word]
        if unswapped:
            raise ValueError(f"{spec.path}: factual target word {word!r} ({statement.group}) has no swap partner in "
                             f"{unswapped}; expected a `swaps` row for it")
        items.append(FactualItem(text[:match.start()].rstrip(), words, spec.groups.index(statement.group)))
    return items
