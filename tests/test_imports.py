"""No import cycles in revbits, lazy (function-level) imports included, between modules and between
the top-level units (subpackages and top-level modules) of DESIGN.md's layering; and the arrows DESIGN
forbids: PETRA's stage runtime imports no model, and the models import neither PETRA nor training.

The same check from the command line: ``python -m pytest tests/test_imports.py -q``."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"


def module_names() -> dict[str, Path]:
    names = {}
    for path in (SOURCE / "revbits").rglob("*.py"):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The revbits modules ``module`` imports anywhere in its file (top level or inside functions)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            # `from p import m` imports module p.m if there is one, else the name m of module p
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name imported from a module: the module
                target = target.rpartition(".")[0]
            if target.startswith("revbits") and target != module:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def module_graph() -> dict[str, set[str]]:
    """{module: the revbits modules it imports}; the command line also imports, by name, the module of each
    row of its command table (revbits.cli.COMMANDS)."""
    from revbits.cli import COMMANDS

    known = module_names()
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    graph["revbits.cli"] |= {row.adds.split(":")[0] for row in COMMANDS.values()}
    return graph


def unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_imports_another_in_a_cycle():
    graph = module_graph()
    assert len(graph) > 50 and graph["revbits.train.commands"], "the scan sees the package"
    assert {"revbits.train.commands", "revbits.bench", "revbits.data.cli"} <= graph["revbits.cli"]
    assert cycles(graph) == []


def test_the_top_level_units_form_layers_without_cycles():
    units: dict[str, set[str]] = {}
    for module, imports in module_graph().items():
        if module != "revbits":  # the root package re-exports the public API
            outside = {unit(m) for m in imports} - {unit(module), "revbits"}
            units.setdefault(unit(module), set()).update(outside)
    assert cycles(units) == []
    assert "revbits.train" not in units["revbits.petra"], "petra is the stage runtime; the training command is in train"


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def forbidden_imports(graph: dict[str, set[str]], importers: list[str], forbidden: tuple[str, ...]) -> dict[str, list]:
    """{module: the modules within ``forbidden`` it imports}, for each of ``importers`` that imports any."""
    found = {}
    for module in importers:
        bad = sorted(m for m in graph[module] if within(m, forbidden))
        if bad:
            found[module] = bad
    return found


def test_petra_runtime_imports_no_model_and_models_import_neither_petra_nor_train():
    """DESIGN: petra/ is the stage runtime; the code that cuts a model into pieces is revbits.petra.pieces, the one
    part of petra that may import revbits.models. The runtime does not import the pieces either (the package's
    __init__ re-exports them, as the public API). revbits.models knows nothing of PETRA or of training."""
    graph = module_graph()
    pieces = ("revbits.petra.pieces",)
    petra = [m for m in graph if within(m, ("revbits.petra",)) and not within(m, pieces)]
    runtime = [m for m in petra if m != "revbits.petra"]
    models = [m for m in graph if within(m, ("revbits.models",))]
    assert "revbits.petra.runtime" in runtime and "revbits.models.gpt" in models
    assert "revbits.models.gpt" in graph["revbits.petra.pieces.gpt"], "the scan sees the pieces' imports"
    assert forbidden_imports(graph, petra, ("revbits.models", "revbits.train", "revbits.hf")) == {}
    assert forbidden_imports(graph, runtime, pieces) == {}
    assert forbidden_imports(graph, models, ("revbits.petra", "revbits.train")) == {}


def test_the_layering_check_finds_a_forbidden_arrow():
    graph = {"p.run": {"p.stages"}, "p.stages": {"t", "m.x", "p.run"}, "p.pieces.a": {"m.x"}}
    assert forbidden_imports(graph, ["p.run", "p.stages"], ("m", "t")) == {"p.stages": ["m.x", "t"]}


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
