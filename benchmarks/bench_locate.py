"""`locdiff locate` on this machine (`make bench` / `python -m benchmarks.bench_locate`): the calibration of
its confidence and its throughput. It trains its own small runs.

1. Calibration: LocDiff (configs/model/tiny.yaml) on the synthetic benchmark (20,000 training rows, a
   1,000-row validation split the confidence map is fitted on); on `test` and `test_unseen` (held-out
   regions), per prediction method: accuracy within the confidence radius, mean confidence, the expected
   calibration error (10 bins) of the calibrated confidence, of the raw score it is fitted from (the
   predicted density's mass within the radius) and of a constant (the validation base rate), and the Brier
   score of each; reliability plots in benchmarks/results/.
2. Throughput (images/s): `Geolocator.locate_embeddings` (embedding excluded) against the bare
   `LocDiffMethod.predict` on the same embeddings (the reference: what modes, calibration and place names
   add), and `Geolocator.locate` on JPEG files through the run's image encoder (embedding included). The
   encoder here is the tiny random CLIP of the demo (a 2-layer, 32-wide ViT on 32x32 pixels): with a real
   CLIP ViT-L/14 the encoder dominates; its cost is measured by bench_data.
3. A folder (issue 20): `locate` on 1,000 JPEGs of 1600x1200 through a random CLIP ViT-B/32 tower (built
   from its config, no download) against the embedding step alone (the encoder on ready pixel batches)
   and against decoding each batch before embedding it; locate decodes on threads, ahead of the encoder
   when it leaves cores free (a GPU), else between batches on all cores, so it should reach at least 0.8x
   of the embedding step alone where the cores are not all busy. The three run in turn on each chunk of
   two batches, so that a shared machine's changing load weighs on them alike (the JSON records the load
   average before and after).

    python -m benchmarks.bench_locate [--quick] [--folder-only [--photos 1000] [--encoder vit-b32|vit-s32]]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS, print_table, save

log = logging.getLogger("bench_locate")


def _calibration_rows(method: Any, data: dict[str, Any], split: str, name: str, base_rate: float
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    from locdiff.calibration import reliability
    from locdiff.geo import haversine_km
    from locdiff.shdd.modes import mass_within

    t = data[split]
    p = method.predict(t, method=name)
    radius = method.confidence_radius_km
    hit = (np.asarray(haversine_km(p.lat, p.lon, t.lat, t.lon)) <= radius).astype(float)
    raw = mass_within(p.density_code, p.lat, p.lon, radius)
    const = np.full(len(hit), base_rate)
    rel = reliability(p.confidence, hit)
    brier = lambda c: float(np.mean((c - hit) ** 2))  # noqa: E731
    row = {"split": split, "method": name, "n": len(hit), f"acc_{radius:g}km": float(hit.mean()),
           "mean_conf": float(p.confidence.mean()), "ECE": rel["ece"], "ECE_raw": reliability(raw, hit)["ece"],
           "ECE_const": reliability(const, hit)["ece"], "Brier": brier(p.confidence), "Brier_raw": brier(raw),
           "Brier_const": brier(const)}
    return row, rel


def calibration(quick: bool, out: Path) -> dict[str, Any]:
    from locdiff.model.config import load_config
    from locdiff.model.locdiff_method import LocDiffMethod
    from locdiff.plots import reliability_plot
    from locdiff.resources import model_config_path
    from locdiff.runs import RunFolder
    from locdiff.training import train_run
    from locdiff.worlds.synth import SynthConfig, make_benchmark

    n_train, n_val, n_test = (4000, 400, 500) if quick else (20_000, 1000, 2000)
    data = make_benchmark(SynthConfig(n_train=n_train, n_val=n_val, n_test=n_test, n_unseen=n_test // 2, seed=0))
    overrides = [f"train.val_samples={n_val}"] + (["train.steps=200"] if quick else [])
    cfg = load_config(model_config_path("tiny"), overrides)
    t0 = time.perf_counter()
    train_run(cfg, data["train"], out / "synth-run", val=data["val"], progress=False)
    train_s = time.perf_counter() - t0
    method = LocDiffMethod.load(out / "synth-run", cfg)
    cal = RunFolder(out / "synth-run").read_json("selection.json")["calibration"]
    rows = []
    for name in ("locdiff", "locdiff-h"):
        base = cal["methods"][name]["base_rate"]
        for split in ("test", "test_unseen"):
            row, rel = _calibration_rows(method, data, split, name, base)
            rows.append(row)
            reliability_plot(RESULTS / f"locate_reliability_{name}_{split}.png", rel,
                             title=f"{name} on synthetic {split}: within {cal['radius_km']:g} km")
    val = {name: {k: v for k, v in e.items() if k not in ("x", "y", "kind")} for name, e in cal["methods"].items()}
    return {"rows": rows, "validation": val, "radius_km": cal["radius_km"], "train_s": train_s,
            "config": "tiny", "n_train": n_train, "n_val": n_val, "n_test": n_test}, method, data


def _rate(fn, n: int, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def throughput(quick: bool, out: Path, synth_method: Any, synth_data: dict[str, Any]) -> dict[str, Any]:
    from locdiff import Geolocator, pipeline
    from locdiff.tables import EmbeddingTable
    from locdiff.worlds.synth_photos import tiny_clip, write_photos

    rows = []
    # (a) the synthetic-benchmark run (tiny config, L = 16, 128-d embeddings): embeddings given
    g = Geolocator(out / "synth-run")
    n = 256 if quick else 1024
    t = synth_data["test"]
    emb = t.embedding[:n]
    table = EmbeddingTable(t.ids[:n], None, None, emb, "bench")
    ref = _rate(lambda: synth_method.predict(table), n)
    rows.append({"run": "synth (tiny, L=16, d=128)", "what": "LocDiffMethod.predict (reference)", "top_k": "",
                 "images_per_s": ref, "ratio": 1.0})
    for k in (1, 5):
        r = _rate(lambda k=k: g.locate_embeddings(emb, top_k=k), n)
        rows.append({"run": "synth (tiny, L=16, d=128)", "what": "locate_embeddings (embedding excluded)",
                     "top_k": k, "images_per_s": r, "ratio": r / ref})
    # (b) a run on photos through the tiny CLIP: embedding included
    photos = write_photos(out / "photos", 600 if quick else 1500, seed=1)
    new = write_photos(out / "new", 128 if quick else 512, seed=2, metadata=False)
    clip = tiny_clip(out / "tiny-clip")
    spec = pipeline.DataSpec(name="photos", source="folder", path=str(photos), encoder=str(clip))
    pipeline.ingest(spec, str(out / "root"))
    pipeline.embed(spec, str(out / "root"))
    from locdiff.model.config import load_config
    from locdiff.resources import model_config_path
    from locdiff.training import train_run

    cfg = load_config(model_config_path("tiny"), ["train.steps=100", "train.val_share=0.1"])
    train_run(cfg, pipeline.features_dir(spec, str(out / "root")), out / "photo-run", progress=False)
    g = Geolocator(out / "photo-run")
    files = sorted(str(p) for p in new.glob("*.jpg"))
    _, pemb, _ = g.embed(files[:8])  # warm the encoder
    _, pemb, _ = g.embed(files)
    ptable = EmbeddingTable(np.array(files, dtype=object), None, None, pemb, "bench")
    ref = _rate(lambda: g.method.predict(ptable), len(files))
    rows.append({"run": "photos (tiny, L=16, tiny CLIP)", "what": "LocDiffMethod.predict (reference)", "top_k": "",
                 "images_per_s": ref, "ratio": 1.0})
    r = _rate(lambda: g.locate_embeddings(pemb, top_k=5), len(files))
    rows.append({"run": "photos (tiny, L=16, tiny CLIP)", "what": "locate_embeddings (embedding excluded)",
                 "top_k": 5, "images_per_s": r, "ratio": r / ref})
    e = _rate(lambda: g.embed(files), len(files))
    rows.append({"run": "photos (tiny, L=16, tiny CLIP)", "what": "embed only (read, EXIF, resize, CLIP)",
                 "top_k": "", "images_per_s": e, "ratio": e / ref})
    r = _rate(lambda: g.locate(files, top_k=5), len(files))
    rows.append({"run": "photos (tiny, L=16, tiny CLIP)", "what": "locate (JPEG files, embedding included)",
                 "top_k": 5, "images_per_s": r, "ratio": r / ref})
    return {"rows": rows, "n_photos": len(files)}


ENCODERS = {  # random CLIP vision towers built from a config (no download), by compute
    "vit-b32": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "image_size": 224, "patch_size": 32, "projection_dim": 512},
    "vit-s32": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6,
                "image_size": 224, "patch_size": 32, "projection_dim": 256},
}


def random_clip(path: Path, size: str) -> Path:
    """A randomly initialised CLIP vision tower of `size` (ENCODERS) with a 224-pixel CLIP processor."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODERS[size])).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def write_camera_photos(out: Path, n: int, size: tuple[int, int] = (1600, 1200)) -> list[str]:
    """n JPEGs of `size` (a synthetic photo scaled up, quality 90, ~ a phone photo's decode work)."""
    import io

    from PIL import Image

    from locdiff.worlds.synth_photos import photo, sample_places

    out.mkdir(parents=True, exist_ok=True)
    lat, lon = sample_places(n, 3)
    files = []
    for i in range(n):
        im = Image.open(io.BytesIO(photo(float(lat[i]), float(lon[i]), i, size=(160, 120)))).resize(size)
        files.append(str(out / f"cam-{i:05d}.jpg"))
        im.save(files[-1], format="JPEG", quality=90)
    return files


