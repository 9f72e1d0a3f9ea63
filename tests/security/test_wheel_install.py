"""A non-editable install works on its own: the wheel carries the configs, found by bare name.

The wheel is built from a copy of the repository's files, installed (without dependencies, which this
environment already has) into a fresh target folder, and run from a folder outside the repository with
only that target on PYTHONPATH, so nothing can come from the checkout: `locdiff synth`, `locdiff train
--config tiny` (the packaged configs/model/tiny.yaml), `locdiff predict`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _copy_sources(dest: Path) -> None:
    """The repository's files (tracked and new, not ignored), links kept as links."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the sources from build outputs")
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src, dst = REPO / rel, dest / rel
        if not src.is_symlink() and not src.exists():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_install_trains_and_predicts_with_packaged_configs(tmp_path):
    src, wheels, target, work = (tmp_path / d for d in ("src", "wheels", "target", "work"))
    for d in (src, wheels, work):
        d.mkdir()
    _copy_sources(src)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                  "-w", str(wheels)], cwd=tmp_path, env=dict(os.environ))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("locdiff-*.whl")
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                      str(target), str(wheel)], cwd=tmp_path, env=dict(os.environ))
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert not (target / "locdiff" / "configs").is_symlink()  # real files in the wheel
    assert (target / "locdiff" / "configs" / "model" / "tiny.yaml").is_file()

    env = {k: v for k, v in os.environ.items() if k not in ("LOCDIFF_CONFIGS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    locdiff = [str(target / "bin" / "locdiff")]  # the wheel's console script
    assert Path(locdiff[0]).is_file()
    where = _run([sys.executable, "-c",
                  "import locdiff, locdiff.resources as r; from locdiff.data.config import "
                  "load_dataset_config as d, load_encoder_config as e; from locdiff.pipeline import "
                  "model_config_path as m; print(locdiff.__file__); print(r.configs_dir()); "
                  "print(d('im2gps3k').name, e('clip-vit-l14').name, m('base').name, "
                  "m('configs/model/tiny.yaml').name)"], cwd=work, env=env)
    assert where.returncode == 0, where.stderr[-3000:]
    module, configs, names = where.stdout.splitlines()[-3:]
    assert Path(module).resolve().is_relative_to(target.resolve())  # not the checkout
    assert Path(configs).resolve() == (target / "locdiff" / "configs").resolve()
    assert names.split() == ["im2gps3k", "clip-vit-l14", "base.yaml", "tiny.yaml"]  # the README's path form too

    synth = _run([*locdiff, "synth", "--out", "synth", "--n-train", "1500", "--n-test", "60", "--n-unseen",
                  "20", "--dim", "32"], cwd=work, env=env)
    assert synth.returncode == 0, synth.stderr[-3000:]
    train = _run([*locdiff, "train", "--config", "tiny", "--train", "synth/train.parquet", "--out", "run",
                  "--set", "train.steps=20", "--set", "train.checkpoint_every=10", "--no-progress"],
                 cwd=work, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (work / "run" / "checkpoint.pt").is_file() and (work / "run" / "config.yaml").is_file()
    predict = _run([*locdiff, "predict", "--run", "run", "--data", "synth/test.parquet", "--out", "pred.parquet",
                    "--samples", "2", "--steps", "2", "--no-progress"], cwd=work, env=env)
    assert predict.returncode == 0, predict.stderr[-3000:]
    import pandas as pd

    pred = pd.read_parquet(work / "pred.parquet")
    assert len(pred) == 60
    assert pred["pred_lat"].between(-90, 90).all() and pred["pred_lon"].between(-180, 180).all()

    unknown = _run([*locdiff, "train", "--config", "nope", "--train", "synth/train.parquet", "--out", "r2"],
                   cwd=work, env=env)
    assert unknown.returncode == 2 and "tiny" in unknown.stderr  # the packaged names are listed
    assert not (work / "r2").exists()
