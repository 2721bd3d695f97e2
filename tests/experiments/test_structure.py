"""The package's structure: a torch-only core, and an experiment kit whose imports point one way.

The import graph of ``src/rbp`` is read with :mod:`ast`: module-level and function-level
``import rbp...`` / ``from rbp... import``, relative imports, ``importlib.import_module`` calls
with a literal name, and the lazy name tables of package ``__init__`` files (``if
TYPE_CHECKING:`` blocks are left out: they never run).
``python tests/experiments/test_structure.py --write`` redraws ``docs/architecture.md``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"

#: Groups of the drawing, in layer order (a group may import only groups above it).
#: storage -> config -> run lifecycle -> {sweep, report} -> CLI.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("storage", ("rbp.runner.signals", "rbp.runner.results", "rbp.runner.checkpoint",
                 "rbp.runner.progress", "rbp.runner.stats", "rbp.runner.tables",
                 "rbp.runner.aggregate",
                 "rbp.runner.plots")),
    ("config", ("rbp.runner.config", "rbp.runner.registry", "rbp.runner.arguments")),
    ("lifecycle", ("rbp.runner.lock", "rbp.runner.resume", "rbp.runner.lifecycle")),
    ("sweep", ("rbp.runner.sweep",)),
    ("report", ("rbp.runner.report",)),
    ("cli", ("rbp.runner.cli", "rbp.runner.__main__")),
]
#: Modules loaded by a name computed at run time (not visible to ``ast``): drawn dotted.
DYNAMIC: dict[str, tuple[str, ...]] = {
    "rbp.runner.cli": ("rbp.runner.sweep", "rbp.runner.report"),
    "rbp.runner.registry": ("rbp.apps.hopfield", "rbp.apps.citation", "rbp.apps.hyperopt"),
}
#: These layers may not import each other (siblings).
SIBLINGS = {("sweep", "report"), ("report", "sweep")}
#: What the core's dependencies are called when imported (torch, and NumPy, which torch uses).
CORE_DEPS = {"torch", "numpy"}
#: What the experiment kit's dependencies are called when imported.
KIT_MODULES = {"scipy", "sklearn", "matplotlib", "yaml", "tqdm", "mlxtend",
               "threadpoolctl", "jinja2", "torch_geometric", "ray"}


# ---------------------------------------------------------------- the graph


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the ``rbp`` package: dotted name -> file."""
    out = {}
    for path in sorted((src / "rbp").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node``, without the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for o in child.orelse for n in [o, *_walk(o)])
            continue
        yield child
        yield from _walk(child)


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> dict[str, list[str]]:
    """``{imported module: [where, ...]}`` for one module; ``where`` is ``line N (kind)``.

    Third-party and standard-library imports are keyed by their top-level name.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, list[str]] = {}

    def add(name: str, line: int, kind: str) -> None:
        target = _target(name, known) if name.split(".")[0] == "rbp" else name.split(".")[0]
        if target is not None and target != module:
            found.setdefault(target, []).append(f"line {line} ({kind})")

    for node in _walk(tree):
        kind = "module-level" if node in tree.body else "in a function"
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, kind)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base, node.lineno, kind)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(arg.value, node.lineno, "importlib")
    if path.name == "__init__.py":  # lazy name tables: {"Name": "module"}
        for node in tree.body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, ast.Dict) and value.values and all(
                    isinstance(v, ast.Constant) and isinstance(v.value, str) for v in value.values):
                for v in value.values:
                    for name in (f"{module}.{v.value}", str(v.value)):
                        if name in known:
                            add(name, v.lineno, "lazy export")
                            break
    return found


def import_graph(src: Path = SRC) -> dict[str, dict[str, list[str]]]:
    """``{module: {imported: [where]}}`` for every module of ``rbp``."""
    known = modules(src)
    return {m: imports_of(m, p, known) for m, p in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def is_core(module: str) -> bool:
    """``rbp``, its top-level modules (fixed_point, methods, diagnostics...) and the core's
    packages ``rbp.forward.*`` and ``rbp.linear.*``."""
    return module == "rbp" or module.startswith(("rbp.forward.", "rbp.linear.")) or (
        module.count(".") == 1 and not module.startswith(("rbp.runner", "rbp.apps", "rbp.data")))


def group_of(module: str) -> str:
    """The drawing's node for ``module``."""
    if is_core(module):
        return "core"
    if module.startswith("rbp.data"):
        return "data"
    if module.startswith("rbp.apps."):
        return "apps." + module.split(".")[2]
    if module == "rbp.apps":
        return "apps"
    for name, members in LAYERS:
        if any(module == m or module.startswith(m + ".") for m in members):
            return name
    return module.removeprefix("rbp.")  # a runner module of no layer yet: drawn on its own