def folder_throughput(n: int, encoder: str, out: Path) -> dict[str, Any]:
    """`locate` on a folder of n camera-sized JPEGs against the embedding step alone (the encoder's forward
    pass on ready pixel batches) and against reading the photos one batch after another before embedding
    them (what locate did before photos were decoded on threads ahead of the encoder)."""
    from locdiff import Geolocator
    from locdiff.data.images import load_rgb
    from locdiff.inference import geolocator as geo_mod
    from locdiff.model.config import load_config
    from locdiff.resources import model_config_path
    from locdiff.training import train_run
    from locdiff.worlds.synth import SynthConfig, make_benchmark

    clip = random_clip(out / f"clip-{encoder}", encoder)
    dim = ENCODERS[encoder]["projection_dim"]
    data = make_benchmark(SynthConfig(n_train=2000, n_test=10, n_unseen=10, dim=dim, seed=0))
    cfg = load_config(model_config_path("tiny"), ["train.steps=30", "train.val_share=0.1"])
    train_run(cfg, data["train"], out / f"run-{encoder}", encoder=str(clip), progress=False)
    g = Geolocator(out / f"run-{encoder}")
    files = write_camera_photos(out / "camera", n)
    enc = g.encoder()
    bs = g.encoder_config().batch_size
    g.locate(files[:bs])  # warm-up: weights, gazetteer, allocator
    side = geo_mod._max_side()
    load_before = os.getloadavg()
    # the three steps in turn on each chunk of 2 batches, so that the other jobs' load (which comes and
    # goes within minutes) weighs on the three alike; each step's rate over all n photos
    seconds = {"embed": 0.0, "sequential": 0.0, "locate": 0.0}
    for s in range(0, n, 2 * bs):
        part = files[s:s + 2 * bs]
        ready = [enc.preprocess([load_rgb(f, max_side=side) for f in part[i:i + bs]]) for i in range(0, len(part), bs)]
        t = time.perf_counter()
        for x in ready:  # the embedding step alone, on ready pixel batches
            enc.embed(x)
        seconds["embed"] += time.perf_counter() - t
        t = time.perf_counter()
        for i in range(0, len(part), bs):  # read, decode, preprocess, then embed: one batch after another
            enc.embed(enc.preprocess([load_rgb(f, max_side=side) for f in part[i:i + bs]]))
        seconds["sequential"] += time.perf_counter() - t
        t = time.perf_counter()
        g.locate(part, top_k=5)
        seconds["locate"] += time.perf_counter() - t
    embed_only, seq, loc = (n / seconds[k] for k in ("embed", "sequential", "locate"))
    free = enc.cpu_threads() < (os.cpu_count() or 1)  # locate decodes ahead only beside an encoder leaving cores free
    mode = "ahead of the encoder" if free else "between batches"
    rows = [{"encoder": encoder, "step": "embedding alone (ready pixels)", "photos_per_s": embed_only, "ratio": 1.0},
            {"encoder": encoder, "step": "decode then embed, batch after batch", "photos_per_s": seq,
             "ratio": seq / embed_only},
            {"encoder": encoder, "step": f"locate (decode on {geo_mod.DECODE_THREADS} threads, {mode})",
             "photos_per_s": loc, "ratio": loc / embed_only}]
    return {"rows": rows, "n_photos": n, "photo_size": [1600, 1200], "decode_threads": geo_mod.DECODE_THREADS,
            "decode": mode, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": {"before": load_before, "after": os.getloadavg()}, "seconds": seconds,
            "encoder": {"name": encoder, **ENCODERS[encoder]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and short training (a smoke run)")
    parser.add_argument("--folder-only", action="store_true",
                        help="only `locate` on a folder of JPEGs against the embedding step alone")
    parser.add_argument("--photos", type=int, default=1000, help="JPEGs of the folder benchmark")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="vit-b32",
                        help="the random CLIP tower of the folder benchmark")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    n_photos = min(args.photos, 200) if args.quick else args.photos
    if args.folder_only:
        with tempfile.TemporaryDirectory(prefix="bench-locate-") as tmp:
            folder = folder_throughput(n_photos, args.encoder, Path(tmp))
        print_table(folder["rows"], f"locate on {folder['n_photos']} JPEGs of 1600x1200 on {torch.get_num_threads()} "
                                    "torch threads")
        save("locate_folder", {"quick": args.quick, "folder": folder})
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-locate-") as tmp:
        out = Path(tmp)
        folder = folder_throughput(n_photos, args.encoder, out)
        print_table(folder["rows"], f"locate on {folder['n_photos']} JPEGs of 1600x1200 on {torch.get_num_threads()} "
                                    "torch threads")
        cal, method, data = calibration(args.quick, out)
        print_table(cal["rows"], f"calibration of the confidence (P within {cal['radius_km']:g} km), tiny config, "
                                 f"{cal['n_train']} training rows, map fitted on {cal['n_val']} validation rows")
        print_table([{"method": k, **v} for k, v in cal["validation"].items()],
                    "on the validation rows (ece_crossfit: 2-fold, fitted on the other half)")
        thr = throughput(args.quick, out, method, data)
        print_table(thr["rows"], f"throughput on {torch.get_num_threads()} torch threads")
    save("locate", {"quick": args.quick, "calibration": cal, "throughput": thr, "folder": folder})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
