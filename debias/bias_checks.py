"""Checks of a parsed bias spec (see `debias.bias_spec`): every problem is collected with the key it concerns
("contexts.female.validation: empty list ...") so that one error lists them all."""

from __future__ import annotations

import re
import reprlib
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

SPLITS = ("train", "validation", "heldout")
CONTEXT_FIELDS = frozenset({"profession", "a_profession", "A_profession", "context", "a_context", "A_context"})
RELATIVE_FIELD = "relative"
SUBJECT_FIELDS = frozenset({"subject", "Subject"})
TOP_KEYS = ("description", "groups", "swaps", "contexts", "attributes", "templates", "cues", "factual", "statements",
            "domains")
REQUIRED_KEYS = TOP_KEYS[1:-2]  # `statements` and `domains` are optional
ATTRIBUTE_KEYS = ("text", "plural", "domain")
FACTUAL_KEYS = ("prompt", "target", "group", "kind")


class BiasSpecError(ValueError):
    """A bias spec file that does not hold what the format asks for (the message lists every problem)."""


@lru_cache(maxsize=64)
def word_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    """Any of `words` as a whole word, any case (not inside a longer word; "mother's" and "mother-in-law" match
    "mother", "grandmother" does not)."""
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


_SHORT = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def _kind(value: Any) -> str:
    """A short description of a bad value; bounded however large (or self-referencing) the value is."""
    return "nothing" if value is None else f"{type(value).__name__} {_SHORT.repr(value)}"[:80]


