"""Bad inputs and faults through the CLI, as a table: each case damages a copy of a good input (a run
folder, a table, a features stage) or writes a bad one, runs one `locdiff` command and expects exit code
2, exactly ONE line on stderr (`locdiff COMMAND: error: ...`) naming the culprit (the file, and the row,
field or member where there is one), and every file that existed before the command unchanged, with no
file added (no partial output, no temporary file, no config.yaml of a refused run).

A full disk is in test_disk_full.py; the pipeline's preflight and the Prefect flows in test_services.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from locdiff.cli import main

from .helpers import (
    REPO,
    TINY,
    World,
    assert_one_line_fault,
    changes,
    command_of,
    flip_byte,
    gallery_file,
    reseal_gallery,
    snapshot,
    truncate,
)

Case = Callable[[World, Path], tuple[list[str], list[str]]]


def _predict(run: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--no-progress", *extra]


# -- the run folder ------------------------------------------------------------------------------------------

def _with_run_file(w: World, tmp: Path, name: str, text: str, culprit: str) -> tuple[list[str], list[str]]:
    """A copy of the run whose file `name` holds `text`; predict names it with `culprit`."""
    run = w.copy_run(tmp / "run")
    (run / name).write_text(text)
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / name}: {culprit}"]


def truncated_safetensors(w, tmp):
    run = w.copy_run(tmp / "run")
    truncate(run / "model.safetensors")
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'model.safetensors'}: "]


def safetensors_header_garbage(w, tmp):
    run = w.copy_run(tmp / "run")
    (run / "model.safetensors").write_bytes(b"\xff" * 64)
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'model.safetensors'}: "]


def model_json_not_json(w, tmp):
    return _with_run_file(w, tmp, "model.json", '{"method": "locdiff", ', "not valid JSON")


def model_json_wrong_shape(w, tmp):
    run = w.copy_run(tmp / "run")
    meta = json.loads((run / "model.json").read_text())
    meta["embed_dim"] = "many"
    (run / "model.json").write_text(json.dumps(meta))
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'model.json'}: ", "embed_dim"]


def selection_json_not_json(w, tmp):
    return _with_run_file(w, tmp, "selection.json", "[1, 2", "not valid JSON")


def _edit_selection(run: Path, edit: Callable[[dict], object]) -> None:
    sel = json.loads((run / "selection.json").read_text())
    edit(sel)
    (run / "selection.json").write_text(json.dumps(sel))


def selection_json_is_a_list(w, tmp):
    return _with_run_file(w, tmp, "selection.json", "[]", "not a JSON object (a list)")


def selection_json_nested_too_deeply(w, tmp):
    return _with_run_file(w, tmp, "selection.json", "[" * 200_000 + "]" * 200_000,
                          "not valid JSON (nested too deeply)")


def selection_json_a_5000_digit_step(w, tmp):
    return _with_run_file(w, tmp, "selection.json", '{"step": ' + "9" * 5000 + "}",
                          "not valid JSON (Exceeds the limit")


def calibration_radius_negative(w, tmp):
    run = w.copy_run(tmp / "run")
    _edit_selection(run, lambda sel: sel["calibration"].update(radius_km=-200))
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'selection.json'}: calibration.radius_km is damaged"]


def calibration_probability_above_one(w, tmp):
    run = w.copy_run(tmp / "run")
    _edit_selection(run, lambda sel: sel["calibration"]["methods"]["locdiff"].update(y=[5.0, 5.0]))
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'selection.json'}: the confidence calibration of "
                                                  "'locdiff' is damaged", "probabilities y in [0, 1]"]


def calibration_methods_a_list(w, tmp):
    run = w.copy_run(tmp / "run")
    _edit_selection(run, lambda sel: sel["calibration"].update(methods=[1]))
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'selection.json'}: the confidence calibration of "]


def config_yaml_nested_too_deeply(w, tmp):
    return _with_run_file(w, tmp, "config.yaml", "a: " + "[" * 200_000, "not valid YAML (nested too deeply)")


def set_a_5000_digit_number(w, tmp):
    return w.train_argv(tmp / "run", "train.steps=" + "9" * 5000), ["--set train.steps: cannot read the value",
                                                                  "Exceeds the limit"]


def run_json_of_a_later_format(w, tmp):
    run = w.copy_run(tmp / "run")
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "format_version": 99}))
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'run.json'}: a run of format 99, written by a later "
                                                  "locdiff"]


def selection_json_is_a_fifo(w, tmp):  # a read of it would block for ever
    run = w.copy_run(tmp / "run")
    (run / "selection.json").unlink()
    os.mkfifo(run / "selection.json")
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'selection.json'}: not a regular file"]


def run_json_links_to_dev_zero(w, tmp):  # a read of it would never end
    run = w.copy_run(tmp / "run")
    (run / "run.json").unlink()
    (run / "run.json").symlink_to("/dev/zero")
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'run.json'}: a symlink leading out of the run folder"]


def config_yaml_links_out_of_the_run(w, tmp):  # never read (nor echoed in a message): the file is the user's
    run = w.copy_run(tmp / "run")
    (tmp / "notes.txt").write_text("not for the run to read\n")
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(tmp / "notes.txt")
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'config.yaml'}: a symlink leading out of the run folder"]


def truncated_checkpoint_on_resume(w, tmp):
    run = w.copy_run(tmp / "run")
    truncate(run / "checkpoint.pt")
    return w.train_argv(run, "train.steps=6"), [f"{run / 'checkpoint.pt'}: "]


def checkpoint_not_a_dict_on_resume(w, tmp):
    import torch

    run = w.copy_run(tmp / "run")
    torch.save([torch.zeros(3)], run / "checkpoint.pt")
    return w.train_argv(run, "train.steps=6"), [f"{run / 'checkpoint.pt'}: ", "not a locdiff checkpoint"]


def checkpoint_step_negative_on_resume(w, tmp):  # refused before config.yaml, metrics.jsonl or run.json change
    import torch

    run = w.copy_run(tmp / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "step": -5}, run / "checkpoint.pt")
    return w.train_argv(run, "train.steps=6"), [f"{run / 'checkpoint.pt'}: not a locdiff checkpoint (step '-5'"]


def checkpoint_nan_weights_on_resume(w, tmp):
    import torch

    run = w.copy_run(tmp / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    key = next(k for k, t in state["model"].items() if t.is_floating_point())
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    torch.save(state, run / "checkpoint.pt")
    return w.train_argv(run, "train.steps=6"), [f"{run / 'checkpoint.pt'}: the weights hold NaN or inf ({key}"]


def checkpoint_missing_keys_on_resume(w, tmp):
    import torch

    run = w.copy_run(tmp / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, run / "checkpoint.pt")
    return w.train_argv(run, "train.steps=6"), [f"{run / 'checkpoint.pt'}: ", "optimizer"]


def run_config_bad_yaml_predict(w, tmp):
    run = w.copy_run(tmp / "run")
    (run / "config.yaml").write_text("train: [\n")
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'config.yaml'}: not valid YAML"]


def run_config_bad_yaml_resume(w, tmp):
    run = w.copy_run(tmp / "run")
    (run / "config.yaml").write_text("train: [\n")
    return w.train_argv(run, "train.steps=6"), [f"{run / 'config.yaml'}: not valid YAML"]


def run_config_unknown_key(w, tmp):
    run = w.copy_run(tmp / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["stepz"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'config.yaml'}: train.stepz: unknown key"]


def run_config_out_of_range(w, tmp):
    run = w.copy_run(tmp / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["network"]["dropout"] = 1.5
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return (_predict(run, w.test, tmp / "p.csv"),
            [f"{run / 'config.yaml'}: network.dropout: must be a number in [0, 1); got 1.5"])


def run_config_out_of_range_resume(w, tmp):
    run = w.copy_run(tmp / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["batch_size"] = -4
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return w.train_argv(run, "train.steps=6"), [f"{run / 'config.yaml'}: train.batch_size: must be an integer in "
                                                "[1, 16777216]"]


def truncated_gallery(w, tmp):
    run = w.copy_run(tmp / "run")
    index = gallery_file(w.copy_gallery(run, tmp / "gallery"), "index")
    truncate(index)
    return _predict(run, w.test, tmp / "p.csv", "--method", "locdiff-h"), [f"{index}: ", "truncated or replaced"]


def gallery_json_damaged(w, tmp):
    run = w.copy_run(tmp / "run")
    gallery = w.copy_gallery(run, tmp / "gallery")
    truncate(gallery / "gallery.json")
    return _predict(run, w.test, tmp / "p.csv", "--method", "locdiff-h"), [f"{gallery / 'gallery.json'}: "]


def gallery_array_of_another_shape(w, tmp):
    run = w.copy_run(tmp / "run")
    gallery = w.copy_gallery(run, tmp / "gallery")
    lat = gallery_file(gallery, "lat")
    np.save(lat, np.zeros(3))
    reseal_gallery(run, gallery, "lat")
    return _predict(run, w.test, tmp / "p.csv", "--method", "locdiff-h"), [f"{lat}: ", "shape (3,)"]


def resume_128d_run_with_64d_data(w, tmp):
    run = w.copy_run(tmp / "run")
    return (w.train_argv(run, data=w.train64),
            [f"{run / 'checkpoint.pt'}: ", "128-d", f"{w.train64} has 64-d"])


def predict_64d_data_with_128d_run(w, tmp):
    return _predict(w.run, w.train64, tmp / "p.csv"), [f"{w.train64}: column 'embedding' has dimension 64"]


def resume_with_steps_minus_5(w, tmp):
    run = w.copy_run(tmp / "run")
    return w.train_argv(run, "train.steps=-5"), ["--set train.steps: must be an integer in [1, 1000000000]; got -5"]


# -- configs: refused before anything is written ------------------------------------------------------------

def _config(tmp: Path, section: str, key: str, value) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg[section][key] = value
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def config_steps_minus_5(w, tmp):
    path = _config(tmp, "train", "steps", -5)
    argv = ["train", "--config", str(path), "--train", str(w.train), "--out", str(tmp / "run")]
    return argv, [f"{path}: train.steps: must be an integer in [1, 1000000000]; got -5"]


def config_batch_size_minus_4(w, tmp):
    path = _config(tmp, "train", "batch_size", -4)
    argv = ["train", "--config", str(path), "--train", str(w.train), "--out", str(tmp / "run")]
    return argv, [f"{path}: train.batch_size: must be an integer in [1, 16777216]; got -4"]


def config_not_yaml(w, tmp):
    path = tmp / "bad.yaml"
    path.write_text("train:\n  steps: [4\n")
    argv = ["train", "--config", str(path), "--train", str(w.train), "--out", str(tmp / "run")]
    return argv, [f"{path}: not valid YAML"]


def train_a_baseline_over_the_parameter_budget(w, tmp):  # 5.5e11 parameters: counted, never allocated
    argv = w.train_argv(tmp / "run", "baselines.regress.hidden=65536", "baselines.regress.depth=64")
    return argv + ["--method", "regress"], ["limits.max_parameters: the regress network would have",
                                            "(baselines.regress: hidden 65536, depth 64;"]


def train_with_an_encoder_of_another_width(w, tmp):  # the run would record CLIP ViT-L/14 for a 128-d table
    argv = w.train_argv(tmp / "run")
    return argv + ["--encoder", "clip-vit-l14"], ["--encoder clip-vit-l14: makes 768-d embeddings, and the "
                                                  "table's are 128-d"]


# -- tables ---------------------------------------------------------------------------------------------------

def _not_parquet(tmp: Path) -> Path:
    path = tmp / "table.parquet"
    path.write_bytes(b"id,lat,lon\na,1,2\n")
    return path


def train_on_a_file_that_is_not_parquet(w, tmp):
    path = _not_parquet(tmp)
    return w.train_argv(tmp / "run", data=path), [f"{path}: not a readable Parquet file"]


def predict_on_a_file_that_is_not_parquet(w, tmp):
    path = _not_parquet(tmp)
    return _predict(w.run, path, tmp / "p.csv"), [f"{path}: not a readable Parquet file"]


def predict_on_a_fifo(w, tmp):  # pyarrow would block on it for ever
    path = tmp / "table.parquet"
    os.mkfifo(path)
    return _predict(w.run, path, tmp / "p.csv"), [f"{path}: not a regular file or folder"]


def checkpoint_is_a_fifo_on_resume(w, tmp):
    run = w.copy_run(tmp / "run")
    (run / "checkpoint.pt").unlink()
    os.mkfifo(run / "checkpoint.pt")
    return w.train_argv(run, "train.steps=6"), [f"{run / 'checkpoint.pt'}: not a regular file"]


def truncated_parquet(w, tmp):
    path = tmp / "table.parquet"
    shutil.copy(w.train, path)
    truncate(path, 0.7)
    return w.train_argv(tmp / "run", data=path), [f"{path}: "]


def _with_nan(w: World, tmp: Path, row: int, value: float = np.nan) -> Path:
    table = pq.read_table(w.train)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    emb[row, 5] = value
    arr = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    path = tmp / "nan.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", arr), path,
                   row_group_size=100)  # the training reader reads row groups: the row is named in the file
    return path


def train_on_a_table_with_nan(w, tmp):
    path = _with_nan(w, tmp, 157)
    return w.train_argv(tmp / "run", data=path), [f"{path}: column 'embedding', row 157: element 5 of the "
                                                  "embedding is nan (NaN or infinite)"]


def predict_on_a_table_with_nan(w, tmp):
    path = _with_nan(w, tmp, 11)
    return _predict(w.run, path, tmp / "p.csv"), [f"{path}: column 'embedding', row 11: element 5"]


def predict_on_a_table_with_a_huge_element(w, tmp):  # finite, but it overflowed the network to NaN codes
    path = _with_nan(w, tmp, 7, 3e38)
    return _predict(w.run, path, tmp / "p.csv"), [f"{path}: column 'embedding', row 7: element 5 of the embedding "
                                                  "is 3e+38, beyond +-1e+06"]


def test_predict_on_a_float64_table_beyond_float32_is_one_line_without_a_warning(world, tmp_path, capsys):
    """A float64 element beyond float32's range is refused before the cast (which warned of an overflow)."""
    table = pq.read_table(world.test)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
    emb[3, 7] = 1e300
    path = tmp_path / "f64.parquet"
    arr = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", arr), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_one_line_fault(_predict(world.run, path, tmp_path / "p.csv"),
                              [f"{path}: column 'embedding', row 3: element 7 of the embedding is 1e+300, beyond "],
                              [tmp_path, world.base], capsys)


