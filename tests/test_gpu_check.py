"""`make gpu-check` on a machine without a GPU (or with --dry-run): the CPU parts run at a tiny size, the
resumed CPU run ends bit-exact, and every GPU part is reported as skipped, saying so."""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu_check import SKIPPED, main


@pytest.mark.slow  # ~4 s on 2 cores (three short trainings and the synthetic data): `make test` runs it
def test_gpu_check_dry_run(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert main(["--dry-run", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dry run: the GPU parts are skipped" in printed and SKIPPED in printed
    result = json.loads(out.read_text())
    assert result["gpu"] is False
    checks = {c["check"]: c for c in result["checks"]}
    assert checks["CPU resume is bit-exact"]["result"] == "ok"
    assert checks["tiny-fp32-cpu-resumed: interrupted"]["result"] == "ok"
    assert all(c["result"] != "FAILED" for c in result["checks"])
    runs = {r["run"]: r for r in result["runs"]}
    assert runs["tiny-fp32-cpu"]["samples_per_s"] > 0 and runs["tiny-fp32-cpu"]["steps"] == 8
    gpu_runs = [r for name, r in runs.items() if "cpu" not in name]
    assert len(gpu_runs) == 8 and all(r["samples_per_s"] == SKIPPED for r in gpu_runs)
