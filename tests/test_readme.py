"""The README's library quickstart is executed as written, so it cannot go stale."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- quickstart:library.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no marked library quickstart"
    return match.group(1)


def test_readme_opens_with_the_two_make_commands():
    first_block = README.read_text(encoding="utf-8").split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_library_quickstart_runs(capsys):
    namespace: dict = {}
    exec(compile(quickstart(), str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "task weights:" in out
    summary = namespace["summary"]
    assert set(summary["test"]) == {"y1", "y2"}
    assert summary["epochs_run"] == 3