def predict_on_a_table_with_two_embedding_columns(w, tmp):
    table = pq.read_table(w.test)
    path = tmp / "twice.parquet"
    pq.write_table(table.append_column("embedding", table.column("embedding")), path)
    return _predict(w.run, path, tmp / "p.csv"), [f"{path}: column 'embedding' appears 2 times"]


def evaluate_a_csv_with_two_lat_columns(w, tmp):
    path = tmp / "pred.csv"
    path.write_text("id,lat,lon,pred_lat,pred_lon,lat\na,1,2,1,2,3\n")
    return ["evaluate", "--predictions", str(path)], [f"{path}: column 'lat' appears 2 times"]


def model_safetensors_with_nan(w, tmp):
    from safetensors.torch import load_file, save_file

    run = w.copy_run(tmp / "run")
    tensors = load_file(run / "model.safetensors")
    tensors["emb_mean"] = tensors["emb_mean"] * float("nan")
    save_file(tensors, run / "model.safetensors")
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'model.safetensors'}: the weights hold NaN or inf "
                                                  "(emb_mean)"]


def _predictions_csv(tmp: Path, bad: str) -> Path:
    path = tmp / "pred.csv"
    rows = ["id,lat,lon,pred_lat,pred_lon", "a,10,20,11,21", "b,30,40,31,41", f"c,{bad}", "d,0,0,0,0"]
    path.write_text("\n".join(rows) + "\n")
    return path


