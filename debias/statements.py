"""Sentence-level data of a bias spec: stereotype statements and factual statements, as counterfactual items.

A statement item is one prefix template filled with one row of counterfactual subjects, followed by one
attribute phrase: "In my experience, my sister" / "... my brother" + " is bad at math.". Its log-likelihood is
the attribute's, given each group's prefix, so the subject word's own frequency drops out. Every template of a
split is combined with every subject row and every attribute phrase (of every group) of that split.

A factual item is a statement an edit must keep ("My mother is a" + " woman"), with the partner words of the
other groups (" man") that the margin compares it with.
"""

from __future__ import annotations

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


def load_statements(split: str, bias: str | Path | BiasSpec = "gender") -> list[StatementItem]:
    """Every template x subject row x attribute of `split` (train / validation / heldout), in file order."""
    spec = _spec_with_statements(bias)
    items = []
    for template in spec.statement_templates[split]:
        for row in spec.subjects[split]:
            prefixes = tuple(_fill(template, row[g]) for g in spec.groups)
            for index, group in enumerate(spec.groups):
                items += [StatementItem(prefixes, attribute, index) for attribute in spec.attributes[group][split]]
    return items


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
