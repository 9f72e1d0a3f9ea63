"""`bench_model --report`: the README's tables from the saved JSON, and no machine-local path in that JSON."""

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import bench_model

ROOT = Path(__file__).resolve().parents[1]


def _metrics(base: float) -> dict[str, float]:
    return {k: base + i for i, k in enumerate(("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km"))}


def test_report_has_one_row_per_method_and_the_splits_in_order():
    payload = {"benchmarks": ["synth"], "sizes": {"synth": {"train": 100, "val": 10, "test": 20}},
               "results": {"synth": {"knn": {"val": _metrics(1), "test": _metrics(2)},
                                     "LocDiff-H": {"val": _metrics(10), "test": _metrics(20)}}},
               "sampling": {"synth": {"two_place_probe": [{"method": "m", "names_both_%": 31.0,
                                                           "names_one_%": 80.0, "probes": 5}]}},
               "args": {"radius": 750.0}, "machine": {"cpus": 2}, "complete": True}
    text = bench_model.markdown_report(payload)
    assert "| method | val | test |" in text
    assert "| retrieval (knn top-1) | 1.0 / 2.0 / 3.0 / 4.0 / 5.0 | 2.0 / 3.0 / 4.0 / 5.0 / 6.0 |" in text
    assert "| LocDiff-H | 10.0 / 11.0 / 12.0 / 13.0 / 14.0 | 20.0 / 21.0 / 22.0 / 23.0 / 24.0 |" in text
    assert "cell classifier" not in text  # a method the run does not have gets no row
    assert "| synth | m | 31.0 | 80.0 | 5 |" in text


def test_recorded_args_hold_no_machine_local_path(tmp_path):
    args = argparse.Namespace(config=str(ROOT / "configs/model/base.yaml"), work=str(tmp_path / "w"), seed=0)
    out = bench_model.recorded_args(args)
    assert out == {"config": "configs/model/base.yaml", "work": "w", "seed": 0}
    saved = json.loads((ROOT / "benchmarks/results/model.json").read_text())
    assert str(ROOT.parent) not in json.dumps(saved)


def test_no_kept_benchmark_json_holds_a_machine_local_path():
    """Every benchmark JSON the repository keeps (un-ignored in .gitignore) names no path of the machine it ran on
    (bench_kl_share once recorded its config's absolute path)."""
    kept = [line[1:] for line in (ROOT / ".gitignore").read_text().splitlines()
            if line.startswith("!benchmarks/results/")]
    assert len(kept) > 1
    for name in kept:
        text = (ROOT / name).read_text()
        assert not [p for p in (f"{ROOT.parent}/", "/tmp/", "/home/", "/root/") if p in text], name


def test_report_says_which_rows_an_update_measured_again():
    payload = {"benchmarks": ["synth"], "sizes": {"synth": {"train": 100, "val": 10}},
               "results": {"synth": {"LocDiff-H": {"val": _metrics(10)}}}, "args": {},
               "machine": {"cpus": 2, "date": "2026-12-06 11:14:54"}, "complete": True,
               "updates": [{"rows": ["LocDiff-H"], "selection_rule": 2, "date": "2026-12-06 12:16:14"},
                           {"rows": ["two-place probe"], "flag": "--update-probe", "date": "2026-12-07 09:00:00"}]}
    text = bench_model.markdown_report(payload)
    assert "run of 2026-12-06 11:14:54." in text  # the run's own date stays
    assert ("Rows LocDiff-H chosen again and re-measured on the same trained runs on 2026-12-06 12:16:14 "
            "(selection rule 2, `--update-hybrid`).") in text
    assert ("Rows two-place probe measured again on the same trained runs on 2026-12-07 09:00:00 "
            "(`--update-probe`).") in text


def test_default_args_are_the_command_lines_defaults():
    args = bench_model.default_args()
    assert (args.n_train, args.n_train_realbench, args.n_val, args.seed) == (50_000, 60_000, 4_000, 0)
    assert not args.update_hybrid and not args.update_probe and args.work is None


def test_a_smoke_or_unfinished_run_never_replaces_the_finished_results(tmp_path):
    """--quick writes model-quick.json, --out wherever it names; checkpoints of a run go to NAME.partial.json
    beside it, and `save` replaces a file whole (the old results or all of the new ones)."""
    from benchmarks.common import RESULTS, save

    parse = bench_model.build_parser().parse_args
    assert bench_model.results_path(parse([])) == RESULTS / "model.json"
    assert bench_model.results_path(parse(["--quick"])) == RESULTS / "model-quick.json"
    out = tmp_path / "mine.json"
    assert bench_model.results_path(parse(["--quick", "--out", str(out)])) == out
    assert bench_model.partial_path(out) == tmp_path / "mine.partial.json"
    save(out, {"results": {"a": 1}})
    save(out, {"results": {"a": 2}})
    assert json.loads(out.read_text())["results"] == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]  # no temporary file left


def test_save_on_a_full_disk_keeps_the_results_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from benchmarks.common import save

    out = tmp_path / "mine.json"
    save(out, {"results": {"a": 1}})

    def fills_the_disk(self, text, *args, **kwargs):  # noqa: ANN001
        with open(self, "w") as f:
            f.write(text[:10])  # part of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", fills_the_disk)
    with pytest.raises(OSError):
        save(out, {"results": {"a": 2}})
    monkeypatch.undo()
    assert json.loads(out.read_text())["results"] == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]


def test_save_removes_the_temporary_file_of_a_killed_save(tmp_path):
    import subprocess
    import sys

    from benchmarks.common import save

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f".mine.json.tmp-{dead}").write_text('{"machi')  # as a save killed inside its write leaves
    save(tmp_path / "mine.json", {"results": {"a": 1}})
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]


def test_saved_results_state_the_machine_they_were_measured_on(tmp_path):
    """Every benchmark's JSON states its CPUs, torch threads, and torch and CUDA versions."""
    import torch

    from benchmarks.common import save

    out = save(tmp_path / "mine.json", {"results": {"a": 1}})
    m = json.loads(out.read_text())["machine"]
    assert m["cpus"] >= 1 and m["torch_threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert "cuda_version" in m and m["cuda_version"] == torch.version.cuda
