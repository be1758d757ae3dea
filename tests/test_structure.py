"""The import graph points one way and has no cycle: configs <- tasks <- cluster <- flows <- prm_factory (the CLI),
and inside tasks/ its stages point one way too, in the order `tasks.LAYERS` states once.

Every ``import`` in every module of those packages counts, those inside functions too (a lazy import is still
a dependency; it only moves the cost). A package may import its own modules and those of the packages to its
left, never one to its right. benchmarks/, scripts/ and tests/ sit above all of them. The modules of benchmarks/
and scripts/ are scripts over the installed package: they import neither one another (the benchmarks share
benchmarks/lib.py) nor tests/, and leave sys.path alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tasks
from configs.schema import REPO_ROOT

LAYERS = ("configs", "tasks", "cluster", "flows", "prm_factory")


def module_imports(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Each module of `packages` under `root` (dotted name) -> the modules of those packages it imports."""
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod when there is one, else names of pkg
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {_known(t, files) for t in targets if t.split(".")[0] in packages} - {name, None}
    return graph


def _known(target: str, files: dict) -> str | None:
    """The repo module `target` names (`a.b.c` -> `a.b` when c is a name inside module a.b)."""
    while target and target not in files:
        target = target.rpartition(".")[0]
    return target or None


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...]) -> list[str]:
    """`a -> b` for each import of a module of a later layer than the importer's."""
    rank = {pkg: i for i, pkg in enumerate(layers)}
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts
                  if rank[dst.split(".")[0]] > rank[src.split(".")[0]])


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each strongly connected component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_imports_point_down_and_form_no_cycle():
    graph = module_imports(REPO_ROOT, LAYERS)
    assert len(graph) > 40 and "tasks.build" in graph["flows.steps"]  # the walk found the repo's modules
    assert upward_imports(graph, LAYERS) == []
    assert import_cycles(graph) == []


def layer_of(module: str, layers: tuple[tuple[str, ...], ...]) -> int | None:
    """The index of the layer whose entry is `module` or a package above it; None for a module outside them."""
    for i, layer in enumerate(layers):
        if any(module == entry or module.startswith(entry + ".") for entry in layer):
            return i
    return None


