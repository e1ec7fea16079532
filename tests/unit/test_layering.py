"""Packages depend one way: a stage imports earlier stages and foundations, never a later stage.

Stages in order: ``frontend`` -> ``matching`` -> ``passes`` -> ``backend`` / ``reports``. The IR and
the shared data (``ir``, ``plan``, ``specs``, ``weights``, ``errors``, ``indices``, ...) are
foundations every stage may import and which import no stage. The drivers (``pipeline``,
``commands``, ``cli``, ``writer``, ``calib``) run the stages and may import any of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wscompile

ROOT = Path(wscompile.__file__).parent
STAGES = {"frontend": 1, "matching": 2, "passes": 3, "backend": 4, "reports": 4}
DRIVERS = {"__init__", "__main__", "pipeline", "commands", "cli", "writer", "calib"}


def _imports(path: Path) -> set[str]:
    """Every wscompile module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wscompile"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("wscompile"))
    return found


def _unit(module: str) -> str | None:
    """The top-level unit of ``wscompile.X.Y``: ``X`` (a stage package, a foundation or a driver)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_module_imports_a_later_stage():
    backward = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        unit = relative.parts[0]
        if unit in DRIVERS:
            continue
        rank = STAGES.get(unit, 0)  # foundations rank below every stage
        for imported in _imports(path):
            target = _unit(imported)
            if target in DRIVERS:
                backward.append(f"{relative} imports driver {imported}")
            elif target in STAGES and target != unit and STAGES[target] >= rank:
                backward.append(f"{relative} imports {imported}")
    assert backward == []


def test_the_check_sees_imports():
    # the matching stage reads the uniform rule from the foundation, as the layer policies do
    assert "wscompile.indices" in _imports(ROOT / "matching" / "layers.py")
    assert "wscompile.matching.coupling" in _imports(ROOT / "passes" / "select.py")
