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


def _subject_rows(c: _Checker, raw: Any, groups: list[str],
                  words: dict[str, list[str]]) -> tuple[dict[str, list[dict]], dict[str, list[bool]]]:
    """statements.subjects: per split, rows {group: subject naming that group only} (the counterfactual subjects),
    and whether each row is plural (`plural: true`: "women" / "men" take the attributes' plural forms)."""
    out: dict[str, list[dict]] = {}
    plural: dict[str, list[bool]] = {}
    first: dict[str, str] = {}  # normalised subject -> the split it first appeared in
    for split, key, row in c.split_rows(raw, "statements.subjects", "rows {group: subject, ...}"):
        out.setdefault(split, [])
        plural.setdefault(split, [])
        body = c.mapping(row, key, (*groups, "plural"), tuple(groups))
        subjects = {g: c.text(body[g], f"{key}.{g}") for g in groups if g in body}
        is_plural = body.get("plural", False)
        if not isinstance(is_plural, bool):
            c.fail(f"{key}.plural", f"expected true or false, got {_kind(is_plural)}")
        for g, subject in subjects.items():
            if subject and set(group_words_in(words, subject)) != {g}:
                c.fail(f"{key}.{g}", f"{subject!r} names {group_words_in(words, subject) or 'no group word'}; "
                       f"expected word(s) of {g!r} only (the subject carries the group)")
            if subject and (where := first.setdefault(_normal(subject), split)) != split:
                c.fail(f"{key}.{g}", f"{subject!r} is also a subject of the {where} split; expected disjoint splits")
        if len(subjects) == len(groups) and all(subjects.values()):
            out[split].append(subjects)
            plural[split].append(is_plural is True)
    return out, plural


def _domains(c: _Checker, raw: Any) -> dict[str, str]:
    """domains: name -> a one-line description; each attribute phrase is tagged with one of them."""
    body = c.mapping(raw, "domains")
    if isinstance(raw, dict) and not raw:
        c.fail("domains", "expected a non-empty mapping of domain name -> description, got an empty one")
    return {str(name): c.text(text, f"domains.{name}") for name, text in body.items()}


def _attributes(c: _Checker, raw: Any, groups: list[str], domains: dict[str, str] | None):
    """attributes: group -> split -> phrases, each a string or (required when the spec has `domains`)
    `{text, plural, domain}`. Returns (group -> split -> texts, text -> plural form, text -> domain)."""
    texts: dict[str, dict[str, list[str]]] = {}
    plurals: dict[str, str] = {}
    tags: dict[str, str] = {}
    seen: dict[str, str] = {}  # normalised phrase -> the key where it first appeared
    for g, per_split in c.mapping(raw, "attributes", tuple(groups), tuple(groups)).items():
        texts[g] = {}
        for split, key, item in c.split_rows(per_split, f"attributes.{g}", "phrases"):
            body = c.mapping(item, key, ATTRIBUTE_KEYS, ("text",)) if isinstance(item, dict) else {"text": item}
            text = c.text(body.get("text"), f"{key}.text" if isinstance(item, dict) else key)
            if not text:
                continue
            if (first := seen.setdefault(_normal(text), key)) != key:
                c.fail(key, f"{text!r} repeats {first}; expected each phrase once, in one group and one split")
                continue
            texts[g].setdefault(split, []).append(text)
            if "plural" in body and (form := c.text(body["plural"], f"{key}.plural")):
                plurals[text] = form
            domain = body.get("domain")
            if domains is None and domain is not None:
                c.fail(f"{key}.domain", f"{_kind(domain)} but the spec has no `domains`; expected a top-level "
                       "`domains:` mapping that declares it")
            elif domains is not None and domain is None:
                c.fail(key, f"{text!r} has no domain tag; expected `domain:` one of {sorted(domains)}")
            elif domains is not None and domain not in domains:
                c.fail(f"{key}.domain", f"unknown domain {_kind(domain)}; expected one of {sorted(domains)}")
            elif domain is not None:
                tags[text] = domain
    return texts, plurals, tags