def upward_layer_imports(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """`a -> b` for each import of a module in a later layer than the importer's, among modules in `layers`."""
    bad = []
    for src, dsts in graph.items():
        for dst in dsts:
            s, d = layer_of(src, layers), layer_of(dst, layers)
            if s is not None and d is not None and d > s:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def test_tasks_stages_import_in_the_stated_order():
    graph = module_imports(REPO_ROOT, LAYERS)
    tasks_modules = {m for m in graph if m.startswith("tasks.")}
    # every module of tasks/ sits in exactly one stated layer, so no new module escapes the check
    assert {m for m in tasks_modules if layer_of(m, tasks.LAYERS) is None} == set()
    assert len(tasks_modules) > 30 and "tasks.build" in graph["tasks.active.loop"]  # the walk found them
    assert upward_layer_imports(graph, tasks.LAYERS) == []
    # at most 8 modules directly in tasks/ (the rest live in a stage's sub-package)
    top = [p.name for p in (REPO_ROOT / "tasks").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 8, top


def test_flows_hold_no_ray_code():
    """Flows orchestrate; engines and Ray live in cluster/ (cluster/engines.py is the one entry point)."""
    for path in sorted((REPO_ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n == "ray" or n.startswith("ray.")], f"{path.name} imports {names}"


def test_layer_check_catches_an_import_against_the_stated_order():
    layers = (("t.io",), ("t.sources",), ("t.build",))
    graph = {"t.io": {"t.sources.loaders"}, "t.sources.loaders": {"t.io"}, "t.build": {"t.sources.loaders"},
             "t.sources": set(), "elsewhere": {"t.build"}}
    assert upward_layer_imports(graph, layers) == ["t.io -> t.sources.loaders"]
    assert layer_of("t.sources.loaders", layers) == 1 and layer_of("t.sourcesx", layers) is None


def test_checker_catches_a_planted_upward_import_and_cycle(tmp_path):
    files = {
        "low/__init__.py": "",
        "low/a.py": "import os\nfrom low import b\n",  # a -> b -> a (b's import is inside a function)
        "low/b.py": "def f():\n    from .a import x\n    from high.c import y\n",  # and an upward import
        "high/__init__.py": "",
        "high/c.py": "import json\n",
        "high/d.py": "from low.a import thing\nimport low.b as b\nfrom . import c\n",  # downward: allowed
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = module_imports(tmp_path, ("low", "high"))
    assert graph == {"low": set(), "low.a": {"low.b"}, "low.b": {"low.a", "high.c"}, "high": set(),
                     "high.c": set(), "high.d": {"low.a", "low.b", "high.c"}}
    assert upward_imports(graph, ("low", "high")) == ["low.b -> high.c"]
    assert import_cycles(graph) == [["low.a", "low.b"]]


def script_offences(root: Path) -> list[str]:
    """`path: imports X` for each import, anywhere in a module of benchmarks/ or scripts/, of another such module
    (by its bare name, as a script beside it would, or as benchmarks.X; benchmarks.lib is the shared one) or of
    tests/ (as tests.X, or a module of tests/ by its bare name); `path: edits sys.path` for each module that touches
    sys.path."""
    dirs = ("benchmarks", "scripts")
    paths = sorted(p for d in dirs for p in (root / d).glob("*.py"))
    scripts = {p.stem for p in paths} - {"__init__", "lib"}
    test_modules = {"tests"} | {p.stem for p in (root / "tests").glob("*.py")}
    out = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                out.append(f"{rel}: edits sys.path")
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(filter(None, [path.parent.name if node.level else "", node.module or ""]))
                targets.update(f"{base}.{a.name}" for a in node.names)
        for target in sorted(targets):
            parts = target.split(".")
            if parts[0] in test_modules or parts[0] in scripts or (
                    parts[0] in dirs and len(parts) > 1 and parts[1] in scripts):
                out.append(f"{rel}: imports {'.'.join(parts[:2]) if parts[0] in dirs else parts[0]}")
    return sorted(set(out))


def test_benchmarks_and_scripts_import_only_the_package_and_the_shared_lib():
    offences = script_offences(REPO_ROOT)
    assert offences == [], offences
    assert (REPO_ROOT / "benchmarks" / "bench_e2e.py").is_file() and (REPO_ROOT / "scripts").is_dir()


def test_script_check_catches_planted_imports_and_sys_path(tmp_path):
    files = {
        "benchmarks/__init__.py": "",
        "benchmarks/lib.py": "import json\n",
        "benchmarks/bench_a.py": "from benchmarks.lib import x\nfrom benchmarks import lib\nimport tasks.build\n",
        "benchmarks/bench_b.py": "def f():\n    from bench_a import y\n    from tests.engine import z\n",
        "benchmarks/bench_c.py": "import sys\nsys.path.insert(0, '.')\nfrom benchmarks import bench_a\n",
        "benchmarks/bench_d.py": "from .bench_a import y\nfrom . import lib\nimport engine_fixtures\n",
        "tests/engine_fixtures.py": "",
        "scripts/tool.py": "import bench_c\nfrom benchmarks.bench_b import f\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert script_offences(tmp_path) == [
        "benchmarks/bench_b.py: imports bench_a", "benchmarks/bench_b.py: imports tests",
        "benchmarks/bench_c.py: edits sys.path", "benchmarks/bench_c.py: imports benchmarks.bench_a",
        "benchmarks/bench_d.py: imports benchmarks.bench_a", "benchmarks/bench_d.py: imports engine_fixtures",
        "scripts/tool.py: imports bench_c", "scripts/tool.py: imports benchmarks.bench_b"]


def test_no_benchmark_runs_a_training_loop_of_its_own():
    """A benchmark trains through tasks.prm.fit (the epoch loop Ray Train's workers run too): no module under
    benchmarks/ imports or calls ``train_step``."""
    offenders = []
    for path in sorted((REPO_ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Call):
                func = node.func
                names = [func.id] if isinstance(func, ast.Name) else [func.attr] if isinstance(func, ast.Attribute) \
                    else []
            else:
                continue
            offenders += [f"{path.name}:{node.lineno}" for n in names if n == "train_step"]
    assert not offenders, f"a training loop outside tasks/prm (use tasks.prm.fit): {offenders}"
