"""A bias is data: one YAML spec per bias axis, its loader and the counterfactual `swap`.

A spec (`debias/data/biases/NAME.yaml`, format in that folder's README) names two or more groups, each with the
target token of next-token gaps (gender: " she" / " he"); counterfactual swap rows (one word per group); the
stereotyped contexts and attribute phrases of each group; gap templates; explicit-cue templates and relatives;
factual statements an edit must keep; and (optional) sentence-level statement templates with rows of
counterfactual subjects ("In my experience, {subject}" x "my sister" / "my brother"). Every list comes in a
train, a validation and a held-out split.
`load_bias_spec` checks all of it and reports every problem at once, naming the file, the key and what was
expected, before any model loads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from debias.bias_checks import SPLITS, BiasSpecError, word_pattern
from debias.spec_check import check_spec

__all__ = ["SPLITS", "BiasSpec", "BiasSpecError", "FactualStatement", "bias_spec_path", "default_bias_dir",
           "load_bias_spec", "swap"]

#: English closed-class words. A swap word with two partners takes the first when a word outside this set follows
#: (a content word: "her book" -> "his book") and the second otherwise ("told her that" -> "told him that").
FUNCTION_WORDS = frozenset("""
a an the this that these those my your our their its his her some any every each no all both either neither
to of in on at by for with from about into onto over under after before through during without around behind near
like than as up down out off away back and or but so because if when while whether although though since until
nor yet i you he she it we they me him us them who whom what which is was are were be been am has have had do
does did will would can could should may might must not very too again now then there here today yesterday
tomorrow really much more most once twice already still also just only even ever never always soon well
""".split())


#: A bias spec larger than this is refused before it is parsed (the shipped ones are about 40 KB).
MAX_SPEC_BYTES = 4_000_000


def default_bias_dir() -> Path:
    """The bias specs shipped with the package."""
    return Path(__file__).resolve().parent / "data" / "biases"


@dataclass(frozen=True)
class FactualStatement:
    """`prompt` + `target` is true of `group` ("My mother is" + " a woman."); an edit must keep it."""

    prompt: str
    target: str
    group: str
    kind: str = ""  # what sort of fact ("kinship", "title", ...): optional, for per-kind reports


@dataclass(frozen=True)
class BiasSpec:
    """One bias axis, checked. Per-split lists map split ("train" / "validation" / "heldout") -> items;
    per-group ones map group -> split -> items, groups in file order."""

    name: str
    path: Path
    description: str
    groups: tuple[str, ...]
    targets: Mapping[str, str]  # group -> next-token target text (" she")
    words: Mapping[str, tuple[str, ...]]  # group -> its words: swap words, then extra `words`
    swaps: tuple[Mapping[str, str], ...]  # rows: group -> word
    contexts: Mapping[str, Mapping[str, tuple[str, ...]]]
    attributes: Mapping[str, Mapping[str, tuple[str, ...]]]
    templates: Mapping[str, tuple[str, ...]]
    cue_templates: Mapping[str, tuple[str, ...]]
    cue_relatives: Mapping[str, Mapping[str, tuple[str, ...]]]
    factual: Mapping[str, tuple[FactualStatement, ...]]
    #: Sentence-level statements (optional; empty without a `statements` key): prefix templates with one
    #: `{subject}` / `{Subject}` placeholder, and rows of counterfactual subjects (group -> "my sister").
    statement_templates: Mapping[str, tuple[str, ...]]
    subjects: Mapping[str, tuple[Mapping[str, str], ...]]
    #: split -> per subject row: plural ("women" / "men": the attributes' plural forms follow it).
    subject_plural: Mapping[str, tuple[bool, ...]]
    #: Optional domain tags of the attribute phrases: domain -> description, and phrase -> its domain.
    domains: Mapping[str, str]
    attribute_domains: Mapping[str, str]
    #: phrase -> its plural form (" is bad at math." -> " are bad at math."), where given.
    attribute_plurals: Mapping[str, str]
    #: (from group, to group) -> lower-case word -> its partners in the other group (one or two, row order).
    partners: Mapping[tuple[str, str], Mapping[str, tuple[str, ...]]] = field(repr=False)

    def domains_only_in(self, split: str) -> tuple[str, ...]:
        """Domains whose phrases appear in `split` and in no other split (held-out: the domains train never saw)."""
        where: dict[str, set[str]] = {}
        for per_split in self.attributes.values():
            for s, texts in per_split.items():
                for text in texts:
                    if text in self.attribute_domains:
                        where.setdefault(self.attribute_domains[text], set()).add(s)
        return tuple(d for d in self.domains if where.get(d) == {split})


def bias_spec_path(name_or_path: str | Path) -> Path:
    """A shipped spec's file for a bare name ("gender"), else the path itself; errors list the shipped names."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1:
        if not candidate.is_file():
            raise FileNotFoundError(f"bias spec file not found: {candidate}")
        return candidate
    path = default_bias_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in default_bias_dir().glob("*.yaml"))
        raise ValueError(f"unknown bias {str(name_or_path)!r}: expected one of the shipped specs {shipped} "
                         "or a path to a .yaml file")
    return path