def evaluate_a_predictions_row_out_of_range(w, tmp):
    path = _predictions_csv(tmp, "50,60,95,61")
    return ["evaluate", "--predictions", str(path), "--json", str(tmp / "m.json")], \
        [f"{path}: column 'pred_lat', row 2: 95.0 is not a finite number in [-90, 90]"]


def evaluate_a_predictions_row_not_a_number(w, tmp):
    path = _predictions_csv(tmp, "50,sixty,51,61")
    return ["evaluate", "--predictions", str(path)], [f"{path}: ", "lon"]


def evaluate_a_predictions_row_too_short(w, tmp):
    path = _predictions_csv(tmp, "50")
    return ["evaluate", "--predictions", str(path)], [f"{path}: ", "Row #4: Expected 5 columns, got 2"]


# -- missing things, directories ---------------------------------------------------------------------------------

def train_on_a_missing_file(w, tmp):
    path = tmp / "absent.parquet"
    return w.train_argv(tmp / "run", data=path), [f"{path}: no such file"]


def predict_from_a_missing_run(w, tmp):
    return _predict(tmp / "norun", w.test, tmp / "p.csv"), [f"{tmp / 'norun'}: "]


def predict_from_a_run_without_a_model(w, tmp):
    run = w.copy_run(tmp / "run")
    (run / "model.safetensors").unlink()
    return _predict(run, w.test, tmp / "p.csv"), [f"{run}: no trained model"]