def group_graph(graph: dict[str, dict[str, list[str]]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, deps in graph.items():
        g = group_of(module)
        out.setdefault(g, set())
        for dep in deps:
            if dep.startswith("rbp") and group_of(dep) != g:
                out[g].add(group_of(dep))
    return out


def mermaid(graph: dict[str, dict[str, list[str]]]) -> str:
    """The drawing: one node per group, an arrow from each group to what it imports."""
    groups = group_graph(graph)
    lines = ["flowchart BT"]
    ids = {g: g.replace(".", "_") for g in groups}
    lines += [f'    {ids[g]}["{g}"]' for g in sorted(groups)]
    lines += [f"    {ids[g]} --> {ids[d]}" for g in sorted(groups) for d in sorted(groups[g])]
    dotted = sorted({(group_of(m), group_of(t)) for m, ts in DYNAMIC.items() for t in ts})
    lines += [f"    {ids[g]} -.-> {ids[d]}" for g, d in dotted if g in ids and d in ids]
    return "\n".join(lines)


def architecture_doc(graph: dict[str, dict[str, list[str]]]) -> str:
    """``docs/architecture.md``: the drawing and the layers."""
    members = [f"| {name} | {', '.join(f'`{m}`' for m in mods)} |" for name, mods in LAYERS]
    loads = [f"| `{m}` | {', '.join(f'`{t}`' for t in targets)} |"
             for m, targets in DYNAMIC.items()]
    return "\n".join([
        "# Architecture: a torch-only core and an experiment kit",
        "",
        "Generated from the import graph by `python tests/experiments/test_structure.py "
        "--write`;",
        "`tests/experiments/test_structure.py` checks that it is current, that the graph has no",
        "cycle, that imports point one way (an arrow goes from a module to what it imports),",
        "that nothing imports the CLI, and that the core imports nothing but torch, NumPy and",
        "the standard library. Dotted arrows: modules loaded by a name computed at run time (the",
        "CLI's sub-commands, the registry's built-in applications, which register themselves).",
        "",
        "```mermaid",
        mermaid(graph),
        "```",
        "",
        "- **core**: `rbp`, its top-level modules (`fixed_point`, `methods`, `checks`,",
        "  `diagnostics`, `tree`, `module`, ...) and the `rbp.forward` and `rbp.linear`",
        "  packages; imports torch,",
        "  NumPy and the standard library only: `pip install torch-rbp`.",
        "",
        "  Inside the core, `fixed_point` checks every option in one place (`_validate`, also",
        "  what `rbp.FixedPoint` runs at construction), resolves the method value",
        "  (`methods`), runs the forward (`rbp.forward`) and attaches the implicit backward",
        "  (`adjoint`, with `jacobian` for the products with J at the fixed point, and",
        "  `rbp.linear`). Options live on the values they configure, each checked",
        "  when built: the forward's stopping rule on the forward solver, the backward's on",
        "  the backward solver, the checks on `rbp.Checks` (`checks`).",
        "  `rbp.forward` is a package: `protocol` says what a forward",
        "  solver is (a value with `init(x, max_evals)` whose state has `step(x, fx, g)` over",
        "  the live rows and `keep(rows)` for when rows leave); `iterate`, `anderson` and",
        "  `broyden` are one solver each; `loop` is the one loop that runs any of them with",
        "  per-sample stopping, the best iterate and the stopping test; `unroll` is the exact",
        "  T-step paths (the paper's unroll, bptt/tbptt with tol); `rows` the row layout and",
        "  the checks of `f`; `run` chooses the path; `result` and `report` the record it",
        "  returns and the messages. A solver of your own written against `protocol` runs",
        "  per sample like the built-in ones. `rbp.linear` (the adjoint's linear solvers):",
        "  `protocol` (`Solution`, the operator `matvec`), `series` (Neumann, RBP), `krylov`",
        "  (CG on the normal equations, GMRES), `estimates` (their error estimates and",
        "  statuses), `values` (the solvers as values) and `shine` (the forward's",
        "  quasi-Newton inverse as the backward's preconditioner).",
        "- **experiment kit**: `pip install \"torch-rbp[experiments]\"`: `rbp.data` (loaders),",
        "  `rbp.apps.*` (the paper's three applications, using the core's public API) and",
        "  `rbp.runner`, in layers; each imports only the layers above it:",
        "",
        "| layer | modules |",
        "|---|---|",
        *members,
        "",
        "Loaded by name at run time:",
        "",
        "| module | loads |",
        "|---|---|",
        *loads,
        "",
    ])


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, list[str]]]:
    return import_graph()


