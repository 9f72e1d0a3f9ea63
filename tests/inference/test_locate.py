"""`locdiff locate` and the Geolocator API on a run trained on tiny-CLIP embeddings of generated photos:
a folder with an unreadable file, typed results, the one preprocessing, top-k modes, encoder checks."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from locdiff import Geolocator, Location, Mode
from locdiff.cli import main
from locdiff.errors import UserError
from locdiff.geo import haversine_km


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """Five photos (nested), a truncated JPEG, a text file, all without coordinates."""
    out = tmp_path_factory.mktemp("new")
    jpgs = sorted(photos["test"].glob("*.jpg"))[:5]
    for i, p in enumerate(jpgs):
        dst = out / ("sub" if i == 4 else "") / p.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(p, dst)
    (out / "broken.jpg").write_bytes(jpgs[0].read_bytes()[:200])
    (out / "notes.txt").write_text("not a photo")
    return out


def test_cli_locates_a_folder_and_reports_the_unreadable_file(trained, folder, tmp_path, capsys):
    out, png = tmp_path / "pred.csv", tmp_path / "map.png"
    rc = main(["locate", "--run", str(trained["run_dir"]), str(folder), "--top-k", "3", "--out", str(out),
               "--map", str(png), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"skipped {folder / 'broken.jpg'}: truncated" in cap.err  # its first 200 bytes
    lines = cap.out.splitlines()
    assert lines[0].split()[:4] == ["file", "lat", "lon", "place"] and "confidence (200 km)" in lines[0]
    assert "5 of 6 photos located" in cap.out and "not located" in cap.out
    df = pd.read_csv(out)
    assert len(df) == 5 and "notes.txt" not in " ".join(df["id"])
    assert list(df.columns[:5]) == ["id", "pred_lat", "pred_lon", "method", "confidence"]
    assert {"place", "place_km", "confidence_radius_km", "mode1_lat", "mode3_probability", "mode2_place"} <= set(df)
    assert df["confidence"].between(0, 1).all() and (df["method"] == "locdiff").all()
    assert str(folder / "sub" / sorted(p.name for p in (folder / "sub").glob("*.jpg"))[0]) in set(df["id"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line(trained, folder, tmp_path, capsys):
    assert main(["locate", "--run", str(trained["run_dir"]), str(folder), "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip() == f"locdiff locate: error: --out {tmp_path / 'x.json'}: give a .csv " \
                                              "or .parquet file"
    for device, said in (("garbage!", "--device 'garbage!': give auto, cpu, cuda, cuda:N or mps"),
                         ("cuda:99", "--device=cuda:99: this machine has no such device")):
        assert main(["locate", "--run", str(trained["run_dir"]), str(folder), "--device", device]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"locdiff locate: error: {said}") and "\n" not in err, err
    assert main(["locate", "--run", str(tmp_path / "nope"), str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such run folder" in err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"nope")
    keep = tmp_path / "keep.csv"  # an earlier table: a call that locates nothing leaves it as it was
    keep.write_text("id,lat,lon\nearlier,1,2\n")
    assert main(["locate", "--run", str(trained["run_dir"]), str(only_bad), "--no-progress", "--out", str(keep),
                 "--map", str(tmp_path / "m.png")]) == 2
    assert "none of the 1 photos could be read" in capsys.readouterr().err
    assert keep.read_text() == "id,lat,lon\nearlier,1,2\n" and not (tmp_path / "m.png").exists()


def test_api_types_inputs_and_order(trained, folder):
    g = Geolocator.load(trained["run_dir"])
    files = sorted(str(p) for p in folder.glob("*.jpg"))  # broken.jpg first
    pil = Image.open(files[1])
    raw = open(files[2], "rb").read()
    res = g.locate([files[1], pil, raw, files[0]], top_k=4)
    assert [type(r) for r in res] == [Location] * 4
    assert [r.id for r in res] == [files[1], "image[1]", "image[2]", files[0]]
    assert res[3].error and not res[3].ok and np.isnan(res[3].lat) and res[3].modes == ()
    # the same photo as a path, a PIL image or bytes: the same embedding, so the same answer
    ids, emb, failed = g.embed([files[1], pil, raw])
    assert not failed and np.array_equal(emb[0], emb[1])
    for r in res[:3]:
        assert r.ok and -90 <= r.lat <= 90 and -180 <= r.lon <= 180 and 0 <= r.confidence <= 1
        assert r.radius_km == 200.0 and r.method == "locdiff" and isinstance(r.place, str) and r.place
        assert 1 <= len(r.modes) <= 4 and all(isinstance(m, Mode) for m in r.modes)
    with pytest.raises(UserError, match="broken.jpg: cannot read the photo"):
        g.locate([files[0]], errors="raise")
    # locate == locate_embeddings of the same embeddings (same order, same seed)
    ids, emb, _ = g.embed(files[1:])
    assert g.locate(files[1:]) == g.locate_embeddings(emb, ids=ids)


def test_decoding_beside_or_between_batches_gives_the_same_embeddings(trained, folder):
    """An encoder leaving cores free (one torch thread) gets photos decoded ahead, one using every core
    gets them decoded between its batches: the same ids, embeddings and errors, in input order."""
    files = sorted(str(p) for p in folder.rglob("*.jpg"))  # broken.jpg among them
    g = Geolocator.load(trained["run_dir"])
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, max(2, os.cpu_count() or 1)):
            torch.set_num_threads(threads)
            results.append(g.embed(files, batch_size=2))
    finally:
        torch.set_num_threads(before)
    (ids, emb, failed), (ids2, emb2, failed2) = results
    assert ids == ids2 == files and failed == failed2 and list(failed) == [files.index(str(folder / "broken.jpg"))]
    assert emb.shape == (len(files) - 1, g.embedding_dim)
    np.testing.assert_allclose(emb, emb2, atol=1e-6)


def test_embeddings_match_an_independent_clip(trained, folder, tiny_clip):
    """The encoder path against transformers' full CLIPModel.get_image_features (L2-normalised)."""
    from transformers import CLIPImageProcessor, CLIPModel

    files = sorted(str(p) for p in folder.glob("photo-*.jpg"))
    _, emb, _ = Geolocator.load(trained["run_dir"]).embed(files)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = CLIPImageProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=proc(images=[Image.open(f).convert("RGB") for f in files],
                                                         return_tensors="pt")["pixel_values"])
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-5)


