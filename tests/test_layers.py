"""The package's layering (docs/contributing.md, Layout): every module imports only from its own layer or a lower one,
and no import cycles. Read from the source with ``ast`` (function-level imports included), so it costs
no import; a planted upward import and a planted cycle show that the check can fail."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "flowmaps"

# Low to high: mathematics, networks, teachers, objectives, data, metrics, training, runs, command line.
LAYERS = [["_version", "_tensor", "precision", "interpolants", "solvers", "flowmap", "exact", "checkpoint",
           "standardizer"], ["tuning"], ["nets"], ["teachers"], ["objectives"], ["data"], ["metrics"],
          ["train"], ["runs"], ["cli"]]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
TOP = len(LAYERS)  # the package's __init__ / __main__: re-exports everything


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    found = {}
    for f in sorted(root.rglob("*.py")):
        parts = [root.name, *f.relative_to(root).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    mods, top = modules(root), root.name
    graph = {}
    for name, (f, is_pkg) in mods.items():
        pkg = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)] if node.level else []
                mod = ".".join(base + [node.module]) if node.module else ".".join(base)
                if mod.split(".")[0] == top:  # "from X import y": y may be a submodule
                    subs = (f"{mod}.{a.name}" for a in node.names)
                    targets |= {sub if sub in mods else mod for sub in subs}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == top}
        graph[name] = targets - {name}
    return graph


def level(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return TOP
    assert parts[1] in LEVEL, f"{module} is in no layer: add it to LAYERS (and the Layout of docs/contributing.md)"
    return LEVEL[parts[1]]


def violations(root: Path) -> list[str]:
    graph, found = import_graph(root), []
    for name, targets in graph.items():
        found += [f"{name} imports {t} from a higher layer" for t in sorted(targets)
                  if t in graph and level(t) > level(name)]
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for t in sorted(graph.get(node, ())):
            if state.get(t) == 1:
                found.append("cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_imports_only_downward_and_there_is_no_cycle():
    assert len(modules(ROOT)) > 50
    assert violations(ROOT) == []


def test_a_planted_upward_import_and_a_planted_cycle_are_found(tmp_path):
    pkg = tmp_path / "flowmaps"
    (pkg / "objectives").mkdir(parents=True)
    (pkg / "runs").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "flowmap.py").write_text("import torch\n")
    (pkg / "objectives" / "__init__.py").write_text("from .lsd import LSD\n")
    (pkg / "objectives" / "lsd.py").write_text("def f():\n    from ..runs import config\n")
    (pkg / "runs" / "__init__.py").write_text("")
    (pkg / "runs" / "config.py").write_text("from ..objectives.lsd import LSD\n")
    assert violations(pkg) == [
        "flowmaps.objectives.lsd imports flowmaps.runs.config from a higher layer",
        "cycle: flowmaps.objectives.lsd -> flowmaps.runs.config -> flowmaps.objectives.lsd"]
    (pkg / "objectives" / "lsd.py").write_text("from ..flowmap import x\n")
    assert violations(pkg) == []
