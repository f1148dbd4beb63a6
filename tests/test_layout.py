"""Imports run one way: benchmarks -> flows -> pipeline -> models -> data_manifest.

A module imports only its own folder or the folders to its right (data_manifest imports nothing of the
project, and no source module imports the tests); the modules of flows/ import each other without a cycle;
test modules import no other test module (shared helpers are fixtures in tests/conftest.py) and only the
tests of benchmark scripts (tests/benchmarks/) import benchmarks. Every import statement counts, also one
inside a function. The checks are plain functions of a root folder, so they are also run on a small
generated tree that breaks each rule.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("data_manifest", "models", "pipeline", "flows", "benchmarks")  # each may import itself and those before
TESTS = "tests"


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """(line, imported module, names taken from it) for every import statement, relative ones made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, target, tuple(alias.name for alias in node.names)


def source_files(root: Path, folder: str) -> list[Path]:
    return sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def upward_imports(root: Path, layer: str) -> list[str]:
    """Imports in `layer` of a folder to its left in LAYERS, or of the tests."""
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    found = []
    for path in source_files(root, layer):
        for line, target, _ in imports(root, path):
            top = target.split(".")[0]
            if (top in LAYERS and top not in allowed) or top == TESTS:
                found.append(f"{path.relative_to(root)}:{line}: imports {target}")
    return found


def import_cycles(root: Path, folder: str) -> list[str]:
    """Cycles among the modules of one folder, each as 'a -> b -> a' (the imports of submodules resolved)."""
    modules = {module_name(root, p): p for p in source_files(root, folder)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for _, target, names in imports(root, path):
            deps = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            graph[mod].update(d for d in deps if d in modules and d != mod)
    # Tarjan's strongly connected components; every component of two or more modules holds a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:  # one shortest cycle through the component's first module, for the message
        start, paths = comp[0], [[comp[0]]]
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in comp)
            if start in nxt:
                cycles.append(" -> ".join([*path, start]))
                break
            paths += [[*path, w] for w in nxt if w not in path]
    return cycles


def imports_between_tests(root: Path) -> list[str]:
    """Imports in tests/ of another test module (or `tests`, or a conftest), or of benchmarks outside
    tests/benchmarks/ and tests/conftest.py (which shares the hostile-workspace scaffolding of
    benchmarks/sql_fuzz.py with the SQL security tests)."""
    test_root = root / TESTS
    files = source_files(root, TESTS)
    local = {p.stem for p in files}  # what a test could import by its bare name (pytest puts its folder on sys.path)
    found = []
    for path in files:
        in_benchmarks = path.relative_to(test_root).parts[0] == "benchmarks" or path == test_root / "conftest.py"
        for line, target, _ in imports(root, path):
            top = target.split(".")[0]
            if top == TESTS or top in local - set(LAYERS) or (top == "benchmarks" and not in_benchmarks):
                found.append(f"{path.relative_to(root)}:{line}: imports {target}")
    return found


def misplaced_tests(root: Path) -> list[str]:
    """Test files outside tests/<layer>/ (tests/test_layout.py excepted) and basenames used twice."""
    found, seen = [], {}
    for path in sorted((root / TESTS).rglob("test_*.py")):
        rel = path.relative_to(root / TESTS)
        if rel.parts[0] not in LAYERS and rel != Path("test_layout.py"):
            found.append(f"{TESTS}/{rel}: not under tests/<{'|'.join(LAYERS)}>/")
        if path.name in seen:
            found.append(f"{TESTS}/{rel}: same file name as {TESTS}/{seen[path.name]}")
        seen.setdefault(path.name, rel)
    return found


# ------------------------------------------------------------------------------------- the repository


@pytest.mark.parametrize("layer", [
    *LAYERS,
])
def test_layers_import_only_themselves_and_the_layers_to_their_right(layer):
    assert upward_imports(ROOT, layer) == []


def test_no_import_cycle_between_modules_of_flows():
    assert import_cycles(ROOT, "flows") == []


def test_tests_import_no_other_test_module():
    assert imports_between_tests(ROOT) == []


def test_test_files_mirror_the_source_tree():
    assert misplaced_tests(ROOT) == []


# ------------------------------------------------------------------------------- a tree that breaks them


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_checks_report_each_kind_of_violation(tmp_path):
    root = _tree(tmp_path, {
        "data_manifest/__init__.py": "",
        "data_manifest/store.py": "import os\nfrom data_manifest import vocabulary\n",
        "data_manifest/vocabulary.py": "def f():\n    from models.geometry import warp  # upward, inside a function\n",
        "models/__init__.py": "",
        "models/geometry.py": "from data_manifest import store\n",
        "models/clib.py": "from . import geometry\nfrom ..pipeline import ids\n",  # relative, one of them upward
        "pipeline/__init__.py": "",
        "pipeline/ids.py": "import models.geometry\nimport flows.cli\n",
        "flows/__init__.py": "",
        "flows/cli.py": "from flows import runtime\n",
        "flows/runtime.py": "import flows\n\ndef run():\n    from flows.cli import main\n",
        "flows/label.py": "from flows.runtime import run\nfrom pipeline import ids\n",
        "benchmarks/__init__.py": "",
        "benchmarks/fuzz.py": "from flows import label\nfrom tests.test_sql import corpus\n",
        "tests/conftest.py": "import pytest\n",
        "tests/test_layout.py": "",
        "tests/pipeline/test_ids.py": "from pipeline import ids\nfrom tests.flows.test_label import helper\n",
        "tests/flows/test_label.py": "import test_ids\nfrom conftest import x\nfrom benchmarks import fuzz\n",
        "tests/benchmarks/test_fuzz.py": "from benchmarks import fuzz\n",
        "tests/test_sql.py": "",
        "tests/models/test_ids.py": "",
    })
    assert upward_imports(root, "data_manifest") == ["data_manifest/vocabulary.py:2: imports models.geometry"]
    assert upward_imports(root, "models") == ["models/clib.py:2: imports pipeline"]
    assert upward_imports(root, "pipeline") == ["pipeline/ids.py:2: imports flows.cli"]
    assert upward_imports(root, "flows") == []
    assert upward_imports(root, "benchmarks") == ["benchmarks/fuzz.py:2: imports tests.test_sql"]
    assert import_cycles(root, "flows") == ["flows.cli -> flows.runtime -> flows.cli"]
    assert import_cycles(root, "models") == []
    assert imports_between_tests(root) == [
        "tests/flows/test_label.py:1: imports test_ids",
        "tests/flows/test_label.py:2: imports conftest",
        "tests/flows/test_label.py:3: imports benchmarks",
        "tests/pipeline/test_ids.py:2: imports tests.flows.test_label",
    ]
    assert misplaced_tests(root) == [
        "tests/pipeline/test_ids.py: same file name as tests/models/test_ids.py",
        "tests/test_sql.py: not under tests/<data_manifest|models|pipeline|flows|benchmarks>/",
    ]
