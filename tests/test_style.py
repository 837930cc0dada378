"""The tree stays ruff-clean (lint and format), as the project's conventions ask."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    assert RUFF, "ruff is missing: it comes with the test extra (pip install -e '.[test]')"
    done = subprocess.run([RUFF, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def project_imports() -> dict[str, set[str]]:
    """{module: project modules it imports}, at any depth of the file (lazy imports too)."""
    import ast

    packages = ("attention_variants", "transformer", "experiments", "configs")
    modules = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        # A module's import of its own package (a sibling, through the package) is no edge.
        graph[name] = {m for m in found if m in modules and not name.startswith(f"{m}.")}
        graph[name].discard(name)
    return graph


def test_imports_run_one_way():
    """configs -> experiments -> transformer -> attention_variants, no cycle anywhere; configs
    import only configs and the config helpers; training never imports the sweep."""
    graph = project_imports()
    layer = {"attention_variants": 0, "transformer": 1, "experiments": 2, "configs": 3}
    for module, imported in graph.items():
        for other in imported:
            assert layer[other.split(".")[0]] <= layer[module.split(".")[0]], (module, other)
            if module.startswith("configs"):
                assert other.startswith("configs") or other == "experiments.configlib", other
    # Within experiments: the sweep builds on training, never the other way.
    sweep = ("experiments.sweep", "experiments.plan", "experiments.kinds", "experiments.cells")
    sweep += ("experiments.report", "experiments.quality_report", "experiments.bench")
    training = ("experiments.train", "experiments.checkpoints", "experiments.workdir")
    training += ("experiments.evaluate", "experiments.sample", "experiments.datasets")
    for module, imported in graph.items():
        if module.startswith(training):
            assert not [m for m in imported if m.startswith(sweep)], (module, imported)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module not in done:
            for other in sorted(graph[module]):
                visit(other, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
