"""The documentation lists what the registry holds, so it cannot fall behind the code."""

from pathlib import Path

from manytask import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_balancer_is_in_the_method_table():
    text = (DOCS / "balancing.md").read_text(encoding="utf-8")
    table = text[text.index("## Method table") :]
    missing = [name for name in registry.names("balancer") if f"`{name}`" not in table]
    assert not missing, f"add these methods to docs/balancing.md: {missing}"


def test_every_balancer_summary_names_its_source():
    for entry in registry.entries("balancer"):
        assert "(" in entry.summary or entry.name == "ew", entry
