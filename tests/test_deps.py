"""Every third-party module that ``laion_ray/`` or ``jobs/`` imports comes from a
dependency that ``pyproject.toml`` declares, so a fresh install can run it."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        _normalise(re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0]) for d in project["dependencies"]
    }


def imported_modules() -> dict[str, str]:
    """Top-level third-party module -> first place it is imported (function bodies too)."""
    local = {"laion_ray", "jobs", *(p.stem for p in (ROOT / "jobs").glob("*.py"))}
    found: dict[str, str] = {}
    for src in sorted([*ROOT.glob("laion_ray/**/*.py"), *ROOT.glob("jobs/*.py")]):
        for node in ast.walk(ast.parse(src.read_text(), str(src))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                found.setdefault(top, f"{src.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_walk_sees_the_package_imports():
    modules = imported_modules()
    for expected in ("lance", "pyarrow", "ray", "torch", "open_clip", "cv2"):
        assert expected in modules


def test_every_third_party_import_is_declared():
    declared = declared_dependencies()
    providers = md.packages_distributions()
    undeclared = {
        module: f"{where} (installed from {sorted(providers.get(module, [])) or 'nothing'})"
        for module, where in imported_modules().items()
        if not {_normalise(d) for d in providers.get(module, [])} & declared
    }
    assert not undeclared, f"imports no declared dependency provides: {undeclared}"