def _plural_forms(c: _Checker, attributes: dict[str, dict[str, list[str]]], plurals: dict[str, str],
                  subject_plural: dict[str, list[bool]]) -> None:
    """A split with plural subject rows needs every attribute phrase of that split in its plural form too."""
    for g, per_split in attributes.items():
        for split, items in per_split.items():
            if any(subject_plural.get(split, [])):
                for text in items:
                    if text not in plurals:
                        c.fail(f"attributes.{g}.{split}", f"{text!r} has no `plural` form, but "
                               f"statements.subjects.{split} has plural rows; expected "
                               "{text: ..., plural: ...}")


def check_spec(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """The fields of a `BiasSpec` (less name and path) from parsed YAML, and every problem found."""
    c = _Checker()
    top = c.mapping(raw, "", TOP_KEYS, REQUIRED_KEYS)
    description = c.text(top["description"], "description") if "description" in top else ""
    groups, targets, extra = _groups(c, top.get("groups", {}))
    if len(groups) < 2:  # every other list is per group or pairs groups: checking them would only echo this
        return {}, c.problems
    rows, partners = _swaps(c, top.get("swaps", []), groups) if "swaps" in top else ([], {})
    words = _vocabulary(c, groups, rows, extra)
    contexts = c.per_group(top["contexts"], "contexts", groups) if "contexts" in top else {}
    domains = _domains(c, top["domains"]) if "domains" in top else None
    attributes, plurals, tags = _attributes(c, top["attributes"], groups, domains) if "attributes" in top \
        else ({}, {}, {})
    templates = c.splits(top["templates"], "templates") if "templates" in top else {}
    cues = c.mapping(top["cues"], "cues", ("templates", "relatives"), ("templates", "relatives")) \
        if "cues" in top else {}
    cue_templates = c.splits(cues["templates"], "cues.templates") if "templates" in cues else {}
    relatives = c.per_group(cues["relatives"], "cues.relatives", groups) if "relatives" in cues else {}
    factual = _factual(c, top["factual"], groups, words, partners) if "factual" in top else {}
    statements = c.mapping(top["statements"], "statements", ("templates", "subjects"), ("templates", "subjects")) \
        if "statements" in top else {}
    statement_templates = c.splits(statements["templates"], "statements.templates") if "templates" in statements else {}
    subjects, subject_plural = _subject_rows(c, statements["subjects"], groups, words) \
        if "subjects" in statements else ({}, {})
    _plural_forms(c, attributes, plurals, subject_plural)
    _templates(c, templates, "templates", "gap")
    _templates(c, cue_templates, "cues.templates", "cue")
    _templates(c, statement_templates, "statements.templates", "statement")
    for key, lists in (("templates", templates), ("cues.templates", cue_templates),
                       ("statements.templates", statement_templates)):
        _no_group_words(c, key, lists, words)
    for key, per in (("contexts", contexts), ("attributes", attributes)):
        for g, lists in per.items():
            _no_group_words(c, f"{key}.{g}", lists, words)
    if plurals:
        _no_group_words(c, "attributes", {"plural": list(plurals.values())}, words)
    for g, lists in relatives.items():
        for split, items in lists.items():
            for item in items:
                found = group_words_in(words, item)
                if set(found) != {g}:
                    c.fail(f"cues.relatives.{g}.{split}", f"{item!r} names {found or 'no group word'}; expected "
                           f"word(s) of {g!r} only (the relative is the explicit cue)")
    fields = dict(description=description, groups=groups, targets=targets, words=words, swaps=rows,
                  contexts=contexts, attributes=attributes, templates=templates, cue_templates=cue_templates,
                  cue_relatives=relatives, factual=factual, statement_templates=statement_templates,
                  subjects=subjects, subject_plural=subject_plural, domains=domains or {},
                  attribute_plurals=plurals, attribute_domains=tags, partners=partners)
    return fields, c.problems
