"""The import-layer contract of locdiff/ and flows/ (docs/architecture.md), read from the source with `ast`.

- no import cycle among the modules, counting imports inside functions;
- imports inside functions only of a heavy optional library (HEAVY: loading them costs seconds or needs
  services, so a command that does not use them must not pay) or, for project modules, the one lazy export of
  `locdiff/__init__.py` (PEP 562: `locdiff.Geolocator` without loading torch on `import locdiff`); at most
  MAX_LOCAL_IMPORTS function-local imports of project modules in all (the issue's bound);
- each module imports only modules of its own layer or of lower layers (LAYERS, lowest first); a module's
  package `__init__` runs whenever the module is imported, so a package sits at or below its modules;
- no locdiff module over MAX_LINES lines.

`if TYPE_CHECKING:` imports are not imports at run time and are not counted. LAYERS is the one home of the
layer table; docs/architecture.md shows it (test_architecture_doc_lists_the_layers keeps the two in step).
Every module must have a layer: a new module is placed here first.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LOCAL_IMPORTS = 15
MAX_LINES = 600
HEAVY = frozenset({"ray", "mlflow", "prefect", "faiss", "transformers", "open_clip", "matplotlib",
                   "huggingface_hub", "boto3", "botocore", "s3fs", "moto", "geoclip", "sphericart", "img2dataset",
                   "uvicorn"})
LAZY_EXPORT = ("locdiff", "locdiff.inference.geolocator")  # (module, target) of the one allowed project import

# (layer, name, modules): a name matches itself; "x.*" matches every module under x. The most specific
# match wins (an exact name over a pattern, a longer pattern over a shorter one).
LAYERS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0, "base", ("locdiff", "locdiff.errors", "locdiff.schema", "locdiff.resources", "locdiff.geo",
                 "locdiff.tables", "locdiff.metrics", "locdiff.calibration", "locdiff.gazetteer",
                 "locdiff.hashing", "locdiff.throughput", "locdiff.tracking_store")),
    (1, "codec", ("locdiff.shdd", "locdiff.shdd.*")),
    # io reads tables through data.storage (local or s3://); plots draw what io reads
    (2, "data", ("locdiff.data", "locdiff.data.*", "locdiff.io", "locdiff.plots", "locdiff.embed",
                 "locdiff.embed.base", "locdiff.embed.clip")),
    # the packages locdiff.model and locdiff.baselines hold no code: they run before their config modules
    (3, "run", ("locdiff.runs", "locdiff.model", "locdiff.model.config", "locdiff.baselines",
                "locdiff.baselines.options", "locdiff.gallery_build")),
    (4, "engine", ("locdiff.engine", "locdiff.gallery")),
    # the method interface and registry (methods) beside what implements it, reached by name (importlib)
    (5, "methods", ("locdiff.methods", "locdiff.model.*", "locdiff.baselines.*")),
    (6, "inference", ("locdiff.inference", "locdiff.inference.*", "locdiff.worlds", "locdiff.worlds.*")),
    # embedding on Ray (data.featurize, embed.ray_runner) and the locate-photos stages (inference.batch)
    (7, "orchestration", ("locdiff.orchestration", "locdiff.orchestration.*", "locdiff.tracking",
                          "locdiff.evaluation", "locdiff.training", "locdiff.pipeline", "locdiff.distributed",
                          "locdiff.embed.ray_runner", "locdiff.data.featurize", "locdiff.inference.batch")),
    (8, "entry", ("locdiff.cli", "locdiff.cli.*", "locdiff.__main__", "flows", "flows.*")),
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: str  # its file, relative to the repository
    line: int
    targets: tuple[str, ...]  # project modules imported
    top: str  # the imported library's top-level name ("torch", "locdiff", ...)
    local: bool  # inside a function


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted([*ROOT.glob("locdiff/**/*.py"), *ROOT.glob("flows/**/*.py")]):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(sub) for sub in ast.walk(node) if isinstance(sub, ast.Import | ast.ImportFrom)}
    return out


def _function_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            out |= {id(sub) for sub in ast.walk(node) if isinstance(sub, ast.Import | ast.ImportFrom)}
    return out


@lru_cache(maxsize=1)
def _imports() -> tuple[dict[str, Path], tuple[Import, ...]]:
    mods = _modules()
    found = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        skip, local = _type_checking_nodes(tree), _function_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                names = [s for s in subs if s in mods]
                if len(names) < len(subs):
                    names.append(base)  # names that are not modules come from the module `base` itself
            tops = {n.split(".")[0] for n in names}
            targets = {_resolve(n, mods) for n in names if n.split(".")[0] in ("locdiff", "flows")} - {None, m}
            found.append(Import(m, p.relative_to(ROOT).as_posix(), node.lineno, tuple(sorted(targets)),
                                sorted(tops)[0] if tops else "", id(node) in local))
    return mods, tuple(found)


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer, name) of a module by the most specific entry of LAYERS; None when no entry matches."""
    best: tuple[int, int, str] | None = None
    for layer, name, patterns in LAYERS:
        for pat in patterns:
            if pat.endswith(".*"):
                score = len(pat) if module.startswith(pat[:-1]) else -1
            else:
                score = len(pat) + 1000 if module == pat else -1
            if score >= 0 and (best is None or score > best[0]):
                best = (score, layer, name)
    return (best[1], best[2]) if best else None


