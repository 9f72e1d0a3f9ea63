"""Asking for devices that do not exist fails fast: one line on stderr, exit 2, nothing left in --out, before
any work (GPUs for Ray workers or for this process, a fractional GPU shared by several workers, a CUDA
device index that does not exist); a damaged Ray Train checkpoint is one line naming the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locdiff.cli import main
from locdiff.distributed import RayTrainSettings, _user_error_in, check_gpu_request, local_gpus
from locdiff.errors import CorruptFileError, UserError
from locdiff.orchestration.ray_session import check_cpu_request, local_cpus

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    out = tmp_path_factory.mktemp("synth")
    return write_benchmark(out, SynthConfig(n_train=200, n_test=20, n_unseen=20, dim=16, seed=0))["train"]


def _argv(table: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--train", str(table), "--out", str(out), "--no-progress", *extra]


def _cases() -> list[tuple[list[str], str]]:
    n = local_gpus()
    cases = [
        ([f"--workers={n + 1}", "--gpus-per-worker=1"], rf"--workers {n + 1} --gpus-per-worker 1 asks for "
                                                         rf"{n + 1} GPU\(s\), but this machine has {n}"),
        (["--workers=2", "--gpus-per-worker=0.5"], "would put two ranks on one GPU"),
        (["--gpus-per-worker=2"], "one process trains on one GPU"),
        ([f"--set=train.device=cuda:{n + 7}"], rf"train.device=cuda:{n + 7}: this machine has no such device"),
        # a local Ray with more workers than CPUs would start them all and never finish (--workers 1024)
        ([f"--workers={max(2, local_cpus()) + 1}"], rf"asks for {max(2, local_cpus()) + 1} CPUs, but this machine "
                                                    rf"has {max(2, local_cpus())} for a local Ray"),
    ]
    if NO_GPU:
        cases.append((["--gpus-per-worker=1"], "this machine has no CUDA GPU"))
    if not torch.backends.mps.is_available():  # a documented value: "not linked with support for mps" before
        cases.append((["--set=train.device=mps"], "train.device=mps: this machine has no such device"))
    return cases


@pytest.mark.parametrize("extra,message", _cases())
def test_missing_devices_are_refused_before_any_work(extra, message, table, tmp_path, capsys):
    import re

    out = tmp_path / "run"
    assert main(_argv(table, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()  # nothing written, not even config.yaml


def test_gpu_request_checks_against_what_exists():
    check_gpu_request(2, 1, available=2)  # fits
    check_gpu_request(1, 0.5, available=1)  # one worker may take part of a GPU
    with pytest.raises(UserError, match="asks for 4 GPU.*the Ray cluster has 2"):
        check_gpu_request(4, 1, available=2, where="the Ray cluster")
    with pytest.raises(UserError, match="two ranks on one GPU"):
        check_gpu_request(3, 1.5, available=8)
    assert RayTrainSettings().controller_failure_limit >= 0  # finite: Ray's default (-1) retries forever


def test_cpu_request_checks_against_this_machine(monkeypatch):
    monkeypatch.setattr("locdiff.orchestration.ray_session.local_cpus", lambda: 1)
    check_cpu_request(2)  # the demo's 2 workers run even on one CPU
    check_cpu_request(4, 0.5)
    with pytest.raises(UserError, match="--workers 3 with 1 CPU each asks for 3 CPUs, but this machine has 2"):
        check_cpu_request(3)
    with pytest.raises(UserError, match="--workers 1024 .* asks for 1024 CPUs"):
        check_cpu_request(1024)


def test_worker_user_error_is_found_inside_ray_errors():
    cause = CorruptFileError("x/checkpoint.pt", "x/checkpoint.pt: cannot read checkpoint")

    class WorkerGroupError(RuntimeError):
        def __init__(self, failures):
            super().__init__("worker group failed")
            self.worker_failures = failures

    try:
        try:
            raise cause
        except CorruptFileError as err:
            raise RuntimeError("in the worker") from err
    except RuntimeError as wrapped:
        assert _user_error_in(WorkerGroupError({0: wrapped})) is cause
    assert _user_error_in(RuntimeError("plain")) is None


@pytest.mark.slow  # two CLI processes
@pytest.mark.skipif(not NO_GPU, reason="the acceptance commands ask for a GPU this machine has")
@pytest.mark.parametrize("extra", [["--workers", "1", "--gpus-per-worker", "1"], ["--gpus-per-worker", "1"]])
def test_gpu_commands_on_a_machine_without_gpu(extra, table, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "locdiff", *_argv(table, out, *extra)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("locdiff train: error:") and "GPU" in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.slow  # a Ray training
def test_damaged_ray_checkpoint_is_one_line_naming_it(ray_local, table, tmp_path):
    from locdiff.distributed import train_on_ray
    from locdiff.model.config import config_from_dict

    small = {"shdd": {"degree": 4}, "network": {"widths": [16, 8], "cond_dim": 16, "time_dim": 8},
             "train": {"steps": 8, "batch_size": 32, "checkpoint_every": 4, "log_every": 4, "warmup_steps": 2,
                       "val_share": 0.0}}
    store = tmp_path / "store"
    settings = RayTrainSettings(num_workers=1, storage_root=str(store), run_name="r1", max_failures=0)
    train_on_ray(config_from_dict(small), str(table), tmp_path / "first", settings)
    ckpts = sorted((store / "r1").glob("checkpoint_*/checkpoint.pt"))
    assert ckpts
    for ckpt in ckpts:
        ckpt.write_bytes(ckpt.read_bytes()[:200])  # truncated
    out = tmp_path / "again" / "r1"
    argv = ["train", "--config", "tiny", "--train", str(table), "--out", str(out), "--no-progress",
            "--workers", "1", "--storage", str(store)]
    for key, value in (("shdd.degree", 4), ("network.widths", "[16,8]"), ("network.cond_dim", 16),
                       ("network.time_dim", 8), ("train.steps", 8)):
        argv += ["--set", f"{key}={value}"]
    # a process of its own: this one's stderr carries the Ray workers' logs of the training above
    proc = subprocess.run([sys.executable, "-m", "locdiff", *argv], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt" in err[0] and str(store / "r1") in err[0], proc.stderr
    assert "unexpected" not in err[0]
    assert not out.exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_mps_on_a_machine_without_it_is_a_user_error():
    from locdiff.engine import resolve_device

    with pytest.raises(UserError, match="--device=mps: this machine has no such device"):
        resolve_device("mps", setting="--device")
