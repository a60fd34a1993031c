"""docs/layout.md names every module of the package (issue 35: the map a new engineer reads first
stays true). A module is named by its file name, or by its stem in a line listing several."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_layout_names_every_module_of_the_package():
    layout = (ROOT / "docs" / "layout.md").read_text()
    missing = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "prefixport").rglob("*.py"))
               if path.name != "__init__.py"
               and not re.search(rf"(?<![\w.]){re.escape(path.stem)}(\.py)?\b", layout)]
    assert not missing, f"docs/layout.md does not name {', '.join(missing)}: add a line saying what each holds"