def _is_lazy_export(imp: Import) -> bool:
    return imp.local and (imp.module, imp.targets) == (LAZY_EXPORT[0], (LAZY_EXPORT[1],))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component (Tarjan), as a path that returns to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # breadth-first from the component's first module back to itself
        start = min(comp)
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & comp):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(prev[path[-1]])
        out.append(path[::-1])
    return out


def _fail_if(lines: list[str], title: str) -> None:
    """One line per offender, no traceback."""
    if lines:
        pytest.fail(f"{title} ({len(lines)}):\n" + "\n".join(f"  {line}" for line in lines), pytrace=False)


def test_every_module_has_a_layer():
    mods, _ = _imports()
    missing = [f"{m} ({p.relative_to(ROOT).as_posix()})" for m, p in mods.items() if layer_of(m) is None]
    _fail_if(missing, "modules in no layer: add them to tests/test_layers.py LAYERS")


def test_no_import_cycle():
    """Counting imports inside functions; the lazy export of locdiff/__init__.py runs only on attribute
    access (`locdiff.Geolocator`), never while a module is being imported, so it closes no cycle."""
    mods, imports = _imports()
    edges: dict[str, set[str]] = defaultdict(set, {m: set() for m in mods})
    for imp in imports:
        if not _is_lazy_export(imp):
            edges[imp.module].update(imp.targets)
    cycles = [" -> ".join(c) for c in _cycles(edges)]
    _fail_if(cycles, "import cycles")


def test_function_local_imports_only_for_heavy_optional_libraries():
    _, imports = _imports()
    local = [i for i in imports if i.local]
    wrong = [f"{i.path}:{i.line} imports {', '.join(i.targets) or i.top} inside a function"
             for i in local if not (i.top in HEAVY or _is_lazy_export(i))]
    _fail_if(wrong, f"function-local imports that are not of a heavy optional library ({', '.join(sorted(HEAVY))}) "
             "nor the lazy export")
    project = [i for i in local if i.targets]
    if len(project) > MAX_LOCAL_IMPORTS:
        _fail_if([f"{i.path}:{i.line} {', '.join(i.targets)}" for i in project],
                 f"function-local imports of project modules: {len(project)} > {MAX_LOCAL_IMPORTS}")


def test_modules_import_only_their_own_or_lower_layers():
    mods, imports = _imports()
    wrong = []
    for imp in imports:
        own = layer_of(imp.module)
        if own is None or _is_lazy_export(imp):
            continue
        for t in imp.targets:
            theirs = layer_of(t)
            if theirs is not None and theirs[0] > own[0]:
                wrong.append(f"{imp.path}:{imp.line} ({own[0]} {own[1]}) imports {t} ({theirs[0]} {theirs[1]})")
    for m in mods:  # importing a module runs its packages' __init__ first
        own, pkg = layer_of(m), m.rpartition(".")[0]
        while pkg:
            up = layer_of(pkg)
            if own is not None and up is not None and up[0] > own[0]:
                wrong.append(f"{m} ({own[0]} {own[1]}) sits in package {pkg} of a higher layer ({up[0]} {up[1]})")
            pkg = pkg.rpartition(".")[0]
    _fail_if(wrong, "imports of a higher layer")


def test_no_module_over_the_line_limit():
    mods, _ = _imports()
    big = [f"{p.relative_to(ROOT).as_posix()}: {n} lines" for m, p in mods.items() if m.startswith("locdiff")
           and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    _fail_if(big, f"modules over {MAX_LINES} lines")


def test_architecture_doc_lists_the_layers():
    """docs/architecture.md's layer table has the rows of LAYERS, in order, with the same names."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([a-z]+)\s*\|", text, flags=re.M)
    assert [(int(n), name) for n, name in rows] == [(layer, name) for layer, name, _ in LAYERS]


def test_the_checker_sees_what_it_must():
    """The checker itself, on known facts of this tree: a project import, a package and the lazy export."""
    mods, imports = _imports()
    assert "locdiff.shdd.codec" in mods and "flows" in mods
    assert layer_of("locdiff.model.config") == (3, "run") and layer_of("locdiff.model.csunet") == (5, "methods")
    assert layer_of("locdiff.embed.ray_runner") == (7, "orchestration") and layer_of("locdiff.embed") == (2, "data")
    assert layer_of("numpy") is None
    assert any(i.module == "locdiff.shdd.codec" and "locdiff.shdd.basis" in i.targets and not i.local
               for i in imports)
    assert sum(_is_lazy_export(i) for i in imports) == 1
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