def load_bias_spec(name_or_path: str | Path | BiasSpec) -> BiasSpec:
    """The checked spec of a shipped bias name or a YAML path (a `BiasSpec` is returned as is)."""
    if isinstance(name_or_path, BiasSpec):
        return name_or_path
    path = bias_spec_path(name_or_path).resolve()
    stat = path.stat()
    return _load(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _load(path: Path, mtime_ns: int, size: int) -> BiasSpec:
    if size > MAX_SPEC_BYTES:
        raise BiasSpecError(f"bias spec {path} is {size:,} bytes; expected at most {MAX_SPEC_BYTES:,}")
    text = path.read_text(encoding="utf-8")
    try:
        _refuse_aliases(text, path)
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as err:
        raise BiasSpecError(f"bias spec {path}, {err}") from None
    except yaml.YAMLError as err:
        raise BiasSpecError(f"bias spec {path}: not valid YAML: {err}") from err
    fields, problems = check_spec(raw)
    if len(problems) == 1:
        raise BiasSpecError(f"bias spec {path}: {problems[0]}")
    if problems:
        listed = "\n".join(f"  {p}" for p in problems)
        raise BiasSpecError(f"bias spec {path} has {len(problems)} problem(s):\n{listed}")
    fields["factual"] = {split: [FactualStatement(*row) for row in rows] for split, rows in fields["factual"].items()}
    return BiasSpec(name=path.stem, path=path, **_frozen(fields))


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error: PyYAML keeps the last value
    silently, so a second `attributes:` would replace the first list unseen (PyYAML has no option for this)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key is refused by the safe loader itself
            if key in seen:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping; "
                                    "expected each key once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _refuse_aliases(text: str, path: Path) -> None:
    """YAML aliases (`*name`) let a few KB expand into a structure that every later walk visits billions of times
    (the "billion laughs"); a spec needs none, so they are refused while scanning, before anything is built."""
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, yaml.AliasToken):
            mark = token.start_mark
            raise BiasSpecError(f"bias spec {path}, line {mark.line + 1}: YAML alias *{token.value}; expected plain "
                                "values (aliases and anchors are not supported in a bias spec)")


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def swap(text: str, spec: BiasSpec, to: str | None = None) -> str:
    """The counterfactual of `text`: every swap word of a group replaced by its partner.

    With two groups and `to=None`, words of each group become the other group's ("She told her brother" ->
    "He told his sister"); with `to=GROUP` (required for three or more groups), words of every other group become
    GROUP's and GROUP's own words stay. Words match whole and in any case; the replacement copies the case
    (`she` -> `he`, `She` -> `He`, `SHE` -> `HE`); a possessive or hyphenated suffix stays ("mother's" ->
    "father's", "mother-in-law" -> "father-in-law").

    Ambiguity rule: a word listed in two swap rows has two partners, in row order. The first is used when the next
    word is a content word (anything but the closed-class `FUNCTION_WORDS`, digits included), the second before a
    function word, punctuation or the end of the text: "her book" -> "his book", "told her that" -> "told him
    that", "I saw her." -> "I saw him."; back, "his book" -> "her book", "the book is his." -> "the book is hers.".
    """
    if to is None:
        if len(spec.groups) != 2:
            raise ValueError(f"bias {spec.name!r} has {len(spec.groups)} groups {list(spec.groups)}: "
                             "pass to=GROUP to say which group the counterfactual should name")
        first, second = spec.groups
        directions = [(first, second), (second, first)]
    elif to not in spec.groups:
        raise ValueError(f"unknown group {to!r} for bias {spec.name!r}; expected one of {list(spec.groups)}")
    else:
        directions = [(g, to) for g in spec.groups if g != to]
    table = {word: cands for d in directions for word, cands in spec.partners[d].items()}
    if not table:
        return text

    def replace(m: re.Match[str]) -> str:
        cands = table[m.group(0).lower()]
        word = cands[0] if len(cands) == 1 or _content_word_follows(text, m.end()) else cands[1]
        return _match_case(m.group(0), word)

    return word_pattern(tuple(table)).sub(replace, text)


def _content_word_follows(text: str, end: int) -> bool:
    nxt = re.match(r"\s+([A-Za-z0-9][\w'-]*)", text[end:])
    return nxt is not None and nxt.group(1).lower() not in FUNCTION_WORDS


def _match_case(source: str, word: str) -> str:
    if len(source) > 1 and source.isupper():
        return word.upper()
    if source[:1].isupper():
        return word[:1].upper() + word[1:]
    return word.lower() if source.islower() else word
