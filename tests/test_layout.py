"""The package layout: every import points down the data flow, and no modules import each other.

The layers, lowest first. A module may import its own layer and those below; within a layer the
imports must not form a cycle. Imports inside functions count (they are dependencies all the
same); imports under `if TYPE_CHECKING:` do not (annotations only). A new module or package must
be placed here, so that its place in the flow is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LAYERS: list[tuple[str, ...]] = [
    ("distill.core",),  # run directory, atomic files, locks, seeds, prompt text, row schemas, stage registry
    ("data_pipelines",),  # items, readers, audio, synthetic tasks: need the core at most
    ("distill.models",),  # model families: the only place model-family facts live
    # each section's config beside its stage, then the schema that joins them
    (
        "distill.rollout.config",
        "distill.grounding.config",
        "distill.filter.config",
        "distill.training.config",
        "distill.rl.config",
        "distill.export.config",
        "distill.eval.config",
    ),
    ("distill.config",),
    ("distill.data", "distill.openai_client"),  # the run's datasets; the OpenAI-compatible client
    ("distill.rollout",),  # sample
    ("distill.grounding", "distill.filter"),  # ground and filter: one decision (filter/selection.py)
    ("distill.training",),  # train
    ("distill.rl",),  # GRPO on the round's pass-rate band
    ("distill.export",),
    ("distill.eval",),
    ("distill.report",),
    # what drives the stages: the loop, Slurm, status, the command line, the training entry point
    ("distill.loop", "distill.slurm", "distill.status", "distill.cli", "distill.train", "distill"),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in [*REPO.glob("distill/**/*.py"), *REPO.glob("data_pipelines/**/*.py")]:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def layer(module: str) -> int | None:
    """The layer of the longest prefix of `module` named in LAYERS."""
    best: tuple[int, int] | None = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (i, len(prefix))
    return None if best is None else best[0]


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports (a name imported from a package counts as the
    submodule when there is one)."""
    tree = ast.parse(path.read_text())
    skipped = type_checking_nodes(tree)
    targets: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != module and not module.startswith(target + "."):
            out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if layer(m) is None)
    assert not unplaced, f"place these in tests/test_layout.py LAYERS: {unplaced}"


def test_imports_point_down_the_data_flow():
    edges = graph()
    upward = sorted(
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in edges.items()
        for b in targets
        if layer(b) > layer(a)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    assert not cycles(graph())


def test_the_core_and_data_pipelines_stand_alone():
    """The core imports nothing of the project above it; data_pipelines needs the core at most."""
    edges = graph()
    for module, targets in edges.items():
        if module.startswith("distill.core"):
            assert all(t.startswith("distill.core") for t in targets), (module, targets)
        if module.startswith("data_pipelines"):
            assert all(t.startswith(("data_pipelines", "distill.core")) for t in targets), (module, targets)


def test_the_graph_reader_sees_what_it_must():
    """The checks above are only as good as the reader: it finds imports inside functions and
    relative ones, and skips annotation-only ones."""
    edges = graph()
    assert "distill.core.files" in edges["distill.core.rundir"]
    assert "distill.filter.judge" in edges["distill.filter.stage"]  # imported inside run_judge
    assert "distill.config" not in edges["distill.core.stages"]  # under TYPE_CHECKING
    found = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert found == [["a", "b", "c"]]


def test_the_config_and_the_command_line_load_without_torch():
    """Loading the config (a config error, `distill --help`) must not wait for torch: the section
    configs import only the core, and the packages they sit in load nothing on their own."""
    import subprocess
    import sys

    code = "import sys, distill.config, distill.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
