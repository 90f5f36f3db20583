"""Layering of the packages, read from the source (ast; nothing is imported or run).

The rules (docs/architecture.md, "Layers"): engine/'s subpackages form an order (``ENGINE_LAYERS``) and a module
imports only from its own subpackage and the ones before it; engine/'s top level holds only the entry points;
heads/ is a lower layer than engine/ and imports nothing from it; bench/
scripts use the package, never the test suite; there is no import cycle among the library packages, counting
imports inside functions (a lazy import hides a cycle from the interpreter, not from the design); and no module
is named like a standard-library module (``dali_pipes/inspect.py`` once shadowed ``inspect`` for any script run
from inside ``dali_pipes/``).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("backbones", "dali_pipes", "engine", "heads")  # import cycles are forbidden among these
ALL_DIRS = LIBRARY + ("bench", "tests")


def _modules(root: Path, dirs: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file for every .py file in ``dirs`` (a package's ``__init__`` is the package)."""
    out: dict[str, Path] = {}
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported_names(name: str, path: Path) -> set[str]:
    """Absolute dotted names of everything ``path`` imports, at any depth (functions, methods, ``if`` blocks).

    ``from a.b import c`` yields ``a.b.c`` (``_resolve`` maps it to the module ``a.b.c`` when that exists,
    else to ``a.b``); relative imports are made absolute against the module's package.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names)
    return names


def _resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is one of ``modules`` (None for third-party/stdlib names)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path, dirs: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ``dirs`` it imports (edges to itself, e.g. ``from pkg import x`` in pkg, dropped).

    A package's ``__init__`` is not counted as imported by ``import pkg.mod``: Python runs it first, but a cycle
    through it would make every package with re-exports look circular.
    """
    modules = _modules(root, dirs)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {_resolve(n, modules) for n in _imported_names(name, path)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; every one is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _edges_into(graph: dict[str, set[str]], source_prefix: str, target_prefix: str) -> list[str]:
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() if under(src, source_prefix)
                  for dst in dsts if under(dst, target_prefix))


def test_graph_sees_lazy_relative_and_from_imports(tmp_path):
    """The walker itself: a cycle closed only by an import inside a function is found; clean code passes."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("from . import c\n\ndef f():\n    from pkg.b import g\n    return g()\n")
    (pkg / "b.py").write_text("import os\n\ndef g():\n    if True:\n        from .a import f\n    return 1\n")
    (pkg / "c.py").write_text("from pkg import d\n")
    (pkg / "d.py").write_text("import pkg.c.nothing_here\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.d"},
                     "pkg.d": {"pkg.c"}}
    assert import_cycles(graph) == [["pkg.c", "pkg.d"], ["pkg.a", "pkg.b"]]
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    (pkg / "d.py").write_text("import os.path\n")
    assert import_cycles(import_graph(tmp_path, ("pkg",))) == []


def test_no_import_cycles():
    graph = import_graph(ROOT, LIBRARY)
    assert "engine.train.trainer" in graph and "dali_pipes.loader" in graph, "module walk found no package code"
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (counting imports inside functions): " + "; ".join(
        "{" + ", ".join(c) + "}" for c in cycles)


def test_heads_do_not_import_engine():
    edges = _edges_into(import_graph(ROOT, LIBRARY), "heads", "engine")
    assert not edges, f"heads/ is below engine/ and must not import it: {edges}"


def test_bench_does_not_import_tests():
    edges = _edges_into(import_graph(ROOT, ALL_DIRS), "bench", "tests")
    assert not edges, f"bench/ scripts must use the package, not the test suite: {edges}"


# Command names users type, fixed by the issue that asked for them: `python -m engine.profile` (issue 12).
# An entry module is only ever run as `python -m engine.X` (sys.path[0] is the working directory, so stdlib
# `profile` stays importable); it holds no code of its own beyond argument parsing (engine/perf/profiler.py does).
ENTRY_POINTS = {"engine.profile"}


def test_no_module_shadows_the_standard_library():
    clashes = sorted(f"{name} ({path.relative_to(ROOT)})" for name, path in _modules(ROOT, ALL_DIRS).items()
                     if name.rpartition(".")[2] in sys.stdlib_module_names and name not in ENTRY_POINTS)
    assert not clashes, f"modules named like standard-library modules: {clashes}"


# engine/'s subpackages, lowest first. A module may import its own subpackage and the ones before it; the
# top-level entry modules (ENGINE_ENTRY_MODULES) may import anything.
ENGINE_LAYERS = ("runtime", "config", "parallel", "state", "eval", "perf", "train")
ENGINE_ENTRY_MODULES = {"engine", "engine.profile", "engine.plan", "engine.export", "engine.eval_ijb",
                        "engine.convert_config", "engine.verification", "engine.make_bin", "engine.embed"}


def layer_violations(graph: dict[str, set[str]], layers: tuple[str, ...] = ENGINE_LAYERS,
                     package: str = "engine") -> list[str]:
    """Edges ``a -> b`` between engine subpackages where b's layer comes after a's (a back-import)."""
    rank = {name: i for i, name in enumerate(layers)}

    def layer_of(module: str):
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[0] == package and parts[1] in rank else None

    bad = []
    for src, dsts in graph.items():
        a = layer_of(src)
        if a is None:
            continue
        for dst in dsts:
            b = layer_of(dst)
            if b is not None and rank[b] > rank[a]:
                bad.append(f"{src} ({a}) -> {dst} ({b})")
            elif dst.startswith(package + ".") and b is None and dst not in ENGINE_ENTRY_MODULES | {package}:
                bad.append(f"{src} -> {dst} (not in a layer)")
            elif dst in ENGINE_ENTRY_MODULES - {package}:
                bad.append(f"{src} ({a}) -> {dst} (an entry point; import the subpackage module instead)")
    return sorted(bad)


def test_layer_check_fails_on_a_back_import(tmp_path):
    """The checker itself: a lower layer importing a higher one (even lazily) is reported; the reverse is not."""
    for sub in ("runtime", "train"):
        (tmp_path / "engine" / sub).mkdir(parents=True)
        (tmp_path / "engine" / sub / "__init__.py").write_text("")
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "train" / "t.py").write_text("from engine.runtime import r\n")
    (tmp_path / "engine" / "runtime" / "r.py").write_text("import os\n")
    assert layer_violations(import_graph(tmp_path, ("engine",))) == []
    (tmp_path / "engine" / "runtime" / "r.py").write_text("def f():\n    from engine.train.t import x\n")
    assert layer_violations(import_graph(tmp_path, ("engine",))) == [
        "engine.runtime.r (runtime) -> engine.train.t (train)"]


def test_engine_layers_are_respected():
    graph = import_graph(ROOT, LIBRARY)
    assert "engine.runtime.dist" in graph and "engine.train.build" in graph, "module walk found no engine code"
    bad = layer_violations(graph)
    assert not bad, "engine/ imports against the layer order " + " < ".join(ENGINE_LAYERS) + ": " + "; ".join(bad)


def test_engine_top_level_holds_only_entry_points():
    top = sorted(p.stem for p in (ROOT / "engine").glob("*.py") if p.stem != "__init__")
    extra = sorted(f"engine.{name}" for name in top if f"engine.{name}" not in ENGINE_ENTRY_MODULES)
    assert not extra, f"modules at engine/'s top level that are not entry points: {extra}"
    subpackages = sorted(p.name for p in (ROOT / "engine").iterdir() if (p / "__init__.py").exists())
    assert subpackages == sorted(ENGINE_LAYERS), subpackages
