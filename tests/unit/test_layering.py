"""Dependencies point one way: ``config check`` never imports torch (it validates model names
and options against the declarations in ``asnn_dist/models/__init__.py``), those declarations
match the classes, and the package import graph has no cycle (train never imports inference)."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from asnn_dist.registry import MODELS, signature_keywords

PACKAGE = Path(__file__).resolve().parents[2] / "asnn_dist"
HEAVY = ("torch", "numpy", "deepspeed", "ray", "mlflow", "asnn_dist.snn", "asnn_dist.models.common")

CHILD = """
import json, sys
from asnn_dist.cli import main
demo = "configs/demo/digits-lenet-hybrid.yaml"
codes = [main(["config", "check", demo]),
         main(["config", "check", demo, "--set", "model.name=spikformer_tiny", "model.options={dim: 64, depth: 2}"]),
         main(["config", "check", demo, "--set", "model.options.widthz=[4, 8, 8]"])]
print(json.dumps({"codes": codes, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_config_check_imports_no_torch() -> None:
    """Loading and validating configs (model names and options included) in a fresh process
    leaves torch and every model module unimported."""
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=PACKAGE.parent, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 2]  # the typo in model.options is still caught
    assert "unknown key of model 'lenet_asnn'" in out.stderr
    assert result["heavy"] == []


@pytest.mark.parametrize("name", MODELS.names())
def test_declared_keywords_are_the_class_keywords(name: str) -> None:
    """What configs validate against (declared, no import) is what the class accepts."""
    declared = MODELS.declaration(name)
    assert declared is not None
    cls = declared.load().func
    assert inspect.isclass(cls)
    assert MODELS.keywords(name) == signature_keywords(cls)


def _package_graph() -> dict[str, set[str]]:
    """First-level package (or module) -> the ones it imports, at any depth of the file
    (function-level imports count; ``if TYPE_CHECKING:`` blocks do not)."""
    graph: dict[str, set[str]] = defaultdict(set)

    def visit(node: ast.AST, src: str) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node = ast.Module(body=node.orelse, type_ignores=[])
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module]
        for t in targets:
            parts = t.split(".")
            if parts[0] == "asnn_dist" and len(parts) > 1 and parts[1] != src:
                graph[src].add(parts[1])
        for child in ast.iter_child_nodes(node):
            visit(child, src)

    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("").parts
        visit(ast.parse(path.read_text()), rel[0])
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_import_graph_has_no_cycle() -> None:
    graph = _package_graph()
    assert "inference" not in _reachable(graph, "train")  # inference uses train, never back
    assert "train" in _reachable(graph, "inference")
    assert graph["registry"] == set()  # models and snn fill it; it imports neither
    assert graph["config"] <= {"errors", "registry"}
    cycles = sorted(a for a in list(graph) if a in _reachable(graph, a))
    assert cycles == [], {a: sorted(graph[a]) for a in cycles}
