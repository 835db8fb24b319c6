"""Code shape a newcomer relies on: folders by role, no import cycles between modules or between
packages, no source file past ~600 lines."""

import ast
import itertools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "embft"
PACKAGES = {
    "training",
    "training.flagembedding",
    "encoding",
    "evaluation",
    "tracking",
    "report",
    "serving",
    "sweeping",
}
BACKENDS = (
    "flagembedding",
    "sentence_transformers",
    "setfit",
    "model2vec",
    "untrained",
)  # training/<backend>/: one each
MAX_LINES = 650  # "about 600": a file past it holds more than one concern
PLUGIN = SRC.parent / "hydra_plugins"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in SRC.rglob("*.py")}


def _embft_imports(path: Path) -> set[str]:
    """embft modules imported anywhere in `path` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "embft":
            for alias in node.names:  # `from embft.tracking import registry` imports a module
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "embft")
    return {m for m in found if m in MODULES}


GRAPH = {m: _embft_imports(p) - {m} for m, p in MODULES.items()}


def _package(module: str) -> str:
    """The top-level role a module belongs to: `tracking` for embft.tracking.registry, else itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_folders_show_the_roles():
    assert {f"embft.{p}" for p in PACKAGES} <= set(MODULES)
    assert {"embft.app", "embft.config", "embft.data", "embft.names"} <= set(MODULES)
    top = {m for m in MODULES if m.count(".") == 1 and not (SRC / m.split(".")[1]).is_dir()}
    assert len(top) <= 10, f"flat modules again: {sorted(top)}"


def test_no_import_cycle_between_modules():
    pairs = [(a, b) for a, b in itertools.combinations(sorted(GRAPH), 2) if b in GRAPH[a] and a in GRAPH[b]]
    assert pairs == []
    assert _cycles(GRAPH) == []


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        packages.setdefault(_package(module), set()).update(_package(d) for d in deps)
    packages = {p: deps - {p} for p, deps in packages.items()}
    assert _cycles(packages) == [], packages


def test_tracking_imports_no_stage_above_it():
    """tracking/ (MLflow runs, hashes, the registry) is used by the stages; it uses none of them."""
    above = ("training", "evaluation", "report", "serving")
    found = {
        (m, d) for m, deps in GRAPH.items() if m.startswith("embft.tracking") for d in deps if d.split(".")[1] in above
    }
    assert found == set()


def test_training_backends_do_not_import_each_other():
    """Code two backends share lives in training/ proper, not in one of them."""

    def backend(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "training" and parts[2] in BACKENDS else None

    sideways = {
        (m, d) for m, deps in GRAPH.items() for d in deps if backend(m) and backend(d) not in (None, backend(m))
    }
    assert sideways == set()


def test_the_core_does_not_import_the_sweeper_plugins():
    """hydra_plugins/ builds on embft (a sweeper is replaceable); embft never reaches into a plugin:
    what a job shares with the sweepers (trial reporter, storage, dashboard) lives in embft/sweeping/."""
    found = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found.update((module, n) for n in names if n.split(".")[0] == "hydra_plugins")
    assert found == set()


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_source_file_is_longer_than_about_600_lines():
    files = [*SRC.rglob("*.py"), *PLUGIN.rglob("*.py")]
    long = {str(p.relative_to(SRC.parent)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
