"""How the package's modules depend on each other: no private names across modules, and
the shared k-means/IVF helpers (``laion_ray/ivf.py``) keep ``index`` and ``recall`` apart."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> list[tuple[str, str, list[str], int]]:
    """``(importing module, imported laion_ray module, names, line)`` for every import,
    function bodies included, relative imports resolved."""
    found = []
    for src in sorted(ROOT.glob("laion_ray/**/*.py")):
        module = _module_name(src)
        package = module if src.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(src.read_text(), str(src))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("laion_ray"):
                        found.append((module, alias.name, [], node.lineno))
                continue
            else:
                continue
            if target == "laion_ray" or target.startswith("laion_ray."):
                found.append((module, target, names, node.lineno))
    return found


def _depends_on(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def test_the_walk_sees_the_package_imports():
    imports = package_imports()
    assert ("laion_ray.index", "laion_ray.engine.commit") in {(a, b) for a, b, _, _ in imports}
    assert any(
        a == "laion_ray.engine.executors" and b == "laion_ray.engine.stages"
        for a, b, _, _ in imports
    )


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{module}:{line} imports {name} from {target}"
        for module, target, names, line in package_imports()
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not private, private


def test_index_and_recall_do_not_import_each_other():
    graph: dict[str, set[str]] = {}
    for module, target, names, _ in package_imports():
        graph.setdefault(module, set()).add(target)
        # ``from laion_ray import recall`` imports the submodule laion_ray.recall.
        graph[module].update(f"{target}.{n}" for n in names)
    assert _depends_on(graph, "laion_ray.index", "laion_ray.recall")
    assert not _depends_on(graph, "laion_ray.recall", "laion_ray.index")


def test_dedup_and_index_share_the_ivf_helpers():
    users = {module for module, target, _, _ in package_imports() if target == "laion_ray.ivf"}
    assert {
        "laion_ray.index",
        "laion_ray.recall",
        "laion_ray.dedup",
        "laion_ray.dedup.tasks",
    } <= users
    dedup_targets = {t for m, t, _, _ in package_imports() if m.startswith("laion_ray.dedup")}
    assert "laion_ray.index" not in dedup_targets
