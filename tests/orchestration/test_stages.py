"""The pipeline's stages as library calls (no Prefect, no Ray): a data set's `val_unseen` table reaches
LocDiff-H's fit, the run planned once is the run trained, and MLflow records the data sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from locdiff import tracking
from locdiff.orchestration import stages
from locdiff.orchestration.spec import DataSet
from locdiff.runs import SELECTION
from tests.orchestration.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow  # trains a tiny LocDiff and logs it to a SQLite MLflow store


def test_val_unseen_reaches_the_fit_and_the_plan_is_the_run(tmp_path, mlflow_uri):
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    data = write_benchmark(tmp_path / "synth", SynthConfig(n_train=400, n_test=20, n_unseen=20, n_val=40,
                                                           n_val_unseen=30, dim=16, seed=0))
    root = str(tmp_path / "root")
    ds = {split: DataSet(name=f"t-{split}", source="embeddings", path=str(data[split]))
          for split in ("train", "val", "val_unseen")}
    for spec in ds.values():
        stages.ingest(spec, root)
    overrides = [*TINY_OVERRIDES, "train.steps=8", "train.checkpoint_every=4"]
    config = stages.preflight("tiny", root, degree=4, overrides=overrides, tracking_uri=mlflow_uri)
    plan = stages.plan("tiny", ds["train"], root, val_spec=ds["val"], val_unseen_spec=ds["val_unseen"],
                       config=config)
    assert plan.run_dir == Path(root).resolve() / "runs" / f"tiny-t-train-L4-{plan.key[:10]}"
    assert set(plan.data) == {"train", "val", "val_unseen"}
    without = stages.plan("tiny", ds["train"], root, val_spec=ds["val"], config=config)
    assert without.key != plan.key  # val_unseen is part of the run's identity, and only when given

    record = stages.train("tiny", ds["train"], root, str(plan.run_dir), degree=4, overrides=overrides,
                          num_workers=0, tracking_uri=mlflow_uri, val_spec=ds["val"],
                          val_unseen_spec=ds["val_unseen"])
    assert record["key"] == plan.key and record["complete"] and record["step"] == 8
    selection = json.loads((plan.run_dir / SELECTION).read_text())
    assert selection["val_unseen"] == plan.data["val_unseen"]  # LocDiff-H's choice saw the val_unseen rows
    run = tracking.read_run(record["mlflow_run_id"], tracking_uri=mlflow_uri)
    assert run["params"]["pipeline.val_unseen"] == "t-val_unseen" and run["params"]["pipeline.val"] == "t-val"
    assert run["params"]["shdd.degree"] == "4"
    again = stages.train("tiny", ds["train"], root, str(plan.run_dir), degree=4, overrides=overrides,
                         num_workers=0, tracking_uri=mlflow_uri, val_spec=ds["val"],
                         val_unseen_spec=ds["val_unseen"])
    assert again["mlflow_run_id"] == record["mlflow_run_id"] and again["key"] == record["key"]


def test_preflight_refuses_more_gpus_than_a_local_ray_has_before_any_work(tmp_path, monkeypatch):
    """`train-locdiff` with gpus_per_worker on a machine without them stops at the preflight, before the
    download and embedding stages, in one line; the storage root is not even created."""
    from locdiff.errors import UserError, describe
    from locdiff.orchestration.ray_session import local_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path / "root"
    with pytest.raises(UserError, match=r"asks for \d+ GPU") as err:
        stages.preflight("tiny", str(root), num_workers=1, gpus_per_worker=local_gpus() + 1)
    assert "\n" not in describe(err.value) and not root.exists()


def _ingested_synth(tmp_path) -> tuple[DataSet, str]:
    """A small synth training table ingested under tmp_path/root: (its data set, the root)."""
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    data = write_benchmark(tmp_path / "synth", SynthConfig(n_train=200, n_test=10, n_unseen=10, dim=16, seed=0))
    root = str(tmp_path / "root")
    train = DataSet(name="t-train", source="embeddings", path=str(data["train"]))
    stages.ingest(train, root)
    return train, root

def _train_in_run(tmp_path, train: DataSet, root: str, run_id: str, mlflow_uri: str, *, steps: int) -> dict:
    """`stages.train` of tiny into tmp_path/run, whose MLflow record names the existing MLflow run `run_id`."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / stages.MLFLOW_RECORD).write_text(json.dumps({"run_id": run_id}))
    return stages.train("tiny", train, root, str(run_dir), degree=4, num_workers=0, tracking_uri=mlflow_uri,
                        overrides=[*TINY_OVERRIDES, f"train.steps={steps}", "train.checkpoint_every=4"])


def test_a_rerun_after_a_kill_before_run_json_logs_no_second_throughput_point(tmp_path, mlflow_uri):
    """Killed after the training's throughput reached MLflow (e.g. while the model was being logged), before
    run.json: the re-run finalizes the same training and its MLflow run holds each point once."""
    from mlflow.tracking import MlflowClient

    train, root = _ingested_synth(tmp_path)
    overrides = [*TINY_OVERRIDES, "train.steps=8", "train.checkpoint_every=4"]
    run_dir = tmp_path / "run"
    first = stages.train("tiny", train, root, str(run_dir), degree=4, overrides=overrides, num_workers=0,
                         tracking_uri=mlflow_uri)
    (run_dir / "run.json").unlink()  # the kill came before run.json
    again = stages.train("tiny", train, root, str(run_dir), degree=4, overrides=overrides, num_workers=0,
                         tracking_uri=mlflow_uri)
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "samples_per_s")] == [8]
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "loss")] == [4, 8]


def test_a_history_a_kill_interrupted_is_completed_not_skipped(tmp_path, mlflow_uri):
    """The run's MLflow run holds only the first steps' loss (the process died while the history was being
    logged): training again logs the rest, each step once."""
    from mlflow.tracking import MlflowClient

    train, root = _ingested_synth(tmp_path)
    with tracking.training_run({"x": 1}, tracking_uri=mlflow_uri) as run_id:
        tracking.log_step_metrics(run_id, [{"step": 4, "loss": 1.5}], tracking_uri=mlflow_uri)
    record = _train_in_run(tmp_path, train, root, run_id, mlflow_uri, steps=8)
    assert record["mlflow_run_id"] == run_id
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4, 8]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [4, 8]


def test_a_resume_with_another_worker_count_is_tagged(tmp_path, mlflow_uri):
    """A training begun with 2 workers (its MLflow run's params say so, and cannot change) and resumed with
    another count: the run's tags workers_resumed / gpus_per_worker_resumed say what the resume ran with."""
    from mlflow.tracking import MlflowClient

    train, root = _ingested_synth(tmp_path)
    began = {"pipeline": {"num_workers": 2, "gpus_per_worker": 0.5}}
    with tracking.training_run(began, tracking_uri=mlflow_uri) as run_id:
        pass
    record = _train_in_run(tmp_path, train, root, run_id, mlflow_uri, steps=4)
    assert record["mlflow_run_id"] == run_id
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(run_id)
    assert run.data.params["pipeline.num_workers"] == "2"  # as it began: params are not renamed or changed
    assert run.data.tags["workers_resumed"] == "0" and run.data.tags["gpus_per_worker_resumed"] == "0.0"
