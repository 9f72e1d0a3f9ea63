"""The CLI's error boundary: every failure a user can cause is ONE line naming the culprit, exit code 2;
`--debug` adds the traceback; Ctrl-C is exit 130. And `locdiff.errors.reraise_for` names a corrupt file."""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from locdiff.cli import main
from locdiff.errors import (
    ConfigError,
    CorruptFileError,
    DiskFullError,
    UserError,
    describe,
    exit_code,
    reraise_for,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "model" / "tiny.yaml"


def _train(tmp_path: Path, config: str | Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--train", str(tmp_path / "absent.parquet"),
            "--out", str(tmp_path / "run"), *extra]


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# (config file text, or None for a directory; extra args; the one line expected after "error: FILE")
BAD_CONFIGS = [
    ("train:\n  stepz: 3\n", [], ": train.stepz: unknown key (did you mean 'steps'?); valid keys here: objective"),
    ("trian:\n  steps: 3\n", [], ": trian: unknown key (did you mean 'train'?); valid keys here: method, shdd"),
    ("train:\n  steps: ten\n", [], ": train.steps: must be an integer in [1, 1000000000]; got 'ten'"),
    ("train:\n  amp: 1\n", [], ": train.amp: must be true or false; got 1"),
    ("train:\n  lr: 1e-3\n", [], ": train.lr: must be a number in (0, 10]; got '1e-3' (YAML reads 1e-3 as text; "
                                  "write 1.0e-3)"),
    ("train: 5\n", [], ": train: must be a mapping with keys objective, kl_weight"),
    ("network:\n  widths: 64\n", [], ": network.widths: must be a non-empty list of integers in [1, 65536] "
                                     "(at most 16 items); got 64"),
    ("train:\n  objective: l1\n", [], ": train.objective: must be one of 'kl', 'mse', 'kl+mse'; got 'l1'"),
    ("method: knm\n", [], ": method: must be one of 'locdiff', 'knn', 'geocell', 'regress', 'flow'; got 'knm'"),
    ("baselines:\n  knm: {}\n", [], ": baselines.knm: unknown baseline; valid names here: knn, geocell"),
    ("baselines:\n  knn:\n    kk: 3\n", [], ": baselines.knn.kk: unknown key (did you mean 'k'?)"),
    ("- 1\n- 2\n", [], ": the top level must be a mapping of keys; got [1, 2]"),
    ("train: [\n", [], ": not valid YAML (expected the node content, but found '<stream end>' at line 2 column 1)"),
    ("a: b: c\n", [], ": not valid YAML (mapping values are not allowed here at line 1 column 5)"),
    (b"train:\n  device: \xff\n", [], ": not UTF-8 text (byte 17); save it as UTF-8 YAML"),
    ("train:\n  steps: 1" + "0" * 5000 + "\n", [], ": train.steps: an integer of 5001 digits (line 2), more "
                                                   "than Python reads; fix the file"),
    ("network:\n  widths: [64, " + "9" * 5000 + "]\n", [], ": network.widths[1]: an integer of 5000 digits"),
    ("train:\n  steps: 2020-13-45\n", [], ": train.steps: month must be in 1..12 (line 2); fix the file"),
    (None, [], ": is a directory; give a YAML file"),
]


@pytest.mark.parametrize("text,extra,expected", BAD_CONFIGS, ids=[e.split(";")[0][2:40] for _, _, e in BAD_CONFIGS])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys, text, extra, expected):
    if text is None:
        path = tmp_path / "c.yaml"
        path.mkdir()
    else:
        path = _write(tmp_path, text)
    rc = main(_train(tmp_path, path, *extra))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"locdiff train: error: {path}{expected}"), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,expected", [
    ("train.stepz=3", "--set train.stepz: unknown key (did you mean 'steps'?); valid keys here: objective"),
    ("trian.steps=3", "--set trian: unknown key (did you mean 'train'?)"),
    ("train.steps", "--set train.steps: expected KEY=VALUE, e.g. --set train.steps=500"),
    ("train.steps=[1", "--set train.steps: cannot read the value '[1' as YAML"),
    ("train=3", "--set train: is a section; set one of its keys: objective"),
    ("train.steps.x=3", "--set train.steps.x: train.steps is a value, not a section"),
    ("train.steps=-5", "--set train.steps: must be an integer in [1, 1000000000]; got -5"),
    ("baselines.knn.k=0", "--set baselines.knn.k: must be an integer in [1, 1024]; got 0"),
    ("train.steps=1" + "0" * 5000, "--set train.steps: cannot read the value as YAML (Exceeds the limit"),
])
def test_a_bad_override_names_the_override(tmp_path, capsys, override, expected):
    rc = main(_train(tmp_path, TINY, "--set", override))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"locdiff train: error: {expected}"), err
    assert not (tmp_path / "run").exists()


