"""Code shape a newcomer relies on: no two embft modules import each other."""

import ast
import itertools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "embft"


def _embft_imports(path: Path) -> set[str]:
    """embft modules imported anywhere in `path` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "embft":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("embft."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("embft."))
    return found


def test_no_module_pair_imports_each_other():
    imports = {p.stem: _embft_imports(p) for p in SRC.glob("*.py")}
    assert {"app", "train", "runner", "distributed", "names"} <= set(imports)
    pairs = [(a, b) for a, b in itertools.combinations(sorted(imports), 2) if b in imports[a] and a in imports[b]]
    assert pairs == []