def evaluate_a_missing_file(w, tmp):
    return ["evaluate", "--predictions", str(tmp / "absent.csv")], [f"{tmp / 'absent.csv'}: no such file"]


def evaluate_a_directory(w, tmp):
    path = tmp / "pred.csv"
    path.mkdir()
    return ["evaluate", "--predictions", str(path)], [f"{path}: is a directory"]


def evaluate_json_onto_the_predictions(w, tmp):
    path = tmp / "pred.csv"
    path.write_text("id,lat,lon,pred_lat,pred_lon\na,1,2,1,2\n")
    return (["evaluate", "--predictions", str(path), "--json", str(path)],
            [f"--json {path} is the --predictions file"])


def predict_out_onto_the_data(w, tmp):
    data = tmp / "table.parquet"
    shutil.copy(w.test, data)
    return _predict(w.run, data, data), [f"--out {data} is the --data file"]


def model_safetensors_is_a_directory(w, tmp):
    run = w.copy_run(tmp / "run")
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").mkdir()
    return _predict(run, w.test, tmp / "p.csv"), [f"{run / 'model.safetensors'}: is a directory"]


def predict_out_is_a_directory(w, tmp):
    out = tmp / "p.csv"
    out.mkdir()
    return _predict(w.run, w.test, out), [f"{out}: is a directory"]


