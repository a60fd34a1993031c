"""The package's seams, read from the source (every import, those inside functions included):
the runtime never imports `prefixport.engines`, the adapters never import the runtime, and no
module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import prefixport

ROOT = Path(prefixport.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, names imported from it, line) for every import in the file."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if package else sorted(ROOT.rglob("*.py"))


def _importing(package: str, forbidden: str) -> list[str]:
    bad = []
    for path in _files(package):
        for module, names, line in _imports(path):
            targets = [module] + [f"{module}.{n}" for n in names]
            if any(t == forbidden or t.startswith(forbidden + ".") for t in targets):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {module}")
    return bad


def test_the_import_resolver_sees_relative_imports():
    imports = _imports(ROOT / "engines" / "build.py")
    assert any(module == "prefixport.runtime.limits" and names == ["Limits"] for module, names, _ in imports)


@pytest.mark.parametrize("package,forbidden", [("runtime", "prefixport.engines"),
                                               ("adapters", "prefixport.runtime")])
def test_no_package_cycle(package, forbidden):
    """engines/ builds on the runtime, the runtime on adapters/: never the other way round."""
    assert _importing(package, forbidden) == []


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in _files(""):
        for module, names, line in _imports(path):
            if module.startswith("prefixport"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private or any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {private or module} from {module}")
    assert bad == []


@pytest.mark.parametrize("package", ["server", "bench", "engines", "adapters", "cli.py"])
def test_no_private_attribute_of_another_object(package):
    """`obj._name` only on `self` or `cls`: other objects are used through their public names."""
    bad = []
    for path in ([ROOT / package] if package.endswith(".py") else _files(package)):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} .{node.attr}")
    assert bad == []


@pytest.mark.parametrize("package", ["benchmarks", "tools"])
def test_scripts_share_code_through_their_packages(package):
    """benchmarks/ (the comparisons) and tools/ (the fuzzers, the soak) are packages run as
    `python -m benchmarks.NAME` or `python -m tools.NAME`: no sys.path edits, no sibling imported by
    its bare file name (shared code is `benchmarks.common` and the like), and no private name
    imported from another module."""
    folder = ROOT.parent / package
    siblings = {p.stem for p in folder.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    bad = []
    for path in sorted(folder.rglob("*.py")):
        where = path.relative_to(ROOT.parent)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                bad.append(f"{where}:{node.lineno} uses sys.path")
        for module, names, line in _imports(path):
            if module.split(".")[0] in siblings:
                bad.append(f"{where}:{line} imports {module} by its file name, not as {package}.{module}")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                bad.append(f"{where}:{line} imports {private or module} from {module}")
    assert bad == []
