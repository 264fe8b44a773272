"""Each method's own options (`model.edit.options`): a dataclass beside the method's builder (`lora.LoraOptions`,
`inference.ClampOptions`, ...), registered with it (`registry.Method.options`) and built here from the mapping a
config gives, before any model loads. The mapping is keyed by method, so one config can carry the options of the
methods `debias compare` runs beside its own; the run's method uses its entry (or its defaults):

    model:
      edit:
        method: lora
        options:
          lora: {rank: 8}
          steering_vector: {alpha: -9.55}

Every entry is checked: a method that takes no options, a key its dataclass lacks (naming the methods that take it)
or a bad value is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

FLAG = "model.edit.options"


class OptionError(ValueError):
    """An options dataclass's problems (`refuse`), each naming the option without its method."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def finite(name: str, value: Any, optional: bool = False) -> str | None:
    """The problem with option `name` when it is not a finite number (nor None, when `optional`), or None."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a finite number{' or null' if optional else ''}, got {value!r}"
    return None


def refuse(*problems: str | None) -> None:
    """An options dataclass's check (its `__post_init__`): raise every problem given at once."""
    found = [p for p in problems if p]
    if found:
        raise OptionError(found)


def keys(cls: type | None) -> list[str]:
    """The option names of an options dataclass ([] for a method without options)."""
    return [f.name for f in fields(cls)] if cls is not None else []


def build(method: str, given: Any, table: Mapping[str, type | None]) -> tuple[Any, list[str]]:
    """(`method`'s options: its `table` dataclass built from its entry of `given`, its defaults without one, None for
    a method without options; the problems of every entry, one line each).

    `given`: {method name: {option: value}} (None: no entry); `table`: every registered method's options class."""
    given = {} if given is None else given
    if not isinstance(given, Mapping) or is_dataclass(given):
        return None, [f"{FLAG} must map method names to their options, e.g. {{lora: {{rank: 8}}}}; got {given!r}"]
    built, problems = {}, []
    for name, entry in given.items():
        option, problem = _entry(name, entry, table)
        built[name] = option
        problems += problem
    cls = table.get(method)
    chosen = built.get(method) if method in given else cls() if cls is not None else None
    return chosen, problems


def _owners(key: str, table: Mapping[str, type | None]) -> list[str]:
    return [name for name, cls in table.items() if key in keys(cls)]


def _entry(name: str, entry: Any, table: Mapping[str, type | None]) -> tuple[Any, list[str]]:
    """One method's options built from its entry, and the entry's problems."""
    with_options = [n for n, cls in table.items() if cls is not None]
    if name not in table:
        owners = _owners(name, table)
        if owners:  # a flat option, as the old keys were: `options: {rank: 8}`
            return None, [f"{FLAG}.{name}: options are given per method, e.g. {FLAG}: {{{owners[0]}: {{{name}: "
                          f"{entry}}}}} ({name!r} is an option of {owners})"]
        return None, [f"{FLAG}.{name}: no registered method is called {name!r}; the methods with options are "
                      f"{with_options}"]
    if entry is None:
        entry = {}
    if not isinstance(entry, Mapping):
        return None, [f"{FLAG}.{name} must be a mapping of method {name!r}'s options {keys(table[name])}, "
                      f"got {entry!r}"]
    cls, expected = table[name], keys(table[name])
    problems = []
    for key in (k for k in entry if k not in expected):
        owners = [o for o in _owners(key, table) if o != name]
        takes = f"its options are {expected}" if expected else "it takes no options"
        where = f"; {key!r} is an option of {owners}" if owners else ""
        problems.append(f"{FLAG}.{name}.{key} was given, but method {name!r} has no option {key!r} ({takes}{where})")
    if problems or cls is None:
        return None, problems
    try:
        return cls(**entry), []
    except OptionError as err:
        return None, [f"{FLAG}.{name}.{problem}" for problem in err.problems]
