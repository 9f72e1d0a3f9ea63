"""The embedding stage on a tiny randomly initialised CLIP (built from a config, saved with
save_pretrained, loaded back through from_pretrained: no download), SHDD targets, export and inspect."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from locdiff.cli import main
from locdiff.data.config import load_dataset_config
from locdiff.data.features import load_features
from locdiff.data.featurize import embed
from locdiff.data.ingest import ingest
from locdiff.data.manifest import read_manifest
from locdiff.data.shards import stage_dir
from locdiff.data.validation import ChecksumError
from locdiff.worlds import synth_photos

from .fixtures import read_samples

PROJ = synth_photos.TINY_CLIP_DIM


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return synth_photos.tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="module")
def ingested(sources, tmp_path_factory):
    url, exp = sources["folder"]["http"]
    root = tmp_path_factory.mktemp("embed")
    cfg = load_dataset_config("folder", shard_size=4, max_side=128, allow_private_addresses=True)
    ingest("folder", str(root), source=f"{url}/folder.tar", config=cfg, progress=False)
    return root, exp


def reference_embeddings(model_dir, jpegs: list[bytes]) -> np.ndarray:
    """Independent of the encoder class: the full CLIPModel's get_image_features, L2-normalised."""
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def test_embed_writes_features_matching_the_manifest(tiny_clip, ingested, capsys):
    root, exp = ingested
    rc = main(["data", "embed", "folder", "--root", str(root), "--encoder", str(tiny_clip), "--degree", "3"])
    assert rc == 0, capsys.readouterr().err
    folder = stage_dir(str(root), "folder", "features", "tiny-clip")
    m = read_manifest(folder)
    assert m["embedding"] == {"dim": PROJ, "dtype": "float16", "shape": [PROJ]}
    assert m["shdd"] == {"degree": 3, "dim": 16, "dtype": "float32", "shape": [16]}
    assert m["count"] == len(exp.good) and m["encoder"]["model"] == str(tiny_clip)
    samples = read_samples([f"{folder}/{s['shard']}" for s in m["shards"]])
    assert len(samples) == m["count"]
    for s in samples:
        assert s["emb"].dtype == np.dtype(m["embedding"]["dtype"])
        assert list(s["emb"].shape) == m["embedding"]["shape"]
        assert s["shdd"].dtype == np.dtype(m["shdd"]["dtype"]) and list(s["shdd"].shape) == m["shdd"]["shape"]

    table, shdd = load_features(str(root), "folder", "tiny-clip", with_shdd=True)
    assert table.embedding.shape == (len(exp.good), PROJ) and table.embedding.dtype == np.float32
    assert list(table.ids) == [s["json"]["id"] for s in samples]
    np.testing.assert_array_equal(table.embedding, np.stack([s["emb"] for s in samples]).astype(np.float32))
    np.testing.assert_array_equal(shdd, np.stack([s["shdd"] for s in samples]))
    assert [(la, lo) for la, lo in zip(table.lat, table.lon, strict=True)] == \
        [exp.good[i][:2] for i in table.ids]

    # the stored embeddings are CLIP's, computed independently from the stored images
    images = read_samples([f"{stage_dir(str(root), 'folder', 'images')}/{s['shard']}"
                           for s in read_manifest(stage_dir(str(root), "folder", "images"))["shards"]])
    ref = reference_embeddings(tiny_clip, [s["jpg"] for s in images])
    np.testing.assert_allclose(table.embedding, ref, atol=2e-3)
    # SHDD targets: the real-SH values at the stored coordinates; |shdd|^2 = D / (4 pi) for every point
    from locdiff.shdd import encode

    np.testing.assert_allclose(shdd, encode(torch.tensor(table.lat), torch.tensor(table.lon), 3).numpy(),
                               atol=1e-6)
    np.testing.assert_allclose((shdd.astype(np.float64) ** 2).sum(1), 16 / (4 * np.pi), rtol=1e-5)

    # a second run is a no-op
    before = {s["shard"]: s["sha256"] for s in m["shards"]}
    again = embed("folder", str(root), str(tiny_clip), degree=3, progress=False)
    assert {s["shard"]: s["sha256"] for s in again["shards"]} == before