def test_exif_orientation_is_applied(trained, folder):
    """A JPEG with an EXIF orientation tag is located as the upright image (the ingest's preprocessing)."""
    from tests.data.fixtures import with_orientation

    data = open(sorted(folder.glob("photo-*.jpg"))[0], "rb").read()
    tagged = with_orientation(data, 6)  # rotate 90 degrees clockwise to display
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(tagged))).convert("RGB")
    g = Geolocator.load(trained["run_dir"])
    _, emb, _ = g.embed([tagged, upright, data])
    assert np.array_equal(emb[0], emb[1]) and not np.array_equal(emb[0], emb[2])


def test_top_k_modes_are_ordered_distinct_and_sum_to_at_most_one(trained):
    g = Geolocator.load(trained["run_dir"])
    emb = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32)
    res = g.locate_embeddings(emb / np.linalg.norm(emb, axis=1, keepdims=True), top_k=5)
    assert max(len(r.modes) for r in res) > 1  # the test means something: several modes occur
    for r in res:
        p = [m.probability for m in r.modes]
        assert 1 <= len(p) <= 5 and all(a >= b for a, b in zip(p, p[1:], strict=False)) and sum(p) <= 1 + 1e-9
        for i, a in enumerate(r.modes):
            for b in r.modes[i + 1:]:
                assert haversine_km(a.lat, a.lon, b.lat, b.lon) >= 100.0


def test_calibration_is_recorded_and_used(trained):
    """The run holds an isotonic confidence map fitted on its validation rows; predictions use it."""
    from locdiff.runs import RunFolder

    sel = RunFolder(trained["run_dir"]).read_json("selection.json")
    cal = sel["calibration"]
    assert cal["radius_km"] == 200.0 and set(cal["methods"]) == {"locdiff", "locdiff-h"}
    entry = cal["methods"]["locdiff"]
    assert entry["kind"] == "isotonic" and entry["n"] > 20 and 0 <= entry["ece_crossfit"] <= 1
    assert np.all(np.diff(entry["y"]) >= 0) and 0 <= min(entry["y"]) and max(entry["y"]) <= 1
    assert 0 <= trained["metrics"]["ece"] <= 1  # the test set's ECE, logged by the evaluation


