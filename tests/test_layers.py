"""nfed's packages form layers: a module may import only its own package and the layers below it.

The order and the rules are the ones each package's docstring states (README, "Architecture"). Imports are
read from the source with ast, both at module level and inside functions, so a lazy import cannot hide a
dependency that points up.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "nfed"

# Lowest first. A module may import any package earlier in this list and its own package.
LAYERS = ("common", "gpu", "core", "model", "data", "runs", "training", "federation", "report", "benchmarks",
          "app")
APP_MODULES = ("nfed", "nfed.cli", "nfed.demo", "nfed.commands")   # the application layer: CLI and demo


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to."""
    if module in APP_MODULES or module.startswith("nfed.commands."):
        return "app"
    package = module.split(".")[1]
    if package not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS (and the README)")
    return package


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def nfed_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported nfed module) for every import statement in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "nfed"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (nfed imports by absolute name)"
            if node.module and node.module.split(".")[0] == "nfed":
                found.append((node.lineno, node.module))
    return found


def import_violations() -> list[str]:
    """Every import of a layer above the importing module's own."""
    violations = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        importer = module_name(path)
        own = LAYERS.index(layer_of(importer))
        for line, imported in nfed_imports(path):
            if imported == "nfed":   # `from nfed import __version__`
                continue
            if LAYERS.index(layer_of(imported)) > own:
                violations.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {importer} "
                                  f"({layer_of(importer)}) imports {imported} ({layer_of(imported)})")
    return violations


def test_every_import_points_down_the_layers():
    violations = import_violations()
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_nfed_has_no_loose_modules_outside_the_layers():
    loose = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "demo.py"], loose


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a core module importing the federation layer is reported (inside a function too)."""
    fake = tmp_path / "nfed"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "sneaky.py").write_text("def f():\n    from nfed.federation.server import Federation\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE_DIR", fake)
    assert import_violations() == ["nfed/core/sneaky.py:2: nfed.core.sneaky (core) imports "
                                   "nfed.federation.server (federation)"]


@pytest.mark.parametrize("package", [name for name in LAYERS if name != "app"], ids=lambda name: f"nfed.{name}")
def test_every_layer_says_what_it_owns_and_may_import(package):
    docstring = ast.get_docstring(ast.parse((PACKAGE_DIR / package / "__init__.py").read_text()))
    assert docstring and "import" in docstring, f"nfed/{package}/__init__.py: say what it owns and may import"


FLOWER = "nfed.federation.flower"


def flower_violations() -> list[str]:
    """Imports of the Flower package from the rest of nfed.federation: Flower is an optional extra that sits on top
    of the federation (its server, clients and runners run without flwr), so only the layers above may use it."""
    violations = []
    for path in sorted((PACKAGE_DIR / "federation").rglob("*.py")):
        importer = module_name(path)
        if importer == FLOWER or importer.startswith(FLOWER + "."):
            continue
        violations += [f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {importer} imports {imported}"
                       for line, imported in nfed_imports(path)
                       if imported == FLOWER or imported.startswith(FLOWER + ".")]
    return violations


def test_the_rest_of_the_federation_never_imports_the_flower_package():
    violations = flower_violations()
    assert not violations, "nfed.federation imports its Flower package:\n" + "\n".join(violations)


def test_the_flower_rule_can_fail(tmp_path, monkeypatch):
    fake = tmp_path / "nfed"
    (fake / "federation" / "flower").mkdir(parents=True)
    (fake / "federation" / "flower" / "app.py").write_text("from nfed.federation.server import federate\n")
    (fake / "federation" / "server.py").write_text("def f():\n    from nfed.federation.flower.app import serve\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE_DIR", fake)
    assert flower_violations() == ["nfed/federation/server.py:2: nfed.federation.server imports "
                                   "nfed.federation.flower.app"]


def test_the_flower_package_says_what_it_owns_and_may_import():
    docstring = ast.get_docstring(ast.parse((PACKAGE_DIR / "federation" / "flower" / "__init__.py").read_text()))
    assert docstring and "import" in docstring
