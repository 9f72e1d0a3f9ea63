"""`make bench` is not run by CI: every name a benchmark imports from the project must still exist (a
renamed function once left `bench_embed` failing half-way through a run)."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _project_imports(path: Path) -> list[tuple[str, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in ("locdiff", "benchmarks", "flows"):
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.split(".")[0] in ("locdiff", "benchmarks", "flows")]
    return out


def _resolves(module: str, name: str) -> bool:
    mod = importlib.import_module(module)
    if not name or hasattr(mod, name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_project_import_of_a_benchmark_resolves(script):
    imports = _project_imports(script)
    missing = [f"{m}.{n}" for m, n in imports if not _resolves(m, n)]
    assert not missing, f"{script.name} imports names that no longer exist: {missing}"


def test_the_check_sees_a_missing_name(tmp_path):
    bad = tmp_path / "bench_x.py"
    bad.write_text("def f():\n    from locdiff.data.images import decode_rgb\n")
    assert [(m, n) for m, n in _project_imports(bad) if not _resolves(m, n)] == [("locdiff.data.images",
                                                                                  "decode_rgb")]
