"""The package's layering, read from the source: every import of xal_engine goes down the layers.

    cli -> bench, jobs -> ingest, exchange -> core, store -> ops -> kernels   (errors, progress: anywhere)

store reads the result schema from core.fields and nothing else of core; kernels import only the
result type and errors. Function-local imports count like module-level ones.
"""

import ast
from pathlib import Path

import pytest

import xal_engine

PACKAGE = Path(xal_engine.__file__).parent
KERNELS = PACKAGE.parent / "kernels"  # installed as xal_engine.kernels
BASE = {"xal_engine", "xal_engine.errors", "xal_engine.progress"}  # the version, errors, progress bars
# layer -> the layers its modules may import (besides itself and BASE)
ALLOWED = {
    "cli": {"bench", "jobs", "ingest", "exchange", "core", "store", "ops", "kernels"},
    "bench": {"jobs", "ingest", "exchange", "core", "store", "ops", "kernels"},
    "jobs": {"ingest", "exchange", "core", "store", "ops", "kernels"},
    "ingest": {"core", "store", "ops"},
    "exchange": {"core", "store", "ops"},
    "core": {"ops", "kernels"},
    "store": set(),
    "ops": {"kernels"},
    "kernels": set(),
}
EXCEPTIONS = {  # (layer, imported module): why
    ("store", "xal_engine.core.fields"): "score runs store one array per registered result field",
    ("kernels", "xal_engine.ops.agreement"): "the kernel returns the op's result type",
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def modules() -> list[tuple[str, Path]]:
    found = [("xal_engine." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts), p)
             for p in PACKAGE.rglob("*.py")]
    found += [("xal_engine.kernels." + p.stem, p) for p in KERNELS.glob("*.py")]
    return sorted(found)


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in out if m.split(".")[0] == "xal_engine"}


def known(module: str) -> bool:
    """Whether ``module`` names a module or package of xal_engine (not a name inside one)."""
    return module in {m for m, _ in modules()} or (PACKAGE / Path(*module.split(".")[1:])).is_dir()


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_imports_go_down_the_layers(module: str, path: Path) -> None:
    mine = layer_of(module)
    if mine is None:  # xal_engine/__init__, __main__, errors, progress
        assert module in BASE | {"xal_engine.__init__", "xal_engine.__main__"}, f"{module} belongs to no layer"
        return
    bad = []
    for target in sorted(imports(path)):
        if target in BASE or not known(target):
            continue
        theirs = layer_of(target)
        if theirs == mine or theirs in ALLOWED[mine] or (mine, target) in EXCEPTIONS:
            continue
        bad.append(target)
    assert not bad, f"{module} ({mine}) imports {bad}, above or beside its layer"


def test_the_rules_catch_an_upward_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from xal_engine.jobs import loop\n    from xal_engine.core import fields\n")
    assert imports(probe) == {"xal_engine.jobs", "xal_engine.jobs.loop", "xal_engine.core",
                              "xal_engine.core.fields"}
    assert "jobs" not in ALLOWED["store"] and ("store", "xal_engine.core.fields") in EXCEPTIONS


def module_level_imports(path: Path) -> set[str]:
    """Imports that run when the module is imported: top level, outside ``if TYPE_CHECKING:``."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] == "xal_engine"}


def test_no_import_cycles() -> None:
    names = {m.removesuffix(".__init__"): p for m, p in modules()}
    graph = {}
    for module, path in names.items():
        # importing a submodule runs its parents' __init__ first; that is not a cycle
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {t for t in module_level_imports(path) if t in names and t not in parents | {module}}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, f"import cycle: {' -> '.join([*trail, m, t])}"
            if t not in state:
                visit(t, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
