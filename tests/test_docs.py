"""The README's layout table is true: one line per folder, every folder it names exists, and every folder
of the repository (and every folder under locdiff/) has its line. The docs it links exist."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _layout_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def _tracked_folders() -> set[str]:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True,
                               timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    out = set()
    for f in files:
        parts = f.split("/")[:-1]
        if not parts:
            continue
        out.add(parts[0] + "/")
        if parts[0] == "locdiff":  # every folder of the library, at any depth
            out.update("/".join(parts[:i]) + "/" for i in range(2, len(parts) + 1))
    return out


def test_layout_table_names_existing_folders_once():
    rows = _layout_rows()
    assert rows, "README.md has no Layout table"
    missing = [r for r in rows if not (ROOT / r).is_dir()]
    assert not missing, f"README Layout names folders that do not exist: {missing}"
    assert all(r.endswith("/") for r in rows), f"one line per folder (FOLDER/): {rows}"
    assert len(rows) == len(set(rows)), f"a folder has more than one line: {rows}"


def test_every_folder_has_a_layout_line():
    rows = set(_layout_rows())
    unlisted = sorted(_tracked_folders() - rows)
    assert not unlisted, f"folders without a line in README's Layout table: {unlisted}"


def test_readme_links_the_docs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in ("docs/architecture.md", "docs/results.md", "docs/testing.md"):
        assert f"]({doc})" in text and (ROOT / doc).is_file(), doc