def _normal(text: str) -> str:
    """Text compared for repeats: lower case, letters and digits only ("Is bad at math." == "is bad at math")."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | None = None,
                required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(key or "(top level)", f"expected a mapping, got {_kind(value)}")
            return {}
        prefix = f"{key}." if key else ""
        for k in value:
            if allowed is not None and k not in allowed:
                self.fail(f"{prefix}{k}", f"unknown key; expected one of {list(allowed)}")
        for k in required:
            if k not in value:
                self.fail(f"{prefix}{k}", "missing")
        return {k: v for k, v in value.items() if allowed is None or k in allowed}

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected a non-empty string (quote it in YAML), got {_kind(value)}")
            return ""
        return value

    def strings(self, value: Any, key: str) -> list[str]:
        if not isinstance(value, list) or not value:
            got = "an empty list" if value == [] else _kind(value)
            self.fail(key, f"expected a non-empty list of strings, got {got}")
            return []
        items = [self.text(v, f"{key}[{i}]") for i, v in enumerate(value)]
        dups = sorted(v for v, n in Counter(items).items() if v and n > 1)
        if dups:
            self.fail(key, f"expected distinct items, got repeats {dups}")
        return [v for v in items if v]

    def splits(self, value: Any, key: str) -> dict[str, list[str]]:
        """A train / validation / heldout mapping of non-empty lists that share no item."""
        raw = self.mapping(value, key, SPLITS, SPLITS)
        out = {s: self.strings(raw[s], f"{key}.{s}") for s in SPLITS if s in raw}
        self.disjoint(key, out)
        return out

    def disjoint(self, key: str, out: dict[str, list]) -> None:
        """A problem for each pair of splits that share an item."""
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1:]:
                other = set(out.get(b, []))
                shared = [item for item in out.get(a, []) if item in other]
                if shared:
                    self.fail(key, f"expected disjoint splits, but {a} and {b} share {shared}")

    def split_rows(self, value: Any, key: str, what: str):
        """(split, key of the row, row) for each row of a train / validation / heldout mapping of non-empty
        lists; `what` describes a row for the error."""
        for split, rows in self.mapping(value, key, SPLITS, SPLITS).items():
            if not isinstance(rows, list) or not rows:
                self.fail(f"{key}.{split}", f"expected a non-empty list of {what}, got {_kind(rows)}")
                continue
            for i, row in enumerate(rows):
                yield split, f"{key}.{split}[{i}]", row

    def per_group(self, value: Any, key: str, groups: list[str]) -> dict[str, dict[str, list[str]]]:
        raw = self.mapping(value, key, tuple(groups), tuple(groups))
        return {g: self.splits(raw[g], f"{key}.{g}") for g in groups if g in raw}


def _groups(c: _Checker, raw: Any) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    groups = c.mapping(raw, "groups")
    if isinstance(raw, dict) and len(raw) < 2:
        c.fail("groups", f"expected two or more groups, got {len(raw)} {list(raw)}")
    targets, extra = {}, {}
    for g, body in groups.items():
        body = c.mapping(body, f"groups.{g}", ("target", "words"), ("target",))
        targets[g] = c.text(body.get("target"), f"groups.{g}.target") if "target" in body else ""
        extra[g] = c.strings(body["words"], f"groups.{g}.words") if "words" in body else []
    seen = [t for t in targets.values() if t]
    if len(set(seen)) < len(seen):
        c.fail("groups", f"expected a different target per group, got {targets}")
    return list(groups), targets, extra


def _swaps(c: _Checker, raw: Any, groups: list[str]) -> tuple[list[dict[str, str]], dict]:
    if not isinstance(raw, list) or not raw:
        c.fail("swaps", f"expected a non-empty list of rows {{group: word, ...}}, got {_kind(raw)}")
        return [], {}
    rows = []
    for i, row in enumerate(raw):
        body = c.mapping(row, f"swaps[{i}]", tuple(groups))
        words = {g: c.text(body[g], f"swaps[{i}].{g}") for g in groups if g in body}
        missing = [g for g in groups if g not in body]
        if missing:
            c.fail(f"swaps[{i}]", f"{sorted(words.values()) or 'the row'} has no partner in group(s) {missing}; "
                   f"expected one word for each of {groups}")
        if not missing and all(words.values()):
            rows.append(words)
    partners: dict[tuple[str, str], dict[str, list[str]]] = {}
    for src in groups:
        for dst in groups:
            if src != dst:
                table = partners.setdefault((src, dst), {})
                for row in rows:
                    cands = table.setdefault(row[src].lower(), [])
                    if row[dst] not in cands:
                        cands.append(row[dst])
                for word, cands in table.items():
                    if len(cands) > 2:
                        c.fail("swaps", f"{word!r} of group {src!r} has {len(cands)} partners in {dst!r} {cands}; "
                               "expected at most two (the one before a content word first, then the other)")
    return rows, partners


def _vocabulary(c: _Checker, groups: list[str], rows: list[dict[str, str]],
                extra: dict[str, list[str]]) -> dict[str, list[str]]:
    words = {g: list(dict.fromkeys([r[g] for r in rows] + extra.get(g, []))) for g in groups}
    owner: dict[str, str] = {}
    for g in groups:
        for w in words[g]:
            other = owner.setdefault(w.lower(), g)
            if other != g:
                c.fail("swaps", f"{w!r} is a word of both {other!r} and {g!r}; expected each word in one group")
    return words


def group_words_in(words: Mapping[str, Sequence[str]], text: str) -> dict[str, list[str]]:
    """The words of each group (`words`: group -> words) that `text` contains, as written."""
    owner = {w.lower(): g for g, ws in words.items() for w in ws}
    found: dict[str, list[str]] = {}
    if owner:
        for m in word_pattern(tuple(owner)).finditer(text):
            found.setdefault(owner[m.group(0).lower()], []).append(m.group(0))
    return found


def _no_group_words(c: _Checker, key: str, lists: dict[str, list[str]], words: dict[str, list[str]]) -> None:
    for split, items in lists.items():
        for item in items:
            if found := group_words_in(words, item):
                c.fail(f"{key}.{split}", f"{item!r} names {found} (group words from the swap list / words); "
                       "expected no group word here: a group word is a cue, not a stereotype")


def _templates(c: _Checker, lists: dict[str, list[str]], key: str, kind: str) -> None:
    """`kind`: "gap" (a context placeholder), "cue" (also {relative}) or "statement" (one subject placeholder)."""
    fields = SUBJECT_FIELDS if kind == "statement" else CONTEXT_FIELDS
    allowed = fields | {RELATIVE_FIELD} if kind == "cue" else fields
    need = {"gap": "a context placeholder", "cue": "{relative} and a context placeholder",
            "statement": "one subject placeholder"}[kind]
    for split, items in lists.items():
        for t in items:
            try:
                fields_ = [(n, spec, conv) for _, n, spec, conv in string.Formatter().parse(t) if n is not None]
            except ValueError as err:
                c.fail(f"{key}.{split}", f"{t!r} is not a valid template ({err})")
                continue
            if any(spec or conv for _, spec, conv in fields_):
                c.fail(f"{key}.{split}", f"{t[:80]!r} has a format spec or conversion (`{{name:...}}` / `{{name!r}}`); "
                       "expected plain placeholders such as {profession}")
                continue
            parsed = [n for n, _, _ in fields_]
            names = set(parsed)
            if (names - allowed or not names & fields or (kind == "cue" and RELATIVE_FIELD not in names)
                    or (kind == "statement" and len(parsed) != 1)):
                c.fail(f"{key}.{split}", f"{t!r} has placeholders {sorted(parsed)}; expected {need} "
                       f"({sorted(fields)}) and nothing else")
            if t != t.rstrip():
                c.fail(f"{key}.{split}", f"{t!r} ends with a space; expected none (targets carry their own)")


def _factual(c: _Checker, raw: Any, groups: list[str], words: dict[str, list[str]],
             partners: Mapping[tuple[str, str], Mapping[str, list[str]]]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    seen: dict[str, str] = {}  # normalised prompt -> the key where it first appeared
    for split, key, item in c.split_rows(raw, "factual", "{prompt, target, group}"):
        out.setdefault(split, [])
        body = c.mapping(item, key, FACTUAL_KEYS, FACTUAL_KEYS[:3])
        prompt, target, group = (c.text(body[k], f"{key}.{k}") if k in body else ""
                                 for k in ("prompt", "target", "group"))
        kind = c.text(body["kind"], f"{key}.kind") if "kind" in body else ""
        if prompt and (first := seen.setdefault(_normal(prompt), key)) != key:
            c.fail(f"{key}.prompt", f"{prompt!r} repeats {first}; expected each factual prompt once, in one split")
        if group and group not in groups:
            c.fail(f"{key}.group", f"unknown group {group!r}; expected one of {groups}")
        elif prompt and target and group:
            in_prompt, in_target = group_words_in(words, prompt), group_words_in(words, target)
            wrong = {g: ws for g, ws in in_target.items() if g != group}
            if wrong:
                c.fail(key, f"target {target!r} names {wrong}, word(s) of another group in the swap "
                       f"list, but the statement is for {group!r}; expected a target naming {group!r}")
            elif group not in in_target:
                c.fail(key, f"target {target!r} names no word of {group!r}; expected one (the "
                       "statement is kept by a KL at that token)")
            if group not in in_prompt:
                c.fail(key, f"prompt {prompt!r} names no word of {group!r}; expected one")
            if group in in_target:
                true_word = in_target[group][0]
                lonely = [g for g in groups if g != group and true_word.lower() not in partners.get((group, g), {})]
                if lonely:
                    c.fail(f"{key}.target", f"the true word {true_word!r} has no swap partner in {lonely}; expected a "
                           "`swaps` row for it (the margin compares it with its partner)")
            out[split].append((prompt, target, group, kind))
    return out
