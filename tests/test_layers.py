"""The package layering (docs/architecture.md): a module imports only from its own package and
the layers below it; TYPE_CHECKING imports (annotations only) are not imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "slimtune"

#: Bottom to top. A unit is a package (folder) or a top-level module of slimtune.
LAYERS = [
    ["errors"],
    ["io", "progress"],
    ["core"],
    ["zoo"],
    ["sparsity"],
    ["methods"],
    ["measure"],
    ["train"],
    ["privacy"],
    ["compress"],
    ["features"],
    ["recipe"],
    ["search"],
    ["runner"],
    ["listing", "bench"],
    ["api"],
    ["cli"],
    ["__main__", "__init__"],
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _runtime_imports(tree: ast.AST):
    """Imported slimtune modules, skipping ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimtune"):
            if node.module == "slimtune":
                yield from (f"slimtune.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("slimtune."))
        stack.extend(ast.iter_child_nodes(node))


def import_edges() -> list[tuple[str, str, str]]:
    """(importing file, its unit, imported unit) for every import across units."""
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        unit = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for imported in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            target = _unit(imported)
            if target != unit:
                edges.append((str(rel), unit, target))
    return edges


def test_every_unit_has_a_layer():
    units = {p.name if p.is_dir() else p.stem for p in SRC.iterdir() if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert units - set(RANK) == set(), "add the new package/module to LAYERS (and docs/architecture.md)"


def test_imports_go_one_way():
    upward = [f"{f} imports slimtune.{target} ({unit} may import only lower layers)"
              for f, unit, target in import_edges() if RANK[target] >= RANK[unit]]
    assert upward == []


def test_methods_import_no_later_stage():
    code = (
        "import sys, slimtune.methods.base as b; b.all_methods(); "
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in "
        "[['slimtune', p] for p in ('train', 'privacy', 'compress', 'measure', 'features', 'runner')]); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