def test_a_bad_baseline_option_writes_no_run_folder(tmp_path, capsys):
    # the options are checked when the config is loaded, before `locdiff train` writes config.yaml
    rc = main(_train(tmp_path, TINY, "--method", "knn", "--set", "baselines.knn.radius_km=-1"))
    assert rc == 2 and "baselines.knn.radius_km: must be a number in (0, 20038]; got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_config_and_missing_run(tmp_path, capsys):
    assert main(_train(tmp_path, tmp_path / "nope.yaml")) == 2
    missing = tmp_path / "nope.yaml"
    assert capsys.readouterr().err == f"locdiff train: error: {missing}: no such config file; check the path\n"
    assert main(["predict", "--run", str(tmp_path), "--data", "x", "--out", str(tmp_path / "p.csv")]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err


def test_an_invalid_run_config_is_named(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"batch_size": -4}}))
    rc = main(["predict", "--run", str(tmp_path), "--data", "x", "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert rc == 2
    path = tmp_path / "config.yaml"
    assert err == f"locdiff predict: error: {path}: train.batch_size: must be an integer in [1, 16777216]; got -4\n"


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, capsys):
    path = _write(tmp_path, "train:\n  steps: -5\n")
    for argv in (["--debug", *_train(tmp_path, path)], [*_train(tmp_path, path), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "ConfigError" in err
        assert err.splitlines()[-1] == (f"locdiff train: error: {path}: train.steps: must be an integer in "
                                        "[1, 1000000000]; got -5")
    assert main(["-v", *_train(tmp_path, path)]) == 2  # -v is debug logging, not tracebacks
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow  # over 3 s: `make test` runs it, `make test-fast` does not
def test_subcommand_name_and_exit_code_in_a_subprocess(tmp_path):
    path = _write(tmp_path, "network:\n  dropout: 1.5\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "locdiff", *_train(tmp_path, path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"locdiff train: error: {path}: network.dropout: must be a number in [0, 1); got 1.5\n"
    assert proc.stdout == "" and not (tmp_path / "run").exists()
    proc = subprocess.run([sys.executable, "-m", "locdiff", "data", "ingest", str(path), "--root", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("locdiff data ingest: error: "), proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "r").exists()


def test_disk_full_is_one_line(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    pred = tmp_path / "p.csv"
    pred.write_text("id,lat,lon,pred_lat,pred_lon\na,0,0,1,1\nb,10,10,10,10\n")
    rc = main(["evaluate", "--predictions", str(pred), "--json", "/dev/full"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    # the output is written through reraise_for, which names it (issue 21); a device is written in place
    assert err == "locdiff evaluate: error: disk full while writing /dev/full: free space or choose another --out\n"
    assert not os.path.isfile("/dev/full")  # never replaced by a regular file


def test_a_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", "x.yaml"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err == ("locdiff train: error: the following arguments are required: --train, --out "
                   "(see locdiff train --help)\n")


@pytest.mark.parametrize("argv,expected", [
    (["train", "--config", "x.yaml", "--train", "t", "--out", "o", "--confg", "y"],
     "locdiff train: error: unrecognized arguments: --confg y (see locdiff train --help)\n"),
    (["data", "inspect", "a", "b"], "locdiff data inspect: error: unrecognized arguments: b "
                                    "(see locdiff data inspect --help)\n"),
    (["--bogus", "shdd", "encode", "--lat", "0", "--lon", "0", "--degree", "2"],
     "locdiff: error: unrecognized arguments: --bogus (see locdiff --help)\n"),
])
def test_a_misspelled_flag_is_named_by_its_command(capsys, argv, expected):
    # the line names the command that was given the flag, as every other usage error does
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err == expected


def test_every_flag_and_argument_has_a_help_line():
    from locdiff.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, [*path, name])
            elif action.help != argparse.SUPPRESS:
                yield " ".join(path), (action.option_strings or [action.dest])[-1], action.help

    missing = [f"locdiff {path} {flag}" for path, flag, text in walk(build_parser(), []) if not text]
    assert not missing, missing


def test_interrupt_and_unexpected_errors(monkeypatch, capsys):
    import locdiff.cli.shdd as shdd_cli

    def interrupted(args):
        raise KeyboardInterrupt

    def buggy(args):
        return {}["missing"]

    monkeypatch.setattr(shdd_cli, "_encode", interrupted)
    argv = ["shdd", "encode", "--lat", "0", "--lon", "0", "--degree", "2"]
    assert main(argv) == 130
    assert capsys.readouterr().err == "locdiff shdd encode: interrupted\n"
    monkeypatch.setattr(shdd_cli, "_encode", buggy)
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "locdiff shdd encode: error: unexpected KeyError: 'missing' (run with --debug for the traceback)\n")
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "return {}[\"missing\"]" in err


# --- reraise_for and describe, on real damaged files ------------------------------------------------------

def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_torch_file_is_named(tmp_path):
    import torch

    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    _truncate(path)
    with pytest.raises(RuntimeError) as raw:
        torch.load(path, weights_only=True)
    assert describe(raw.value).startswith("a torch file is corrupt or truncated")  # the boundary alone
    with pytest.raises(CorruptFileError) as err, reraise_for(path, what="checkpoint"):
        torch.load(path, weights_only=True)
    assert str(err.value).startswith(f"{path}: cannot read checkpoint: not a complete torch file (")
    assert str(err.value).endswith("; replace it or write it again") and err.value.path == str(path)
    assert describe(err.value) == str(err.value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_payload_is_refused_and_named(tmp_path):
    import torch

    path = tmp_path / "model.pt"
    torch.save({"w": _Payload()}, path)
    with pytest.raises(CorruptFileError) as err, reraise_for(path, what="model"):
        torch.load(path, weights_only=True)
    assert str(err.value) == (f"{path}: cannot read model: it holds pickled objects that are not plain tensors "
                              "(refused to unpickle them); replace it or write it again")
    assert "weights_only=False" not in str(err.value)  # never advise the unsafe load


@pytest.mark.parametrize("kind", ["npz", "zip", "json", "parquet", "yaml", "pickle", "empty-npy"])
def test_corrupt_files_through_the_helper_name_the_file(tmp_path, kind):
    path = tmp_path / f"x.{kind}"
    if kind == "npz":
        np.savez(path, coords=np.zeros((100, 3)))
        _truncate(path)
        read = lambda: dict(np.load(path))  # noqa: E731
    elif kind == "zip":
        path.write_bytes(b"PK\x03\x04 not really a zip")
        read = lambda: zipfile.ZipFile(path)  # noqa: E731
    elif kind == "json":
        path.write_text('{"count": 3,')
        read = lambda: json.loads(path.read_text())  # noqa: E731
    elif kind == "parquet":
        import pyarrow.parquet as pq

        path.write_bytes(b"PAR1 garbage")
        read = lambda: pq.read_table(path)  # noqa: E731
    elif kind == "yaml":
        path.write_text("a: [")
        read = lambda: yaml.safe_load(path.read_text())  # noqa: E731
    elif kind == "pickle":
        path.write_bytes(pickle.dumps([1, 2, 3])[:5])
        read = lambda: pickle.loads(path.read_bytes())  # noqa: E731
    else:
        np.save(path.with_suffix(".npy"), np.zeros(10))
        path = path.with_suffix(".npy")
        path.write_bytes(path.read_bytes()[:60])
        read = lambda: np.load(path)  # noqa: E731
    with pytest.raises(Exception) as raw:
        read()
    line = describe(raw.value)
    assert "\n" not in line and not line.startswith("unexpected"), line
    with pytest.raises(CorruptFileError) as err, reraise_for(path, what="table"):
        read()
    assert str(err.value).startswith(f"{path}: cannot read table: ") and "\n" not in str(err.value)


def test_reraise_for_keeps_missing_files_and_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as err, reraise_for(tmp_path / "nope"):
        open(tmp_path / "nope")
    assert describe(err.value) == f"{tmp_path / 'nope'}: no such file or directory; check the path"
    with pytest.raises(FileNotFoundError) as err, reraise_for(tmp_path / "gone"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert err.value.filename == str(tmp_path / "gone")
    with pytest.raises(UserError, match="^as raised$"), reraise_for(tmp_path):
        raise UserError("as raised")


def test_a_full_disk_while_writing_names_the_file():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with pytest.raises(DiskFullError) as err, reraise_for("/dev/full", writing=True):
        with open("/dev/full", "w") as f:
            f.write("x" * 10)
    assert str(err.value) == "disk full while writing /dev/full: free space or choose another --out"
    with pytest.raises(OSError) as raw:
        with open("/dev/full", "w") as f:
            f.write("x")
    assert describe(raw.value).startswith("disk full while writing ")


def test_describe_maps_each_family(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(IsADirectoryError) as err:
        open(d)
    assert describe(err.value) == f"{d}: is a directory; give a file"
    # a PermissionError as open() raises it (built here: the tests may run as root, which ignores modes)
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "ro"))
    assert describe(denied) == f"{tmp_path / 'ro'}: permission denied; check its permissions or choose another path"
    other = OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "x"))
    assert describe(other) == f"{tmp_path / 'x'}: Input/output error"


def test_describe_of_third_party_and_generic_errors():
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads("{")
    assert describe(err.value).startswith("not valid JSON (Expecting property name enclosed in double quotes at line 1")
    with pytest.raises(yaml.YAMLError) as err:
        yaml.safe_load("a: [")
    assert describe(err.value).startswith("not valid YAML (expected ")
    msg = "x.csv: row 3: lat 123 is not in [-90, 90]"
    assert describe(ValueError(msg)) == msg
    assert describe(ValueError("two\n  lines")) == "two lines"
    assert describe(ConfigError("--set", "train.steps", "must be an integer >= 1; got -5")) == (
        "--set train.steps: must be an integer >= 1; got -5")
    assert describe(ModuleNotFoundError("No module named 'img2dataset'", name="img2dataset")).startswith(
        "the package 'img2dataset' is not installed")
    assert describe(ZeroDivisionError("division by zero"), debug_hint="see the task log") == (
        "unexpected ZeroDivisionError: division by zero (see the task log)")
    assert exit_code(KeyboardInterrupt()) == 130 and exit_code(ValueError()) == 2
    from locdiff.tracking import TrackingUnavailable

    down = TrackingUnavailable("MLflow at http://127.0.0.1:9 is not reachable; start it with infra/start.sh")
    assert describe(down) == str(down)


def test_serve_refuses_a_busy_port_a_run_folder_and_a_missing_model_in_one_line(tmp_path, capsys):
    """`locdiff serve` checks its port before loading anything, and serves MLflow models only."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"locdiff serve: error: cannot listen on 127.0.0.1:{port} (--host, --port)")
        assert err.count("\n") == 1
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: knn\n")
    for model, expected in ((tmp_path / "run", "a run folder, not an MLflow model"),
                            (tmp_path / "absent", "no such run folder")):
        assert main(["serve", "--model", str(model), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"locdiff serve: error: {model}: {expected}") and err.count("\n") == 1
