"""`check_spec`: every check of a parsed bias spec, collected at once (`debias.bias_checks` holds the checker and
the checks of groups, swaps, templates and factual statements; this module adds the sentence-level lists: attribute
phrases with their domains and plural forms, and statement subject rows)."""

from __future__ import annotations

from typing import Any

from debias.bias_checks import (
    ATTRIBUTE_KEYS,
    REQUIRED_KEYS,
    TOP_KEYS,
    _Checker,
    _factual,
    _groups,
    _kind,
    _no_group_words,
    _normal,
    _swaps,
    _templates,
    _vocabulary,
    group_words_in,
)


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
    if "swaps" in top and not rows:  # every word check below reads the swap vocabulary: it would only echo this
        return {}, c.problems
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
