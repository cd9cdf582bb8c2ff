"""The house's floors (STYLE.md): every import, at module level or inside a function, points down or stays on its
floor, and no two modules import each other, however indirectly.

    models/                      the model (floor 1)
    contract/                    the bundle contract and the PLE asset format (2)
    exporters/                   lowering to the three targets (3)
    runtime_py.components/.executors, runtime_py.components.*   shared components and one executor per backend (3)
    runtime_py.session, .engine, .litertlm_session,
      .executorch_runner_session                                 sessions over executors (4)
    runtime_py.bundle, .compare, .harness, .cli                 bundle building, validation, the command line (5)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "contract", "exporters", "runtime_py")


def _floor(module: str) -> str:
    if module.startswith(("runtime_py.components", "runtime_py.executors")):
        return "runtime_base"
    if module in ("runtime_py", "runtime_py.session", "runtime_py.engine", "runtime_py.litertlm_session",
                  "runtime_py.executorch_runner_session"):
        return "runtime_session"
    if module.startswith("runtime_py."):
        return "top"
    return module.split(".")[0]


# What each floor may import, itself included.
ALLOWED = {
    "models": {"models"},
    "contract": {"models", "contract"},
    "exporters": {"models", "contract", "exporters"},
    "runtime_base": {"models", "contract", "runtime_base"},
    "runtime_session": {"models", "contract", "runtime_base", "runtime_session"},
    "top": {"models", "contract", "exporters", "runtime_base", "runtime_session", "top"},
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an import names (`from a.b import c` may name module a.b.c or a name in a.b)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for imported in names:
                if imported.split(".")[0] in PACKAGES:
                    target = _resolve(imported, modules)
                    if target and target != name:
                        targets.add(target)
        graph[name] = targets
    return graph


def test_every_import_points_down_or_stays_on_its_floor():
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() for target in sorted(targets)
              if _floor(target) not in ALLOWED[_floor(module)]]
    assert upward == []


def test_executors_and_components_import_nothing_above_them():
    """The issue's own wording: nothing from exporters, the session, the engine or the CLI."""
    forbidden = ("exporters", "runtime_py.session", "runtime_py.engine", "runtime_py.cli", "runtime_py.bundle",
                 "runtime_py.litertlm_session", "runtime_py.executorch_runner_session", "runtime_py.compare",
                 "runtime_py.harness")
    found = [f"{module} -> {target}" for module, targets in import_graph().items()
             if module.startswith(("runtime_py.executors", "runtime_py.components"))
             for target in sorted(targets) if target.startswith(forbidden)]
    assert found == []


def test_no_import_cycles():
    """Tarjan's strongly connected components of the module graph: each must be one module. A package's __init__
    importing its own submodules lazily (a factory) and being imported by them would be a cycle too."""
    graph = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path, monkeypatch):
    """The walk reads imports inside functions too, and the cycle finder finds a two-module circle."""
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from models.b import g\n")
    (pkg / "b.py").write_text("import models.a\n")
    (pkg / "c.py").write_text("def h():\n    from exporters.spec import ExportSpec\n")
    (tmp_path / "exporters").mkdir()
    (tmp_path / "exporters" / "spec.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGES", ("models", "exporters"))
    graph = import_graph()
    assert graph["models.a"] == {"models.b"} and graph["models.b"] == {"models.a"}
    assert graph["models.c"] == {"exporters.spec"}
    assert "exporters" not in ALLOWED[_floor("models.c")]
