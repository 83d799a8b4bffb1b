"""docs/adapters.md and the method docstrings follow the registry, so they cannot fall behind."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import manytask.adapters  # noqa: F401 - registers the methods
from manytask import registry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"


def test_every_adapter_method_is_in_the_docs_table():
    text = DOCS.read_text(encoding="utf-8")
    table = text[text.index("## Methods") : text.index("### Notes on single methods")]
    missing = [name for name in registry.names("adapter") if f"| `{name}` |" not in table]
    assert not missing, f"add these methods to docs/adapters.md: {missing}"


@pytest.mark.parametrize("name", registry.names("adapter"))
def test_every_method_docstring_gives_formula_paper_and_defaults(name):
    entry = registry.entries("adapter")[registry.names("adapter").index(name)]
    doc = inspect.getdoc(entry.obj) or ""
    assert "arXiv:" in entry.summary, entry.summary  # the one-line summary names the paper
    assert ".. math::" in doc and "Defaults" in doc and "configuration" in doc.lower()