def test_encoder_mismatch_is_a_clear_error(trained, photos, other_clip, tmp_path, capsys):
    from locdiff import pipeline

    # features of another encoder (same dimension): `locdiff predict` names both encoders
    spec = pipeline.DataSpec(name="other", source="folder", path=str(photos["test"]), encoder=str(other_clip))
    pipeline.ingest(spec, str(tmp_path))
    pipeline.embed(spec, str(tmp_path))
    feats = pipeline.features_dir(spec, str(tmp_path))
    capsys.readouterr()
    rc = main(["predict", "--run", str(trained["run_dir"]), "--data", feats, "--out", str(tmp_path / "p.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert f"{feats}: embeddings from other-clip" in err and "trained on tiny-clip" in err and "model " in err
    # the run's own features pass
    assert main(["predict", "--run", str(trained["run_dir"]), "--data", trained["features"]["test"],
                 "--out", str(tmp_path / "q.parquet"), "--no-progress"]) == 0
    # embeddings of another dimension
    g = Geolocator.load(trained["run_dir"])
    with pytest.raises(UserError, match=r"has dimension 12; .* trained on tiny-clip \(.*dim 16\) embeddings"):
        g.locate_embeddings(np.zeros((2, 12), np.float32))
    with pytest.raises(UserError, match="model /.*other-clip != /.*tiny-clip"):
        g.locate_embeddings(np.zeros((2, 16), np.float32), encoder={"name": "other-clip", "model": str(other_clip)})


def test_a_run_without_an_encoder_record_says_so(tmp_path):
    from locdiff.model.config import load_config
    from locdiff.resources import model_config_path
    from locdiff.training import train_run
    from locdiff.worlds.synth import SynthConfig, make_benchmark
    from tests.inference.conftest import OVERRIDES

    table = make_benchmark(SynthConfig(n_train=200, n_test=10, n_unseen=10, dim=16, seed=0))["train"]
    cfg = load_config(model_config_path("tiny"), OVERRIDES + ["train.steps=10"])
    train_run(cfg, table, tmp_path / "run", progress=False)
    g = Geolocator.load(tmp_path / "run")
    assert len(g.locate_embeddings(table.embedding[:3])) == 3  # embeddings work
    with pytest.raises(UserError, match="does not record its image encoder"):
        g.locate([b"whatever"])


def test_the_same_photo_three_times_gets_one_answer(trained, photos, tmp_path, capsys):
    """One `locdiff locate` call with one photo under three names (between others): one answer, the one the
    photo gets alone through the Python API (its noise comes from the seed and its own embedding)."""
    jpgs = sorted(photos["test"].glob("*.jpg"))[:4]
    folder = tmp_path / "same"
    folder.mkdir()
    for i, p in enumerate(jpgs):
        shutil.copy(p, folder / f"{i}-{p.name}")
    for name in ("a-copy.jpg", "z-copy.jpg"):
        shutil.copy(jpgs[1], folder / name)
    out = tmp_path / "same.csv"
    assert main(["locate", "--run", str(trained["run_dir"]), str(folder), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    df = pd.read_csv(out).set_index("id")
    same = df.loc[[str(folder / n) for n in ("a-copy.jpg", f"1-{jpgs[1].name}", "z-copy.jpg")]]
    alone = Geolocator.load(trained["run_dir"]).locate(str(jpgs[1]))[0]
    # the copies share an encoder batch: the same embedding, the same answer
    np.testing.assert_allclose(same["pred_lat"], same["pred_lat"].iloc[0], atol=1e-6)
    np.testing.assert_allclose(same["pred_lon"], same["pred_lon"].iloc[0], atol=1e-6)
    # alone, the encoder rounds the embedding differently (float32, ~1e-8): the noise stays (its seed reads
    # signs of projections, not bytes), so the answer moves by metres through the network, not by the ~30 km
    # that new noise gives this photo
    assert (haversine_km(same["pred_lat"], same["pred_lon"], alone.lat, alone.lon) < 0.05).all()
    assert same["place"].nunique() == 1 and same["place"].iloc[0] == alone.place


def test_the_locate_photos_stages_give_the_answers_of_the_api(trained, photos, tmp_path):
    """One photo, one answer across entry points: the stages of the `locate-photos` flow (ingest, embed,
    predict per shard) give small JPEGs (stored byte for byte) the answers and modes `Geolocator.locate`
    gives them, up to the encoder's batch rounding (metres); their features were stored in float16 once,
    which moved the answers by tens of metres and the modes by kilometres."""
    from locdiff.inference.batch import locate_photos

    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted(photos["test"].glob("*.jpg"))[:6]:
        shutil.copy(p, folder / p.name)
    for method in ("locdiff", "locdiff-h"):
        out = locate_photos(str(folder), str(trained["run_dir"]), out=str(tmp_path / method), top_k=3,
                            method=method, shard_size=4, log_to_mlflow=False)
        df = pd.read_parquet(out["table"]).set_index("id")
        files = sorted(folder.glob("*.jpg"))
        api = Geolocator.load(trained["run_dir"]).locate([str(p) for p in files], top_k=3, method=method)
        got = df.loc[[p.name for p in files]]
        np.testing.assert_allclose(got["pred_lat"], [r.lat for r in api], atol=1e-4)
        np.testing.assert_allclose(got["pred_lon"], [r.lon for r in api], atol=1e-4)
        np.testing.assert_allclose(got["confidence"], [r.confidence for r in api], atol=1e-4)
        for j in range(3):
            for key in ("lat", "lon", "probability"):
                want = [getattr(r.modes[j], key) if j < len(r.modes) else np.nan for r in api]
                np.testing.assert_allclose(got[f"mode{j + 1}_{key}"], want, atol=1e-4, err_msg=f"mode{j + 1}_{key}")


def test_a_rerun_of_the_locate_photos_stages_on_changed_photos_locates_them(trained, photos, tmp_path):
    """The stages run again on the same folder, one photo gone and another added: the table holds the new
    photos and their answers (it once kept the first run's table: the shard's name had not changed)."""
    from locdiff.inference.batch import locate_photos

    folder = tmp_path / "changing"
    folder.mkdir()
    jpgs = sorted(photos["test"].glob("*.jpg"))
    shutil.copy(jpgs[0], folder / "a.jpg")
    shutil.copy(jpgs[1], folder / "b.jpg")
    out = str(tmp_path / "out")
    first = pd.read_parquet(locate_photos(str(folder), str(trained["run_dir"]), out=out, log_to_mlflow=False)["table"])
    assert list(first["id"]) == ["a.jpg", "b.jpg"]
    (folder / "a.jpg").unlink()
    shutil.copy(jpgs[2], folder / "c.jpg")
    again = locate_photos(str(folder), str(trained["run_dir"]), out=out, log_to_mlflow=False)
    df = pd.read_parquet(again["table"])
    assert list(df["id"]) == ["b.jpg", "c.jpg"] and again["stages"]["predict"]["predicted"] == 1
    api = Geolocator.load(trained["run_dir"]).locate([str(folder / "b.jpg"), str(folder / "c.jpg")])
    np.testing.assert_allclose(df["pred_lat"], [r.lat for r in api], atol=1e-4)
    np.testing.assert_allclose(df["pred_lon"], [r.lon for r in api], atol=1e-4)


def test_an_image_of_no_pixels_is_its_own_error(trained, folder):
    """`locate([Image.new("RGB", (0, 0))])` raised ZeroDivisionError for the whole call: an image of no pixels
    is that image's error, and the other images are located as alone."""
    g = Geolocator.load(trained["run_dir"])
    good = str(sorted(folder.glob("*.jpg"))[1])
    res = g.locate([Image.new("RGB", (0, 0)), good, Image.new("RGB", (0, 7))])
    assert [r.ok for r in res] == [False, True, False]
    assert res[0].error.startswith("undecodable") and "(0, 0)" in res[0].error
    assert res[1] == g.locate(good)[0]


def test_a_file_name_that_is_not_utf8_is_written_escaped(trained, photos, tmp_path, capsys):
    """A photo named b"x\\xff.jpg" made `locate --out` fail after all the work ('utf-32-le' codec can't decode
    ...; Parquet and the map's labels as well): its id is the name with the byte escaped, in every output."""
    jpgs = sorted(photos["test"].glob("*.jpg"))[:2]
    folder = tmp_path / "nu"
    folder.mkdir()
    shutil.copy(jpgs[0], folder / "a.jpg")
    shutil.copy(jpgs[1], os.path.join(os.fsencode(folder), b"x\xff.jpg"))
    escaped = str(folder / "x\\xff.jpg")
    for out in (tmp_path / "nu.csv", tmp_path / "nu.parquet"):
        rc = main(["locate", "--run", str(trained["run_dir"]), str(folder), "--out", str(out), "--map",
                   str(tmp_path / "nu.png"), "--no-progress"])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert escaped in cap.out and f"wrote {out}" in cap.out
        df = pd.read_csv(out) if out.suffix == ".csv" else pd.read_parquet(out)
        assert list(df["id"]) == [str(folder / "a.jpg"), escaped]
    assert (tmp_path / "nu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_output_naming_a_photo_is_refused_and_nothing_is_written(trained, photos, tmp_path, capsys):
    """`locate a.png --map a.png` replaced the photo with the map (rc 0), also with the photo given through its
    folder: refused in one line, exit 2, the photo as it was."""
    folder = tmp_path / "pf"
    folder.mkdir()
    Image.open(sorted(photos["test"].glob("*.jpg"))[0]).save(folder / "a.png")
    before = (folder / "a.png").read_bytes()
    for given in (folder / "a.png", folder):
        rc = main(["locate", "--run", str(trained["run_dir"]), str(given), "--map", str(folder / "a.png"),
                   "--out", str(tmp_path / "t.csv"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err == (f"locdiff locate: error: --map {folder / 'a.png'} is the photo file: writing it "
                                   "would replace what is read; give another file\n"), err
    assert (folder / "a.png").read_bytes() == before and not (tmp_path / "t.csv").exists()


def test_outputs_are_checked_before_any_work_and_written_all_or_none(trained, folder, tmp_path, capsys,
                                                                      monkeypatch):
    """A --map under a file failed after all the work with --out already written: both outputs are checked
    first (a path under a file, a folder), one line, exit 2, nothing written; the map is drawn before --out is
    written (a map that cannot be drawn leaves no table); a good pair is written whole."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    out = tmp_path / "t.csv"
    for flag, bad, said in (("--map", "afile/m.png", f"{tmp_path / 'afile'}: is a file, not a directory"),
                            ("--map", "adir.png", "adir.png: is a directory"),
                            ("--out", "afile/sub/t.csv", f"{tmp_path / 'afile'}: is a file, not a directory")):
        argv = ["locate", "--run", str(trained["run_dir"]), str(folder), "--out", str(out),
                "--map", str(tmp_path / "m.png"), "--no-progress"]
        argv[argv.index(flag) + 1] = str(tmp_path / bad)
        assert main(argv) == 2
        cap = capsys.readouterr()
        assert said in cap.err and cap.err.count("\n") == 1 and cap.out == "", cap  # no photo was located
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "afile"]
    import locdiff.cli.locate as cli_locate

    def no_map(*args, **kwargs):
        raise UserError("the map cannot be drawn")

    with monkeypatch.context() as m:
        m.setattr(cli_locate, "locations_map", no_map)
        assert main(["locate", "--run", str(trained["run_dir"]), str(folder), "--out", str(out), "--map",
                     str(tmp_path / "m.png"), "--no-progress"]) == 2
    assert "the map cannot be drawn" in capsys.readouterr().err and not out.exists()
    assert main(["locate", "--run", str(trained["run_dir"]), str(folder), "--out", str(tmp_path / "new" / "t.csv"),
                 "--map", str(tmp_path / "new" / "m.png"), "--no-progress"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["m.png", "t.csv"]