def test_export_is_an_embeddings_table(tiny_clip, ingested, tmp_path, capsys):
    root, exp = ingested
    embed("folder", str(root), str(tiny_clip), progress=False)
    out = tmp_path / "x.parquet"
    rc = main(["data", "export", "folder", "--root", str(root), "--encoder", str(tiny_clip),
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    from locdiff.io import read_embeddings

    table = read_embeddings(out)
    ref = load_features(str(root), "folder", "tiny-clip")
    assert list(table.ids) == list(ref.ids) and set(table.ids) == set(exp.good)
    assert table.lat.dtype == np.float64 and table.embedding.dtype == np.float32
    np.testing.assert_array_equal(table.lat, ref.lat)
    np.testing.assert_array_equal(table.embedding, ref.embedding)


def test_inspect_prints_counts_and_draws_a_map(tiny_clip, ingested, capsys):
    root, exp = ingested
    rc = main(["data", "inspect", str(root / "folder")])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"images: {len(exp.good)} samples in 3 shards" in out
    assert "skipped: none" in out and '"id": "img0000"' in out
    png = (root / "folder" / "locations.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_damaged_image_shard_is_a_checksum_error(tiny_clip, ingested, tmp_path):
    import shutil

    root, _ = ingested
    copy = tmp_path / "copy"
    shutil.copytree(root / "folder", copy / "folder")
    shard = copy / "folder" / "images" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"shard-000001\.tar: sha256 .* differs from the images manifest"):
        embed("folder", str(copy), str(tiny_clip), degree=2, progress=False)


def test_features_manifest_is_valid_json_with_encoder_revision(tiny_clip, ingested):
    root, _ = ingested
    m = json.loads((root / "folder" / "features" / "tiny-clip" / "manifest.json").read_text())
    assert {"name", "model", "revision"} <= set(m["encoder"]) and "software" in m


def test_embed_and_export_on_s3(tiny_clip, sources, tmp_path):
    url, exp = sources["folder"]["s3"]
    root = "s3://data/embed-s3"
    cfg = load_dataset_config("folder", shard_size=4, max_side=128)
    ingest("folder", root, source=f"{url}/folder.tar", config=cfg, progress=False)
    m = embed("folder", root, str(tiny_clip), degree=2, progress=False)
    assert m["count"] == len(exp.good) and m["shdd"]["dim"] == 9
    table, shdd = load_features((root, "folder", "tiny-clip"), with_shdd=True)
    assert table.embedding.shape == (len(exp.good), PROJ) and shdd.shape == (len(exp.good), 9)
    from locdiff.data.features import export_features
    from locdiff.io import read_embeddings

    export_features(root, "folder", "tiny-clip", f"{root}/export.parquet")
    back = read_embeddings(f"{root}/export.parquet")
    assert list(back.ids) == list(table.ids)
    np.testing.assert_array_equal(back.embedding, table.embedding)


def test_exif_orientation_reaches_the_encoder(tiny_clip, tmp_path):
    """A JPEG tagged Orientation=6 is stored byte for byte and embedded upright: the same embedding as
    CLIP on the upright pixels (NumPy's rot90 of the decoded ones), not the one of the stored pixels."""
    from .fixtures import jpeg, with_orientation, write_csv

    raw = jpeg(21, size=(96, 72))
    src = tmp_path / "src"
    src.mkdir()
    (src / "tagged.jpg").write_bytes(with_orientation(raw, 6))
    (src / "untagged.jpg").write_bytes(raw)
    write_csv(src / "metadata.csv", [{"id": "tagged.jpg", "lat": "1", "lon": "2"},
                                     {"id": "untagged.jpg", "lat": "1", "lon": "2"}])
    root = str(tmp_path / "root")
    m = ingest("folder", root, source=str(src), config=load_dataset_config("folder", max_side=128),
               progress=False)
    assert m["count"] == 2
    embed("folder", root, str(tiny_clip), progress=False)
    table = load_features(root, "folder", "tiny-clip")
    emb = dict(zip(table.ids, table.embedding, strict=True))

    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = CLIPImageProcessor.from_pretrained(tiny_clip)
    stored = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=proc(images=[Image.fromarray(np.rot90(stored, k=-1)),
                                                                 Image.fromarray(stored)],
                                                         return_tensors="pt")["pixel_values"])
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(emb["tagged.jpg"], ref[0], atol=2e-3)
    np.testing.assert_allclose(emb["untagged.jpg"], ref[1], atol=2e-3)
    assert np.abs(ref[0] - ref[1]).max() > 2e-2  # orientation matters to this encoder


def test_auto_runner_picks_ray_only_where_it_has_more_than_this_process(monkeypatch):
    import importlib.util
    import os

    from locdiff.data.featurize import LOCAL_THREADS, RAY_MIN_IMAGES, choose_runner

    small = [{"count": 4}] * 3
    big = [{"count": RAY_MIN_IMAGES // 2 + 1}] * 2
    has_ray = importlib.util.find_spec("ray") is not None
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    if not torch.cuda.device_count() > 1:
        assert choose_runner("auto", big) == "local"  # 2 cores: this process's threads are as fast
    monkeypatch.setattr(os, "cpu_count", lambda: 4 * LOCAL_THREADS)
    assert choose_runner("auto", big) == ("ray" if has_ray else "local")
    assert choose_runner("auto", small) == "local"
    assert choose_runner("auto", [{"count": 10 * RAY_MIN_IMAGES}]) == "local"  # one shard: nothing to spread
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster
    assert choose_runner("auto", big) == ("ray" if has_ray else "local")
    assert choose_runner("auto", small) == "local"
    assert choose_runner("local", big) == "local" and choose_runner("ray", small) == "ray"
    with pytest.raises(ValueError, match="--runner must be one of auto, local, ray, got 'spark'"):
        choose_runner("spark", small)


@pytest.mark.parametrize("config", [
    None,  # the tiny CLIP's saved config (shortest edge 32, crop 32x32, bicubic)
    {"crop_size": 224, "size": 224, "resample": 3, "do_center_crop": True, "do_normalize": True,
     "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
     "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
    {"size": {"shortest_edge": 100}, "crop_size": {"height": 90, "width": 64}, "resample": 2,
     "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "image_processor_type": "CLIPImageProcessor"},
])
def test_clip_pixels_equal_transformers_pil_processor(tiny_clip, tmp_path, config):
    """ClipPreprocessor (PIL + numpy, no transformers) gives CLIPImageProcessor's PIL-backend pixels
    value for value: landscape, portrait, odd sizes, smaller than the crop, one image or several."""
    try:
        from transformers import CLIPImageProcessorPil as Reference
    except ImportError:
        from transformers import CLIPImageProcessor as Reference

    from locdiff.data.config import EncoderConfig
    from locdiff.embed import make_preprocessor

    model = tiny_clip
    if config is not None:
        model = tmp_path / "proc"
        model.mkdir()
        (model / "preprocessor_config.json").write_text(json.dumps(config))
    ours = make_preprocessor(EncoderConfig(name="x", model=str(model)))
    assert ours.pixels is not None  # the PIL + numpy path, not the fallback
    rng = np.random.default_rng(0)
    sizes = [(512, 384), (384, 512), (301, 299), (224, 224), (225, 1000), (1000, 225), (33, 77), (641, 480)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    images.append(Image.open(io.BytesIO(_jpeg(rng))).convert("RGB"))
    ref = Reference.from_pretrained(str(model))
    for batch in (images, images[6:7]):
        want = ref(images=batch, return_tensors="np")["pixel_values"]
        got = ours(batch)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def _jpeg(rng) -> bytes:
    """A smooth photo-like JPEG (a gradient with noise)."""
    y, x = np.mgrid[0:300, 0:420]
    img = np.stack([x % 256, y % 256, (x + y) % 256], -1) + rng.integers(0, 20, (300, 420, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_flows_expose_the_embed_runner():
    pytest.importorskip("prefect")
    from flows.embed import embed as embed_flow
    from flows.pipeline import train_locdiff

    for flow, name in ((embed_flow, "runner"), (train_locdiff, "embed_runner")):
        param = flow.parameters.properties[name]
        assert param["enum"] == ["auto", "local", "ray"] and param["default"] == "auto"


def test_an_encoder_that_cannot_load_is_one_line_naming_it_and_leaves_no_folder(tiny_clip, ingested, tmp_path,
                                                                                 capsys):
    """A model folder without its weights (as an unreachable Hub leaves one): one line naming the encoder and
    the model, exit 2, and no empty features folder left behind for the re-run."""
    import shutil

    root, _ = ingested
    broken = tmp_path / "broken-clip"
    shutil.copytree(tiny_clip, broken)
    (broken / "model.safetensors").unlink()
    rc = main(["data", "embed", "folder", "--root", str(root), "--encoder", str(broken), "--runner", "local"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("locdiff data embed: error: encoder 'broken-clip': cannot load ") and str(broken) in err
    features = root / "folder" / "features"
    assert not (features / "broken-clip").exists()
    assert not features.exists() or any(features.iterdir())  # nor an empty features/ of this run's making


def test_an_encoder_config_stating_another_width_is_one_line(tiny_clip, ingested, tmp_path, capsys):
    """An encoder config whose `dim` is not what its model makes (a model swapped under the config): refused
    when the model loads, before any feature is written."""
    root, _ = ingested
    cfg = tmp_path / "wrong-dim.yaml"
    cfg.write_text(f"name: wrong-dim\nmodel: {tiny_clip}\ndim: {PROJ + 1}\n")
    rc = main(["data", "embed", "folder", "--root", str(root), "--encoder", str(cfg), "--runner", "local"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err == (f"locdiff data embed: error: encoder 'wrong-dim': the config says dim {PROJ + 1}, and {tiny_clip} "
                   f"makes {PROJ}-d embeddings; correct the config's dim")
    assert not (root / "folder" / "features" / "wrong-dim").exists()


def test_loading_the_encoder_draws_no_progress_bar(tiny_clip, capsys):
    """transformers' "Loading weights" bar is not on stderr (the encoder's log line says what loaded)."""
    from transformers.utils import logging as hf_logging

    from locdiff.data.config import EncoderConfig
    from locdiff.embed import ClipEncoder

    hf_logging.enable_progress_bar()
    capsys.readouterr()
    ClipEncoder(EncoderConfig(name="clip", model=str(tiny_clip), device="cpu"))
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back