def _rbp_edges(graph: dict[str, dict[str, list[str]]], prefix: tuple[str, ...]
               ) -> dict[str, set[str]]:
    return {m: {d for d in deps if d.startswith(prefix)} for m, deps in graph.items()
            if m.startswith(prefix)}


def test_the_graph_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "rbp"
    (pkg / "runner").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("")
    (pkg / "runner" / "__init__.py").write_text('_WHERE = {"X": "b"}\n')
    (pkg / "runner" / "a.py").write_text(textwrap.dedent("""\
        from typing import TYPE_CHECKING
        import importlib
        from . import b
        if TYPE_CHECKING:
            from rbp.runner import c
        def f():
            from rbp.core import thing
            importlib.import_module("rbp.runner.c")
        """))
    for name in ("b", "c"):
        (pkg / "runner" / f"{name}.py").write_text("import numpy\nfrom ..runner.a import f\n")
    g = import_graph(tmp_path)
    assert set(g["rbp.runner.a"]) == {"typing", "importlib", "rbp.runner.b", "rbp.core",
                                      "rbp.runner.c"}
    assert g["rbp.runner.a"]["rbp.core"] == ["line 7 (in a function)"]
    assert g["rbp.runner"] == {"rbp.runner.b": ["line 1 (lazy export)"]}
    assert set(g["rbp.runner.b"]) == {"numpy", "rbp.runner.a"}
    edges = {m: {d for d in deps if d.startswith("rbp")} for m, deps in g.items()}
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1] and "rbp.runner.a" in cycle


def test_no_import_cycle_in_the_runner_apps_and_data(graph: dict) -> None:
    edges = _rbp_edges(graph, ("rbp.runner", "rbp.apps", "rbp.data"))
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_nothing_imports_the_cli(graph: dict) -> None:
    offenders = [f"{m} imports rbp.runner.cli ({', '.join(deps['rbp.runner.cli'])})"
                 for m, deps in graph.items()
                 if "rbp.runner.cli" in deps and m != "rbp.runner.__main__"]
    assert not offenders, "\n".join(offenders)


