"""The package rules of ../shared/STYLE.md, read from the imports of every module in src/.

protocol ← core ← app; protocol ← agent; web depends on protocol only; core ← swarm ← app.
`core` never imports `web`, `agent`, `demo`, `swarm` or `app`: the dashboard, the demo model and
a host's part of a swarm are composed by `app.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hyperhive

SRC = Path(hyperhive.__file__).parent

ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "core": {"core", "protocol"},
    "web": {"web", "protocol"},
    "agent": {"agent", "protocol", "web"},
    "demo": {"demo", "protocol"},
    "swarm": {"swarm", "core", "protocol"},
}
"""What each package may import from hyperhive (agent may use web's shared HTTP edge)."""


def imports_of(path: Path) -> set[str]:
    """The hyperhive sub-packages a module imports, at any depth (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "hyperhive" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_the_rules_allow(package: str) -> None:
    wrong = {
        str(module.relative_to(SRC)): sorted(imports_of(module) - ALLOWED[package])
        for module in sorted((SRC / package).rglob("*.py"))
    }
    assert {m: w for m, w in wrong.items() if w} == {}


def test_the_rule_test_sees_a_violation(tmp_path: Path) -> None:
    """The reader is not blind: it finds lazy and aliased imports."""
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from hyperhive.web.dashboard import serve_dashboard\n"
        "import hyperhive.demo.model as m\n"
    )
    assert imports_of(module) == {"web", "demo"}
