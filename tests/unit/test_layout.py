"""docs/layout.md names every module of the package, of benchmarks/ and of tools/ (issue 35: the map
a new engineer reads first stays true). A module is named by its file name, or by its stem in a line
listing several, within its folder's block of the map (from the line starting `FOLDER/` to the next
line starting at the margin), so that a benchmark is not counted as named because a package module
of the same stem is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def block(layout: str, folder: str) -> str:
    """The lines of `folder`'s block in the map: its own line and those indented under it."""
    lines = layout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{folder}/")), None)
    assert start is not None, f"docs/layout.md has no block for {folder}/"
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in (" ", "")), len(lines))
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("folder", ["prefixport", "benchmarks", "tools"])
def test_layout_names_every_module(folder):
    named = block((ROOT / "docs" / "layout.md").read_text(), folder)
    missing = [str(path.relative_to(ROOT)) for path in sorted((ROOT / folder).rglob("*.py"))
               if path.name != "__init__.py"
               and not re.search(rf"(?<![\w.]){re.escape(path.stem)}(\.py)?\b", named)]
    assert not missing, f"docs/layout.md does not name {', '.join(missing)}: add a line saying what each holds"


def test_layout_names_no_module_that_is_gone():
    """Every `NAME.py` the benchmarks/ and tools/ blocks name exists (a removed script leaves the map)."""
    layout = (ROOT / "docs" / "layout.md").read_text()
    gone = [f"{folder}: {name}" for folder in ("benchmarks", "tools")
            for name in re.findall(r"(?<![\w./])(\w+)\.py\b", block(layout, folder))
            if not any((ROOT / folder).rglob(f"{name}.py"))]
    assert not gone, f"docs/layout.md names modules that do not exist: {', '.join(gone)}"
