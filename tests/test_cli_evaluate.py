"""`locdiff evaluate`: the printed table, the JSON, plots, and a clear error for unlabelled predictions."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from locdiff.cli import main
from locdiff.io import write_predictions
from locdiff.metrics import geo_metrics

PRED = ([0.0, 0.0, 0.0, -90.0], [0.0, 0.2, 6.0, 0.0])
TRUE = ([0.0, 0.0, 0.0, 90.0], [0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_evaluate_prints_table_and_writes_json(tmp_path, capsys, ext):
    path = tmp_path / f"pred.{ext}"
    write_predictions(path, ["a", "b", "c", "d"], *TRUE, *PRED, method="knn")
    rc = main(["evaluate", "--predictions", str(path), "--json", str(tmp_path / "m.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "knn" in out and "25.00 % (1)" in out and "50.00 % (2)" in out and "75.00 % (3)" in out
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m == pytest.approx(geo_metrics(*PRED, *TRUE))


def test_evaluate_plots(tmp_path):
    path = tmp_path / "pred.parquet"
    write_predictions(path, ["a", "b", "c", "d"], *TRUE, *PRED)
    assert main(["evaluate", "--predictions", str(path), "--plots", str(tmp_path / "plots")]) == 0
    for name in ("map.png", "error_cdf.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_needs_truth(tmp_path, capsys):
    path = tmp_path / "pred.parquet"
    write_predictions(path, ["a"], None, None, [1.0], [2.0])
    assert main(["evaluate", "--predictions", str(path)]) == 2
    assert "no truth columns 'lat' and 'lon'" in capsys.readouterr().err


@pytest.mark.timeout(60, method="thread")  # a blocked read is not interruptible
@pytest.mark.parametrize("ext,message", [("csv", "not a regular file"), ("parquet", "not a readable Parquet file")])
def test_evaluate_refuses_a_fifo_in_one_line(tmp_path, capsys, ext, message):
    path = tmp_path / f"pred.{ext}"
    os.mkfifo(path)  # reading it would block for ever
    assert main(["evaluate", "--predictions", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: {message}" in err, err


def test_evaluate_names_a_null_method(tmp_path, capsys):
    path = tmp_path / "pred.parquet"
    write_predictions(path, ["a", "b", "c", "d"], *TRUE, *PRED, method="knn")
    table = pq.read_table(path)
    methods = table["method"].to_pylist()
    methods[2] = None
    pq.write_table(table.set_column(table.schema.get_field_index("method"), "method", pa.array(methods, pa.string())),
                   path)
    assert main(["evaluate", "--predictions", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: column 'method', row 2: method is null" in err, err


@pytest.mark.parametrize("flag", ["--json", "--plots"])
@pytest.mark.parametrize("url", ["s3://bucket/m", "memory://m"])
def test_evaluate_refuses_an_output_url(tmp_path, capsys, monkeypatch, flag, url):
    """--json and --plots are written locally: a URL is refused in one line naming the flag (s3://bucket/m.json
    became the local file s3:/bucket/m.json)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "pred.parquet"
    write_predictions(path, ["a", "b", "c", "d"], *TRUE, *PRED)
    assert main(["evaluate", "--predictions", str(path), flag, url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{flag} {url}: cannot write to" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.parquet"]


def test_predict_refuses_an_output_url_it_cannot_keep(tmp_path, capsys):
    """predict --out writes s3:// through the storage layer; memory:// would be gone when the command ends."""
    assert main(["predict", "--run", str(tmp_path / "no_run"), "--data", str(tmp_path / "t.parquet"),
                 "--out", "memory://x.parquet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out memory://x.parquet: cannot write to memory:// URLs" in err, err


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_evaluate_refuses_a_table_too_large_to_read_whole_before_reading_it(tmp_path, capsys, monkeypatch, folder):
    """A predictions table is read whole: its rows are bounded from the Parquet metadata (20,000,000 repeated
    rows fit in 90 MB and took evaluate to 4.6 GB), in one line naming the table; nothing is written."""
    from locdiff import io

    path = tmp_path / "pred.parquet"
    write_predictions(path, ["a", "b", "c", "d"], *TRUE, *PRED)
    if folder:
        (tmp_path / "parts.parquet").mkdir()
        write_predictions(tmp_path / "parts.parquet" / "x.parquet", ["a", "b"], *(v[:2] for v in (*TRUE, *PRED)))
        write_predictions(tmp_path / "parts.parquet" / "y.parquet", ["c", "d"], *(v[2:] for v in (*TRUE, *PRED)))
    shown = tmp_path / "parts.parquet" if folder else path
    monkeypatch.setattr(io, "MAX_PREDICTION_ROWS", 3)
    rc = main(["evaluate", "--predictions", str(shown), "--json", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"locdiff evaluate: error: {shown}: 4 rows, above the 3 a table read whole may hold; "
                               "split it into smaller tables"], err
    assert not (tmp_path / "m.json").exists()
    monkeypatch.setattr(io, "MAX_PREDICTION_ROWS", 4)
    assert main(["evaluate", "--predictions", str(shown)]) == 0