def test_imports_point_one_way(graph: dict) -> None:
    rank = {name: i for i, (name, _) in enumerate(LAYERS)}
    wrong = []
    for module, deps in graph.items():
        g = group_of(module)
        for dep in deps:
            d = group_of(dep) if dep.startswith("rbp") else None
            if g in rank and d in rank and (rank[d] > rank[g] or (g, d) in SIBLINGS):
                wrong.append(f"{module} ({g}) imports {dep} ({d}): {', '.join(deps[dep])}")
            if d is not None and d.startswith("apps") and not g.startswith("apps"):
                wrong.append(f"{module} imports the application module {dep}")
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_only_its_dependencies_and_the_standard_library(graph: dict) -> None:
    """The core imports torch, NumPy (its two dependencies) and the standard library."""
    allowed = set(sys.stdlib_module_names) | CORE_DEPS | {"__future__"}
    bad = []
    for module, deps in graph.items():
        if not is_core(module):
            continue
        for dep, where in deps.items():
            ok = is_core(dep) if dep.startswith("rbp") else dep in allowed
            if not ok:
                bad.append(f"{module} imports {dep} ({', '.join(where)})")
    assert not bad, "\n".join(bad)
    assert {m for m in graph if is_core(m)} >= {"rbp", "rbp.fixed_point", "rbp.linear"}


def test_the_kit_uses_only_the_cores_public_api(graph: dict) -> None:
    """Applications, loaders and runner reach the core through ``rbp`` (its ``__init__``)."""
    private = [f"{m} imports {d} ({', '.join(w)})" for m, deps in graph.items()
               if not is_core(m) for d, w in deps.items()
               if d.startswith("rbp") and is_core(d) and d != "rbp"]
    assert not private, "\n".join(private)


def test_using_the_core_loads_no_experiment_module() -> None:
    """At run time: importing ``rbp`` and differentiating through a fixed point loads none of
    the kit's modules."""
    code = textwrap.dedent(f"""\
        import sys, torch
        before = set(sys.modules)
        import rbp
        W = torch.nn.Parameter(0.1 * torch.randn(3, 3, dtype=torch.float64))
        f = lambda h: torch.tanh(h @ W.T + 1.0)
        h0 = torch.zeros(2, 3, dtype=torch.float64)
        for method in rbp.METHODS:
            W.grad = None
            rbp.fixed_point(f, h0, 30, method, 10).sum().backward()
            assert W.grad is not None and bool(torch.isfinite(W.grad).all()), method
        new = set(sys.modules) - before
        kit = {sorted(KIT_MODULES)!r}
        bad = sorted(m for m in new if m.split(".")[0] in kit or m.startswith(
            ("rbp.runner", "rbp.apps", "rbp.data")))
        print("BAD", bad)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BAD []" in proc.stdout, proc.stdout


def test_the_command_without_the_extra_says_what_to_install() -> None:
    """``rbp`` in a core-only install: one clear line, exit 2, no traceback (the missing
    modules are hidden from the import system)."""
    code = textwrap.dedent("""\
        import importlib.abc, importlib.util, sys
        HIDDEN = ("yaml", "tqdm", "scipy", "sklearn")
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, Hide())
        _find = importlib.util.find_spec
        importlib.util.find_spec = lambda n, *a: None if n in HIDDEN else _find(n, *a)
        from rbp.runner.__main__ import main
        sys.exit(main(["list"]))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert 'pip install "torch-rbp[experiments]"' in proc.stderr and "yaml" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_the_dynamic_loads_are_real(graph: dict) -> None:
    """Each module drawn as loaded by name exists and does load modules by name."""
    for module, targets in DYNAMIC.items():
        assert module in graph and all(t in graph for t in targets), (module, targets)
        assert "import_module(" in modules()[module].read_text(), module


def test_the_architecture_drawing_is_current(graph: dict) -> None:
    assert DOC.is_file(), "docs/architecture.md is missing: run " \
        "python tests/experiments/test_structure.py --write"
    assert DOC.read_text() == architecture_doc(graph), (
        "docs/architecture.md is out of date with the imports: run "
        "python tests/experiments/test_structure.py --write")


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(architecture_doc(import_graph()))
        print(f"wrote {DOC}")
    else:
        print(mermaid(import_graph()))
