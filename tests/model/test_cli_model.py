"""`locdiff train` / `locdiff predict` end to end on small synthetic data."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from locdiff.cli import main
from locdiff.io import read_predictions
from locdiff.metrics import geo_metrics

from .conftest import TEST_OVERRIDES, TINY


def _sets(extra=()):
    out = []
    for item in [*TEST_OVERRIDES, *extra]:
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_dir):
    run_dir = tmp_path_factory.mktemp("run") / "ld"
    rc = main(
        [
            "train",
            "--config",
            str(TINY),
            "--train",
            str(synth_dir / "train.parquet"),
            "--val",
            str(synth_dir / "val.parquet"),
            "--out",
            str(run_dir),
            "--no-progress",
            *_sets(),
        ]
    )
    assert rc == 0
    return run_dir


def test_train_writes_the_run(run):
    for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl", "model.safetensors", "model.json",
                 "selection.json", "run.json"):
        assert (run / name).is_file(), name
    sel = json.loads((run / "selection.json").read_text())
    assert sel["aggregation"] in ("mean", "support")
    assert sel["step"] == 200
    record = json.loads((run / "run.json").read_text())
    assert record["complete"] and record["step"] == 200 and len(record["key"]) == 64
    assert record["data"]["val"]["kind"] == "table"  # --val given: nothing held out of --train
    assert record["data"]["train"]["holdout"] is None


def test_train_again_skips_a_complete_run(run, synth_dir, capsys):
    before = (run / "metrics.jsonl").read_text()
    rc = main(
            [
                "train",
                "--config",
                str(TINY),
                "--train",
                str(synth_dir / "train.parquet"),
                "--val",
                str(synth_dir / "val.parquet"),
                "--out",
                str(run),
                "--no-progress",
                *_sets(),
            ]
        )
    assert rc == 0
    assert "already trained (same config and data)" in capsys.readouterr().out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 200
    assert (run / "metrics.jsonl").read_text() == before  # nothing trained twice


def test_more_steps_continue_from_the_checkpoint(run, synth_dir, tmp_path):
    """train.steps may change on a resume (a longer schedule): the run continues from its checkpoint."""
    import shutil

    longer = tmp_path / "longer"
    shutil.copytree(run, longer)
    rc = main(["train", "--config", str(TINY), "--train", str(synth_dir / "train.parquet"), "--val",
               str(synth_dir / "val.parquet"), "--out", str(longer), "--no-progress",
               *_sets(["train.steps=220"])])
    assert rc == 0
    steps = [json.loads(x)["step"] for x in (longer / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 220 and steps.count(200) >= 1
    assert json.loads((longer / "run.json").read_text())["step"] == 220


def test_a_run_killed_between_its_weights_and_selection_is_refused_until_trained_again(run, synth_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """Training on (more steps) killed after the first of model.safetensors and selection.json is written: the
    pair does not belong together, so predicting refuses in one line naming the run folder; the same `locdiff
    train` command finishes the job (the choice made for the new weights)."""
    import contextlib
    import shutil

    import locdiff.runs

    longer = tmp_path / "longer"
    shutil.copytree(run, longer)
    train = ["train", "--config", str(TINY), "--train", str(synth_dir / "train.parquet"), "--val",
             str(synth_dir / "val.parquet"), "--out", str(longer), "--no-progress", *_sets(["train.steps=210"])]
    real, written = locdiff.runs.atomic_path, []

    @contextlib.contextmanager
    def killed_before_the_second_of_the_pair(path):  # noqa: ANN001, ANN202
        if path.name in ("model.safetensors", "selection.json"):
            written.append(path.name)
            if len(written) == 2:
                raise KeyboardInterrupt  # what a SIGKILL leaves: the first of the pair written, not the second
        with real(path) as tmp:
            yield tmp

    monkeypatch.setattr(locdiff.runs, "atomic_path", killed_before_the_second_of_the_pair)
    assert main(train) != 0
    monkeypatch.undo()
    capsys.readouterr()
    predict = ["predict", "--run", str(longer), "--data", str(synth_dir / "test.parquet"), "--out",
               str(tmp_path / "p.parquet"), "--no-progress"]
    assert main(predict) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(longer) in err and "run the same `locdiff train` command" in err
    assert not (tmp_path / "p.parquet").exists()
    assert main(train) == 0
    assert json.loads((longer / "selection.json").read_text())["step"] == 210
    assert main(predict) == 0


def test_a_resumed_run_removes_the_partial_file_of_a_killed_write(run, synth_dir, tmp_path):
    """A training killed inside a checkpoint write leaves the temporary file beside checkpoint.pt; the re-run
    resumes from the last whole checkpoint and removes it (each kill would leave one more, of a checkpoint's
    size)."""
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    (resumed / "run.json").unlink()  # killed before the end: the run is not complete
    partial = resumed / ".checkpoint.pt.k1ll3d00.tmp"  # as atomic_path names it
    partial.write_bytes((run / "checkpoint.pt").read_bytes()[:1000])
    rc = main(["train", "--config", str(TINY), "--train", str(synth_dir / "train.parquet"), "--val",
               str(synth_dir / "val.parquet"), "--out", str(resumed), "--no-progress", *_sets()])
    assert rc == 0
    assert json.loads((resumed / "run.json").read_text())["complete"]
    assert sorted(p.name for p in resumed.iterdir() if p.name.startswith(".")) == []


def test_a_changed_selection_setting_chooses_again(run, synth_dir, tmp_path):
    """train.val_samples (or predict.* / hybrid.*) may change on a complete run without retraining; the
    choices made on validation must then be made again, not kept from the old setting."""
    import shutil

    again = tmp_path / "again"
    shutil.copytree(run, again)
    before = json.loads((again / "selection.json").read_text())
    rows = before["val_rows"]
    assert rows > 40
    weights = (again / "model.safetensors").read_bytes()
    rc = main(["train", "--config", str(TINY), "--train", str(synth_dir / "train.parquet"), "--val",
               str(synth_dir / "val.parquet"), "--out", str(again), "--no-progress",
               *_sets(["train.val_samples=40"])])
    assert rc == 0
    after = json.loads((again / "selection.json").read_text())
    assert after["val_rows"] == 40 and after["settings"] != before["settings"]
    assert after["step"] == before["step"] and (again / "model.safetensors").read_bytes() == weights  # not retrained


def test_val_unseen_joins_the_choice_of_locdiff_h(run, synth_dir, tmp_path):
    """--val-unseen on a complete run: recorded in the run's data, LocDiff-H's parameters chosen again on both
    validation tables, the weights not retrained."""
    import shutil

    again = tmp_path / "unseen"
    shutil.copytree(run, again)
    weights = (again / "model.safetensors").read_bytes()
    rc = main(["train", "--config", str(TINY), "--train", str(synth_dir / "train.parquet"), "--val",
               str(synth_dir / "val.parquet"), "--val-unseen", str(synth_dir / "test_unseen.parquet"), "--out",
               str(again), "--no-progress", *_sets()])
    assert rc == 0
    sel = json.loads((again / "selection.json").read_text())
    assert sel["val_unseen"]["kind"] == "table" and sel["val_unseen_rows"] == 128  # train.val_samples
    assert sel["hybrid_mode"] == "poe" and set(sel["hybrid_poe"]) == {"bandwidth_km", "strength", "threshold",
                                                                     "slope", "floor", "core",
                                                                     "snap_km", "consensus",
                                                                     "consensus_density", "margin"}
    assert json.loads((again / "run.json").read_text())["data"]["val_unseen"]["kind"] == "table"
    assert (again / "model.safetensors").read_bytes() == weights


def test_held_out_share_without_val(synth_dir, tmp_path):
    out = tmp_path / "r"
    rc = main(["train", "--config", str(TINY), "--method", "knn", "--train", str(synth_dir / "train.parquet"),
               "--out", str(out), "--no-progress", "--set", "train.val_share=0.05"])
    assert rc == 0
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["train"]["holdout"]["keep"] == "train"
    assert record["data"]["val"]["holdout"]["keep"] == "val"
    assert "val/acc_750km" in record["metrics"]


def test_train_into_a_run_with_another_config_is_an_error(run, synth_dir, capsys):
    rc = main(
        [
            "train",
            "--config",
            str(TINY),
            "--train",
            str(synth_dir / "train.parquet"),
            "--out",
            str(run),
            "--no-progress",
            *_sets(["network.dropout=0.3"]),
        ]
    )
    assert rc == 2
    assert "network.dropout" in capsys.readouterr().err


def test_predict_and_beat_chance(run, synth_dir, synth_tables, tmp_path):
    out = tmp_path / "pred.parquet"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run),
                "--data",
                str(synth_dir / "test.parquet"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    pred = read_predictions(out)
    test = synth_tables["test"]
    assert list(pred.ids) == list(test.ids)
    assert set(pred.method) == {"locdiff"}
    assert np.all((pred.confidence >= 0) & (pred.confidence <= 1))
    m = geo_metrics(pred.pred_lat, pred.pred_lon, pred.lat, pred.lon)
    # chance: a random training location for every test image (same clustered distribution)
    rng = np.random.default_rng(0)
    train = synth_tables["train"]
    j = rng.integers(0, len(train), len(test))
    chance = geo_metrics(train.lat[j], train.lon[j], test.lat, test.lon)
    assert m["acc_750km"] > chance["acc_750km"] + 25
    assert m["median_km"] < 0.5 * chance["median_km"]


def test_predict_hybrid_csv_and_options(run, synth_dir, tmp_path):
    out = tmp_path / "pred.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run),
                "--data",
                str(synth_dir / "test_unseen.parquet"),
                "--out",
                str(out),
                "--method",
                "locdiff-h",
                "--samples",
                "2",
                "--steps",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    pred = read_predictions(out)
    assert set(pred.method) == {"locdiff-h"} and len(pred) == 200


def test_predict_is_seeded(run, synth_dir, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for p in (a, b):
        main(
            [
                "predict",
                "--run",
                str(run),
                "--data",
                str(synth_dir / "val.parquet"),
                "--out",
                str(p),
                "--samples",
                "2",
                "--steps",
                "3",
                "--no-progress",
            ]
        )
    assert np.array_equal(read_predictions(a).pred_lat, read_predictions(b).pred_lat)


def test_one_sample_answers_are_its_smoothed_mode(run, synth_tables):
    """K = 1: the mean and "support" answers are the one sample's mode, decoded (in float64) as shdd.decode
    does with the configured smoothing, and that sample is all of the support (confidence 1)."""
    from locdiff import shdd
    from locdiff.model.locdiff_method import LocDiffMethod
    from locdiff.model.predict import locdiff_predict
    from locdiff.runs import RunFolder

    _, meta = RunFolder(run).load_model()
    m = LocDiffMethod.load(run, meta["config"])
    emb = synth_tables["test"].embedding[:64]
    out = locdiff_predict(m.model, emb, m.config, samples=1, steps=1, seed=0)
    lat, lon, val = shdd.decode(out.mean_code.double(), candidates=m.config.predict.decode_candidates,
                                smoothing=m.config.predict.decode_smoothing)
    np.testing.assert_array_equal(out.mean_lat, lat.double().numpy())
    np.testing.assert_array_equal(out.support_lat, out.mean_lat)
    np.testing.assert_array_equal(out.support_lon, out.mean_lon)
    assert (out.mean_conf == 1).all() and (out.support_conf == 1).all()


def test_predict_unlabelled_data(run, synth_dir, tmp_path):
    t = pq.read_table(synth_dir / "val.parquet").drop(["lat", "lon"])
    pq.write_table(t, tmp_path / "u.parquet")
    out = tmp_path / "pred.parquet"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run),
                "--data",
                str(tmp_path / "u.parquet"),
                "--out",
                str(out),
                "--samples",
                "2",
                "--steps",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert set(pq.read_table(out).column_names) == {"id", "pred_lat", "pred_lon", "method", "confidence"}


def test_hybrid_on_a_baseline_run_is_a_clear_error(synth_dir, tmp_path, capsys):
    run = tmp_path / "knn"
    assert (
        main(
            [
                "train",
                "--config",
                str(TINY),
                "--method",
                "knn",
                "--train",
                str(synth_dir / "train.parquet"),
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    rc = main(
        [
            "predict",
            "--run",
            str(run),
            "--data",
            str(synth_dir / "test.parquet"),
            "--out",
            str(tmp_path / "p.parquet"),
            "--method",
            "locdiff-h",
        ]
    )
    assert rc == 2
    assert "run of method 'knn'" in capsys.readouterr().err
    assert not (tmp_path / "p.parquet").exists()


def test_bad_inputs_are_named(synth_dir, tmp_path, capsys):
    t = pq.read_table(synth_dir / "val.parquet").drop(["lat"])
    pq.write_table(t, tmp_path / "nolat.parquet")
    rc = main(
        [
            "train",
            "--config",
            str(TINY),
            "--train",
            str(tmp_path / "nolat.parquet"),
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "nolat.parquet" in err and "lat" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("network:\n  widht: [3]\n")
    rc = main(
        [
            "train",
            "--config",
            str(bad),
            "--train",
            str(synth_dir / "val.parquet"),
            "--out",
            str(tmp_path / "r2"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "network.widht: unknown key" in capsys.readouterr().err
    rc = main(
        [
            "predict",
            "--run",
            str(tmp_path / "nope"),
            "--data",
            str(synth_dir / "val.parquet"),
            "--out",
            str(tmp_path / "p.parquet"),
        ]
    )
    assert rc == 2 and "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # nothing written when the config is invalid


def test_predict_wrong_embedding_dimension(run, tmp_path, capsys):
    table = pa.table(
        {
            "id": ["a", "b"],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10, np.float32)), 5),
        }
    )
    pq.write_table(table, tmp_path / "d5.parquet")
    rc = main(
        [
            "predict",
            "--run",
            str(run),
            "--data",
            str(tmp_path / "d5.parquet"),
            "--out",
            str(tmp_path / "p.parquet"),
        ]
    )
    assert rc == 2 and "dimension 5" in capsys.readouterr().err


@pytest.mark.slow
def test_one_photo_one_answer(run, synth_tables, tmp_path):
    """A row's answer depends on the row alone (its noise comes from the seed and its embedding): the same
    embedding three times in one table, the table reversed, batches of one, and two worker processes of
    `locdiff predict` on the two halves all give the same answers (K = 4 samples, so the noise matters)."""
    import os
    import subprocess
    import sys

    from locdiff.io import write_embeddings
    from locdiff.model.locdiff_method import LocDiffMethod
    from locdiff.runs import RunFolder
    from locdiff.tables import EmbeddingTable

    src = synth_tables["test"]
    emb = src.embedding[:48].copy()
    emb[[5, 30]] = emb[17]  # one photo three times
    ids = np.asarray([f"r{i}" for i in range(len(emb))], dtype=object)
    table = EmbeddingTable(ids=ids, lat=None, lon=None, embedding=emb, source="rows")
    _, meta = RunFolder(run).load_model()
    m = LocDiffMethod.load(run, meta["config"])
    assert m.config.predict.samples > 1
    for name in ("locdiff", "locdiff-h"):
        ref = m.predict(table, method=name)
        np.testing.assert_allclose(ref.lat[[5, 30]], ref.lat[[17, 17]], atol=1e-6)
        np.testing.assert_allclose(ref.lon[[5, 30]], ref.lon[[17, 17]], atol=1e-6)
        back = m.predict(EmbeddingTable(ids=ids[::-1], lat=None, lon=None, embedding=emb[::-1].copy()), method=name)
        np.testing.assert_array_equal(back.density_code[::-1], ref.density_code)
        np.testing.assert_allclose(back.lat[::-1], ref.lat, atol=1e-6)
        np.testing.assert_allclose(back.lon[::-1], ref.lon, atol=1e-6)
        np.testing.assert_allclose(back.confidence[::-1], ref.confidence, atol=1e-6)
    single = LocDiffMethod.load(run, {**meta["config"], "predict": {**meta["config"]["predict"], "batch_size": 1}})
    one = single.predict(table)
    ref = m.predict(table)
    np.testing.assert_array_equal(one.density_code, ref.density_code)
    np.testing.assert_allclose(one.lat, ref.lat, atol=1e-6)
    np.testing.assert_allclose(one.lon, ref.lon, atol=1e-6)
    # two workers: `locdiff predict` in two processes at once, one half each
    procs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for half, rows in enumerate((slice(0, 20), slice(20, None))):
        write_embeddings(tmp_path / f"h{half}.parquet",
                         EmbeddingTable(ids=ids[rows], lat=src.lat[:48][rows], lon=src.lon[:48][rows],
                                        embedding=emb[rows]))
        procs.append(subprocess.Popen([sys.executable, "-m", "locdiff", "predict", "--run", str(run), "--data",
                                       str(tmp_path / f"h{half}.parquet"), "--out", str(tmp_path / f"p{half}.parquet"),
                                       "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    parts = [read_predictions(tmp_path / f"p{half}.parquet") for half in (0, 1)]
    np.testing.assert_allclose(np.concatenate([p.pred_lat for p in parts]), ref.lat, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([p.pred_lon for p in parts]), ref.lon, atol=1e-6)


_POE = {"bandwidth_km": 25, "strength": 1, "threshold": 0, "slope": 1, "floor": 0}
_MODEL = {"kind": "logistic", "mean": [0.0] * 9, "scale": [1.0] * 9, "coef": [0.5] * 9, "intercept": 0.0, "n": 10}


@pytest.mark.parametrize(("damage", "what"), [
    *(({"hybrid_poe": poe}, "hybrid_poe") for poe in (
        {"bandwidth_km": -1}, "x", {**_POE, "threshold": "nan", "floor": 2}, {**_POE, "consensus": 99},
        {**_POE, "consensus": 2, "consensus_density": "x"}, {**_POE, "margin": -0.1}, {**_POE, "margin": "nan"},
        {**_POE, "strength": 10**400})),
    *(({"hybrid_signal": signal, "hybrid_novelty": model}, "hybrid_novelty") for signal, model in (
        ("learned", "x"), ("learned", {**_MODEL, "kind": "pickle"}),
        ("learned", {**_MODEL, "coef": [0.5] * 8}),  # lengths that differ
        ("learned", {**_MODEL, "mean": [0.0] * 8, "scale": [1.0] * 8, "coef": [0.5] * 8}),  # one length, not 9
        ("learned", {**_MODEL, "scale": [0.0] * 9}), ("learned", {**_MODEL, "intercept": 10**400}),
        ("learned", {**_MODEL, "n": float("inf")}), ("learned", {**_MODEL, "coef": ["1"] * 9}),
        ("learned", None),  # thresholds on the logit's scale, no model
        ("s_top", _MODEL), ("both", _MODEL))),
    *(({"hybrid_mode": mode}, "hybrid_mode") for mode in ("bogus", ["poe"], None)),
    *(({"hybrid_mode": "blend", key: value}, key) for key, value in (
        ("hybrid_radius_km", "far"), ("hybrid_radius_km", -5), ("hybrid_radius_km", float("nan")),
        ("hybrid_weight", float("nan")), ("hybrid_weight", 7), ("hybrid_weight", -1), ("hybrid_weight", True)))])
def test_damaged_locdiff_h_parameters_are_one_line(run, synth_dir, tmp_path, capsys, damage, what):
    """selection.json is untrusted: LocDiff-H with damaged product-of-experts parameters, a damaged learned
    novelty signal, mode or blend setting is refused in one line naming what (exit 2), nothing written."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    sel = json.loads((bad / "selection.json").read_text())
    (bad / "selection.json").write_text(json.dumps({**sel, "hybrid_mode": "poe", **damage}))
    rc = main(["predict", "--run", str(bad), "--data", str(synth_dir / "test.parquet"), "--out",
               str(tmp_path / "p.parquet"), "--method", "locdiff-h", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{what} is damaged" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.parquet").exists()


def test_a_run_chosen_before_the_distinct_match_override_keeps_it_off(run, synth_dir, tmp_path):
    """selection.json written before `margin` existed: LocDiff-H predicts exactly as with the override off; a
    margin of 0 (every image takes its best match) changes the answers, so the key is read."""
    import shutil

    preds = {}
    for name, margin in (("old", None), ("off", float("inf")), ("all", 0.0)):
        folder = tmp_path / name
        shutil.copytree(run, folder)
        sel = json.loads((folder / "selection.json").read_text())
        poe = {k: v for k, v in sel["hybrid_poe"].items() if k != "margin"}
        if margin is not None:
            poe["margin"] = margin
        (folder / "selection.json").write_text(json.dumps({**sel, "hybrid_mode": "poe", "hybrid_poe": poe}))
        out = tmp_path / f"{name}.parquet"
        assert main(["predict", "--run", str(folder), "--data", str(synth_dir / "test.parquet"), "--out", str(out),
                     "--method", "locdiff-h", "--no-progress"]) == 0
        preds[name] = read_predictions(out)
    np.testing.assert_array_equal(preds["old"].pred_lat, preds["off"].pred_lat)
    np.testing.assert_array_equal(preds["old"].pred_lon, preds["off"].pred_lon)
    assert not np.array_equal(preds["all"].pred_lat, preds["off"].pred_lat)  # the key is read, not ignored


@pytest.mark.parametrize(("name", "value"), [("emb_std", 0.0), ("emb_std", -1.0), ("emb_mean", 3e38)])
def test_damaged_embedding_stats_are_one_line_naming_the_tensor(run, synth_dir, tmp_path, capsys, name, value):
    """model.safetensors is untrusted: a standardisation that makes every answer NaN (a zero std) or overflows
    the network is refused when the run is loaded, in one line naming the file and the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors[name].fill_(value)
    save_file(tensors, bad / "model.safetensors")
    rc = main(["predict", "--run", str(bad), "--data", str(synth_dir / "test.parquet"), "--out",
               str(tmp_path / "p.parquet"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{bad / 'model.safetensors'}: tensor {name} is not" in err, err
    assert not (tmp_path / "p.parquet").exists()