def train_config_is_a_directory(w, tmp):
    path = tmp / "c.yaml"
    path.mkdir()
    argv = ["train", "--config", str(path), "--train", str(w.train), "--out", str(tmp / "run")]
    return argv, [f"{path}"]


# -- feature shards -----------------------------------------------------------------------------------------------

def _stage(w: World, tmp: Path) -> tuple[Path, Path]:
    shutil.copytree(w.features_root, tmp / "root")
    folder = tmp / "root" / "emb"
    return folder, folder / "features" / "precomputed"


def inspect_a_truncated_shard(w, tmp):
    folder, stage = _stage(w, tmp)
    truncate(stage / "shard-000001.tar")
    return ["data", "inspect", str(folder)], [f"{stage / 'shard-000001.tar'}: sha256 "]


def inspect_a_truncated_shard_unverified(w, tmp):
    folder, stage = _stage(w, tmp)
    truncate(stage / "shard-000001.tar")
    return ["data", "inspect", str(folder), "--no-verify"], [f"{stage / 'shard-000001.tar'}: cut short"]


def _corrupt_json(stage: Path, shard: str, fix_manifest: bool) -> None:
    path = stage / shard
    data = bytearray(path.read_bytes())
    at = data.index(b".json\x00")  # the first json member's name in its tar header
    header = (at // 512) * 512  # the tar header block that holds the member name
    data[header + 512: header + 512 + 5] = b"{bad:"
    path.write_bytes(bytes(data))
    if fix_manifest:
        import hashlib

        m = json.loads((stage / "manifest.json").read_text())
        for e in m["shards"]:
            if e["shard"] == shard:
                e["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (stage / "manifest.json").write_text(json.dumps(m))


def inspect_a_corrupted_json_member(w, tmp):
    folder, stage = _stage(w, tmp)
    _corrupt_json(stage, "shard-000002.tar", fix_manifest=True)
    return ["data", "inspect", str(folder)], [f"{stage / 'shard-000002.tar'}: member ", ".json is not valid JSON"]


def inspect_a_flipped_byte(w, tmp):
    folder, stage = _stage(w, tmp)
    flip_byte(stage / "shard-000000.tar", 2000)
    return ["data", "inspect", str(folder)], [f"{stage / 'shard-000000.tar'}: sha256 ", "differs from the manifest"]


def train_on_a_flipped_byte(w, tmp):
    folder, stage = _stage(w, tmp)
    flip_byte(stage / "shard-000001.tar", 2000)
    return w.train_argv(tmp / "run", data=stage), [f"{stage / 'shard-000001.tar'}: sha256 differs"]


def export_a_truncated_shard(w, tmp):
    folder, stage = _stage(w, tmp)
    truncate(stage / "shard-000002.tar")
    argv = ["data", "export", "emb", "--root", str(tmp / "root"), "--encoder", "precomputed",
            "--out", str(tmp / "out.parquet")]
    return argv, [f"{stage / 'shard-000002.tar'}: sha256 differs"]


def train_on_a_broken_manifest(w, tmp):
    folder, stage = _stage(w, tmp)
    (stage / "manifest.json").write_text('{"stage": "features", "shards": [')
    return w.train_argv(tmp / "run", data=stage), [f"{stage / 'manifest.json'}: not valid JSON"]


def predict_out_under_a_file(w, tmp):  # said "afile: File exists"
    (tmp / "afile").write_text("x")
    return _predict(w.run, w.test, tmp / "afile" / "p.parquet"), [f"{tmp / 'afile'}: is a file, not a directory"]


CASES: list[Case] = [
    truncated_safetensors, safetensors_header_garbage, model_json_not_json, model_json_wrong_shape,
    selection_json_not_json, selection_json_is_a_list, selection_json_nested_too_deeply,
    selection_json_a_5000_digit_step, calibration_radius_negative, calibration_probability_above_one,
    calibration_methods_a_list, config_yaml_nested_too_deeply, set_a_5000_digit_number, run_json_of_a_later_format,
    selection_json_is_a_fifo,
    run_json_links_to_dev_zero, config_yaml_links_out_of_the_run,
    truncated_checkpoint_on_resume, checkpoint_not_a_dict_on_resume,
    checkpoint_missing_keys_on_resume, checkpoint_step_negative_on_resume, checkpoint_nan_weights_on_resume,
    run_config_bad_yaml_predict, run_config_bad_yaml_resume,
    run_config_unknown_key, run_config_out_of_range, run_config_out_of_range_resume, truncated_gallery,
    gallery_json_damaged, gallery_array_of_another_shape, resume_128d_run_with_64d_data, predict_64d_data_with_128d_run,
    resume_with_steps_minus_5, config_steps_minus_5, config_batch_size_minus_4, config_not_yaml,
    train_a_baseline_over_the_parameter_budget, train_with_an_encoder_of_another_width,
    train_on_a_file_that_is_not_parquet, predict_on_a_file_that_is_not_parquet, predict_on_a_fifo,
    checkpoint_is_a_fifo_on_resume, truncated_parquet,
    train_on_a_table_with_nan, predict_on_a_table_with_nan, predict_on_a_table_with_a_huge_element,
    predict_on_a_table_with_two_embedding_columns, evaluate_a_csv_with_two_lat_columns, model_safetensors_with_nan,
    evaluate_a_predictions_row_out_of_range,
    evaluate_a_predictions_row_not_a_number, evaluate_a_predictions_row_too_short, train_on_a_missing_file,
    predict_from_a_missing_run, predict_from_a_run_without_a_model, evaluate_a_missing_file,
    evaluate_a_directory, evaluate_json_onto_the_predictions, predict_out_onto_the_data,
    model_safetensors_is_a_directory, predict_out_is_a_directory, predict_out_under_a_file,
    train_config_is_a_directory, inspect_a_truncated_shard, inspect_a_truncated_shard_unverified,
    inspect_a_corrupted_json_member, inspect_a_flipped_byte, train_on_a_flipped_byte, export_a_truncated_shard,
    train_on_a_broken_manifest,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_fault_is_one_line_exit_2_and_nothing_is_lost(world, tmp_path, capsys, case):
    argv, culprits = case(world, tmp_path)
    assert_one_line_fault(argv, culprits, [tmp_path, world.base], capsys)


# -- the same through a separate process: the exit status and stderr of `python -m locdiff` -----------------------

@pytest.mark.parametrize("case", [truncated_checkpoint_on_resume, truncated_gallery, inspect_a_corrupted_json_member],
                         ids=lambda c: c.__name__)
def test_a_fault_in_a_separate_process(world, tmp_path, case):
    argv, culprits = case(world, tmp_path)
    before = snapshot(tmp_path, world.base)
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "locdiff", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    # log records (INFO lines of the libraries, e.g. faiss's loader) may come first; the report is the last
    # line and the only error line
    lines = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"locdiff {command_of(argv)}: error: ") and proc.stderr.endswith(lines[0] + "\n")
    assert all(c in lines[0] for c in culprits), lines[0]
    assert changes(before, snapshot(tmp_path, world.base)) == {"changed": [], "removed": [], "added": []}



def test_locate_counts_what_it_leaves_out_of_a_folder(tmp_path, capsys):
    """Issue 21 item 4: symlinks out of the folder, symlinked folders, FIFOs and other files are counted, not
    dropped silently (a FIFO named like a photo would block a reader: it is never opened)."""
    import os

    from locdiff.cli.locate import photo_files

    folder, outside = tmp_path / "photos", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "sub" / "b.PNG").write_bytes(b"\x89PNG")
    (folder / "notes.txt").write_text("x")
    (folder / "out.jpg").symlink_to(outside / "secret.jpg")
    (folder / "in.jpg").symlink_to(folder / "a.jpg")  # inside the folder: kept
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    os.mkfifo(folder / "pipe.jpg")
    skipped: dict[str, int] = {}
    files = photo_files([str(folder)], skipped)
    assert [Path(f).name for f in files] == ["a.jpg", "in.jpg", "b.PNG"]
    assert skipped == {"symlink_outside": 1, "symlinked_folder": 1, "special": 1, "not_an_image": 1}
    (folder / "a.jpg").unlink()
    (folder / "in.jpg").unlink()
    (folder / "sub" / "b.PNG").unlink()
    rc = main(["locate", "--run", str(tmp_path / "no-run"), str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"locdiff locate: error: no image files (JPEG/PNG/WebP) in {folder} (left out of the folders: "
                      "1 files that are not JPEG/PNG/WebP, 1 entries that are not regular files, 1 symlinks leading "
                      "out of the folder, 1 symlinked folders (not followed))")


def test_locate_counts_a_symlink_loop_as_left_out(tmp_path):
    """A symlink loop in a photo folder aborted `locate` (`unexpected RuntimeError: Symlink loop from ...`, from
    Path.resolve()): it is left out and counted, and the other photos are kept."""
    from locdiff.cli.locate import photo_files

    folder = tmp_path / "loop"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "b.jpg").symlink_to("c.jpg")
    (folder / "c.jpg").symlink_to("b.jpg")
    skipped: dict[str, int] = {}
    assert photo_files([str(folder)], skipped) == [str(folder / "a.jpg")]
    assert skipped == {"symlink_loop": 3}


@pytest.mark.parametrize("method", ["locdiff", "locdiff-h"])
def test_predict_predicts_a_chunk_of_rows_at_a_time(world, tmp_path, monkeypatch, method):
    """`predict` reads its table whole (bounded below) but predicts PREDICT_ROWS rows at a time: what a method
    keeps per row beyond the answer (LocDiff's density code, D floats a row) is held for one chunk only, and the
    answers are those of one pass over the whole table."""
    from locdiff import evaluation
    from locdiff.model.locdiff_method import LocDiffMethod

    assert main(_predict(world.run, world.test, tmp_path / "whole.parquet", "--method", method)) == 0
    seen: list[int] = []
    real = LocDiffMethod.predict
    monkeypatch.setattr(LocDiffMethod, "predict", lambda self, table, **kw: seen.append(len(table)) or
                        real(self, table, **kw))
    monkeypatch.setattr(evaluation, "PREDICT_ROWS", 7)
    assert main(_predict(world.run, world.test, tmp_path / "chunked.parquet", "--method", method)) == 0
    n = pq.read_metadata(world.test).num_rows
    assert n > 14 and max(seen) == 7 and sum(seen) == n
    chunked, whole = (pq.read_table(tmp_path / f"{k}.parquet").to_pandas() for k in ("chunked", "whole"))
    assert chunked[["id", "lat", "lon", "method"]].equals(whole[["id", "lat", "lon", "method"]])
    # the same answers up to the batches' float64 rounding (under a millimetre; see locdiff.model.predict)
    np.testing.assert_allclose(chunked[["pred_lat", "pred_lon"]], whole[["pred_lat", "pred_lon"]], rtol=0, atol=1e-8)
    np.testing.assert_allclose(chunked["confidence"], whole["confidence"], rtol=0, atol=1e-12)
    # the pipeline's evaluation predicts the same way
    from locdiff.data.stream import read_table
    from locdiff.methods import get_method
    from locdiff.runs import RunFolder

    seen.clear()
    trained = get_method("locdiff").load(world.run, RunFolder(world.run).read_config())
    result = evaluation.evaluate_table(trained, read_table(str(world.test)), tmp_path / "eval", name=method,
                                       predict_options={"method": method})
    assert max(seen) == 7 and sum(seen) == n
    np.testing.assert_allclose(result.predictions["pred_lat"], whole["pred_lat"], rtol=0, atol=1e-8)


def test_predict_refuses_a_table_too_large_to_read_whole_before_reading_it(world, tmp_path, capsys, monkeypatch):
    """A table is read whole for prediction: its rows x dim is bounded from the Parquet metadata (a 2.4 MB file
    of repeated rows can hold millions of them), in one line naming the file."""
    from locdiff.data import datasource

    n, dim = pq.read_metadata(world.test).num_rows, 128  # the world's d128 benchmark
    monkeypatch.setattr(datasource, "MAX_READ_FLOATS", n * dim - 1)
    rc = main(_predict(world.run, world.test, tmp_path / "p.csv"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"locdiff predict: error: {world.test}: {n:,} rows of {dim:,} floats, above the "
                      f"{n * dim - 1:,} a table read whole may hold; split it into smaller tables")
    assert not (tmp_path / "p.csv").exists()
    monkeypatch.setattr(datasource, "MAX_READ_FLOATS", n * dim)
    assert main(_predict(world.run, world.test, tmp_path / "p.csv")) == 0


def test_a_local_folder_given_as_a_url_is_one_line_and_makes_no_local_folder(world, tmp_path, capsys, monkeypatch):
    """Run folders and benchmark worlds are local: `train --out s3://...` trained into the local folder
    ./s3:/bucket/... (exit 0), `predict --run s3://...` named the folder s3:/bucket/... that it had looked for,
    and `synth`/`realbench`/`cuebench --out s3://...` left an empty ./s3:/bucket/... after an error that did
    not name --out."""
    monkeypatch.chdir(tmp_path)  # where Path("s3://bucket/x") would have been made: ./s3:/bucket/x
    sizes = ["--n-train", "40", "--n-test", "10"]
    for argv, culprit in (
            (world.train_argv("s3://bucket/runs/new"),
             "--out s3://bucket/runs/new: cannot write to s3:// URLs; give a local path"),
            (_predict("s3://bucket/runs/old", world.test, tmp_path / "p.csv"),
             "s3://bucket/runs/old: a run folder is a local folder, not a URL; give a local path"),
            *(([cmd, "--out", f"s3://bucket/{cmd}", *sizes, "--n-val-unseen", "0", *more],
               f"--out s3://bucket/{cmd}: cannot write to s3:// URLs; give a local path")
              for cmd, more in (("synth", ["--n-unseen", "5"]), ("cuebench", ["--n-test-unseen", "5"]),
                                ("realbench", ["--n-test-unseen", "5", "--n-yfcc", "5"])))):
        assert_one_line_fault(argv, [culprit], [tmp_path, world.base], capsys)
