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

    python -m benchmarks.bench_locate [--quick]
"""

from __future__ import annotations

import argparse
import logging
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
    from locdiff.model.method import LocDiffMethod
    from locdiff.plots import reliability_plot
    from locdiff.resources import model_config_path
    from locdiff.runs import RunFolder
    from locdiff.synth import SynthConfig, make_benchmark
    from locdiff.training import train_run

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
    from locdiff.synth_photos import tiny_clip, write_photos
    from locdiff.tables import EmbeddingTable

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and short training (a smoke run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-locate-") as tmp:
        out = Path(tmp)
        cal, method, data = calibration(args.quick, out)
        print_table(cal["rows"], f"calibration of the confidence (P within {cal['radius_km']:g} km), tiny config, "
                                 f"{cal['n_train']} training rows, map fitted on {cal['n_val']} validation rows")
        print_table([{"method": k, **v} for k, v in cal["validation"].items()],
                    "on the validation rows (ece_crossfit: 2-fold, fitted on the other half)")
        thr = throughput(args.quick, out, method, data)
        print_table(thr["rows"], f"throughput on {torch.get_num_threads()} torch threads")
    save("locate", {"quick": args.quick, "calibration": cal, "throughput": thr})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
