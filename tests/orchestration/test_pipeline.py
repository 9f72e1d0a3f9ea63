"""The `train-locdiff` flow against a real Prefect API (prefect_test_harness) on tiny data: every stage
runs, MLflow holds the params, metrics and artifacts, and a second run skips the finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.orchestration.conftest import TINY_OVERRIDES


def _params(tiny_data, root):
    ds = lambda name, split: {"name": name, "source": "embeddings", "path": str(tiny_data[split])}  # noqa: E731
    return {"train_data": ds("tiny-train", "train"),
            "tests": [ds("tiny-test", "test"), ds("tiny-unseen", "test_unseen")],
            "config": "tiny", "root": str(root), "workers": 2, "overrides": TINY_OVERRIDES}


def test_pipeline_runs_logs_and_skips(prefect_api, ray_local, tiny_data, tmp_path, mlflow_uri, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.pipeline import train_locdiff
    from locdiff import tracking

    out = train_locdiff(**_params(tiny_data, tmp_path / "root"))
    # precomputed embeddings: ingest writes the features stage, so embed finds it complete
    assert {k: v for k, v in out["stages"].items() if v != "done"} == {"embed:tiny-train": "skipped",
                                                                        "embed:tiny-test": "skipped",
                                                                        "embed:tiny-unseen": "skipped"}
    run = tracking.read_run(out["mlflow_run_id"])
    assert run["status"] == "FINISHED"
    assert run["params"]["train.steps"] == "24" and run["params"]["pipeline.config_name"] == "tiny"
    for ds in ("tiny-test", "tiny-unseen"):
        for name in tracking.METRIC_NAMES:
            assert f"{ds}/{name}" in run["metrics"], (ds, name)
        assert 0.0 <= run["metrics"][f"{ds}/acc_2500km"] <= 100.0
        assert {f"plots/{ds}/worldmap.png", f"plots/{ds}/error_cdf.png"} <= set(run["artifacts"])
        child = tracking.read_run(run["children"][ds])
        assert any(a.startswith("predictions/") for a in child["artifacts"])
    assert "config.yaml" in run["artifacts"] and "checkpoint/checkpoint.pt" in run["artifacts"]

    from mlflow.tracking import MlflowClient

    versions = MlflowClient().search_model_versions("name='locdiff'")
    assert [v.run_id for v in versions] == [out["mlflow_run_id"]]  # the model, registered as `locdiff`
    assert len(MlflowClient().get_metric_history(out["mlflow_run_id"], "loss")) == 24 // 4  # every log step

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        tables = [a for a in artifact if a.key == "locdiff-accuracy"]
    assert tables and "tiny-unseen" in tables[0].data and "2500 km" in tables[0].data

    again = train_locdiff(**_params(tiny_data, tmp_path / "root"))
    assert set(again["stages"].values()) == {"skipped"}
    assert again["mlflow_run_id"] == out["mlflow_run_id"]
    assert again["results"] == out["results"]

    # A new, empty MLflow store (the state folder was deleted): the finished training is not redone,
    # it is logged again (params, per-step loss, model, evaluations) into the new store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh.db'}")
    third = train_locdiff(**_params(tiny_data, tmp_path / "root"))
    assert third["mlflow_run_id"] != out["mlflow_run_id"]
    assert third["stages"]["train"] == "done" and third["stages"]["evaluate:tiny-test"] == "done"
    record = json.loads((Path(third["run_dir"]) / "run.json").read_text())
    assert record["mlflow_run_id"] == third["mlflow_run_id"] and record["step"] == 24
    assert len(MlflowClient().get_metric_history(third["mlflow_run_id"], "loss")) == 24 // 4
    assert third["results"] == out["results"]
    assert third["run_dir"] == out["run_dir"]

    # A changed override is another run: it trains again; the same parameters a second time skip.
    changed = {**_params(tiny_data, tmp_path / "root"), "overrides": [*TINY_OVERRIDES, "train.steps=16"]}
    fourth = train_locdiff(**changed)
    assert fourth["run_dir"] != out["run_dir"] and fourth["stages"]["train"] == "done"
    assert json.loads((Path(fourth["run_dir"]) / "run.json").read_text())["step"] == 16
    fifth = train_locdiff(**changed)
    assert fifth["stages"]["train"] == "skipped" and fifth["run_dir"] == fourth["run_dir"]


def test_bad_inputs_fail_before_any_work(prefect_api, moto_s3, tiny_data, tmp_path, monkeypatch):
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import train_locdiff
    from locdiff.tracking import TrackingUnavailable
    from tests.orchestration.conftest import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(ValueError, match="unknown model config 'nope'.*known configs: .*tiny"):
        train_locdiff(**{**_params(tiny_data, tmp_path / "r1"), "config": "nope"})
    for key, bad in (("workers", {"workers": -1}), ("gpus_per_worker", {"workers": 0, "gpus_per_worker": -1.0})):
        with pytest.raises(ValueError, match=f"^{key}: must be .* got -1$"):  # not silently "no Ray"
            train_locdiff(**{**_params(tiny_data, tmp_path / "r1"), **bad})
    params = _params(tiny_data, tmp_path / "r1")
    with pytest.raises(ParameterTypeError, match=r"train_data\.limit: Input should be greater than or equal to 0"):
        train_locdiff(**{**params, "train_data": {**params["train_data"], "limit": -1}})  # not "--limit"
    assert not (tmp_path / "r1").exists()
    with pytest.raises(PermissionError, match="storage root .* pass a writable root"):
        train_locdiff(**{**_params(tiny_data, "/sys/locdiff-root")})
    with monkeypatch.context() as env:  # an s3:// root without credentials: named, before any work
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.delenv(key, raising=False)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        env.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ValueError, match=r"^storage root s3://bucket/locdiff: .*credentials.*`root` parameter"):
            train_locdiff(**{**_params(tiny_data, "s3://bucket/locdiff")})
    with pytest.raises(ValueError, match=r"^storage root s3://no-such-bucket/locdiff: not found \(The specified bucket "
                       r"does not exist\); .*`root` parameter\)$"):  # a bucket that does not exist: before any work
        train_locdiff(**{**_params(tiny_data, "s3://no-such-bucket/locdiff")})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingUnavailable, match="infra/start.sh"):
        train_locdiff(**_params(tiny_data, tmp_path / "r2"))
    assert not (tmp_path / "r2" / "tiny-train").exists()  # nothing started


def test_retries_only_transient_failures(prefect_api):
    from botocore.exceptions import NoCredentialsError
    from prefect import flow, task

    from flows.retry import transient

    calls = {"bad": 0, "flaky": 0}
    deterministic = [ValueError("bad row"), NoCredentialsError(), MemoryError()]

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient)
    def bad_input(err):
        calls["bad"] += 1
        raise err

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient)
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionError("S3 endpoint reset the connection")
        return "ok"

    @flow
    def both():
        for err in deterministic:
            with pytest.raises(type(err)):
                bad_input(err)
        return flaky()

    assert both() == "ok"
    assert calls == {"bad": len(deterministic), "flaky": 3}  # each deterministic error ran once


def test_promote_does_not_retry_a_damaged_run_folder(prefect_api, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.pipeline import promote

    (tmp_path / "run.json").write_text("{not json")

    @flow
    def promote_only():
        state = promote(str(tmp_path), ["t"], None, return_state=True)
        return state.is_failed(), state.message, state.state_details.task_run_id

    failed, message, task_run_id = promote_only()
    assert failed and "run.json: not valid JSON" in message
    with get_client(sync_client=True) as client:
        assert client.read_task_run(task_run_id).run_count == 1  # not retried
