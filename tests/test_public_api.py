"""The lazy public API (`debias.__getattr__`): every name in `__all__` resolves, and the `TYPE_CHECKING` imports that
mypy and IDEs read name the same objects from the same modules."""

import ast
import importlib
from pathlib import Path

import pytest

import debias

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", debias.__all__)
def test_every_public_name_resolves(name):
    value = getattr(debias, name)
    assert value is getattr(importlib.import_module(debias._EXPORTS[name]), name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        debias.nope  # noqa: B018


def test_type_checking_imports_match_the_lazy_table():
    tree = ast.parse((ROOT / "debias" / "__init__.py").read_text())
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    seen = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == debias._EXPORTS
    assert sorted(debias.__all__) == sorted(seen) and sorted(dir(debias)) == sorted(seen)


def test_edit_record_comes_from_its_own_module():
    from debias.edits.record import EditRecord, apply_delta

    assert debias.EditRecord is EditRecord and debias.apply_delta is apply_delta
