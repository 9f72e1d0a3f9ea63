"""Does diffusion earn its place? K samples x S steps against one sample, one step (issue 9, item 4).

For a trained LocDiff run and a labelled table (a validation split: never choose on a test split), it
predicts with each (K, S) of a sweep and reports accuracy and speed; then it splits the images by how much
K = 16 samples disagree (the share of samples within the support radius of the mean answer: low = several
distinct modes, an ambiguous image) and compares one sample with 16 in each group, as a table and a
figure (benchmarks/results/sampling_<name>.png). Where several samples help, it is on the low-agreement
groups; if no group gains, one step is as good and the cheap setting should be the default.

What sampling is for (issue 19, item 4; benchmarks/posterior.py says how each figure is made):
- the two-place probe: `--probe-n` photos of the benchmark the table belongs to (its folder's
  cuebench.json, realbench.json or synth.json; `--benchmark-dir`), each made to look like two places at
  least 3,000 km apart; the share whose top-2 answers name both places (each within `--radius` km) for the
  one-step mean code's modes, the modes of the mean of the K sampled codes, the K samples' two largest
  clusters, and retrieval's two best distinct places over the run's gallery;
- calibration: ECE and the NLL of the truth of the samples' confidence against the mean code's;
- accuracy at 1 and 25 km of LocDiff alone (no gallery), next to top-1 retrieval over the run's gallery.

    python -m benchmarks.bench_sampling --run RUN --data VAL.parquet [--name realbench] [--n 1000]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks import posterior
from benchmarks.common import RESULTS, print_table, save
from locdiff.gallery import Gallery
from locdiff.io import read_embeddings
from locdiff.metrics import distances_km, geo_metrics
from locdiff.model.locdiff_method import LocDiffMethod
from locdiff.model.predict import locdiff_predict
from locdiff.runs import RunFolder

SWEEP = ((1, 1), (1, 10), (4, 10), (16, 1), (16, 20))
KEYS = ("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained LocDiff run folder")
    ap.add_argument("--data", required=True, help="a labelled embeddings table (a validation split)")
    ap.add_argument("--name", default="val", help="label of the results (sampling_<name>.json/.png)")
    ap.add_argument("--n", type=int, default=1000, help="rows used")
    ap.add_argument("--benchmark-dir", help="the benchmark folder the table was written into, for the "
                                            "two-place probe (default: the folder of --data)")
    ap.add_argument("--probe-n", type=int, default=500, help="two-place probe photos (0: no probe)")
    ap.add_argument("--radius", type=float, default=posterior.NAME_RADIUS_KM,
                    help="a top-2 answer names a place within this many km (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the samples and of the probe photos")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    run = RunFolder(args.run)
    _, meta = run.load_model()  # the predictor's own description carries its resolved config
    method = LocDiffMethod.load(Path(args.run), meta["config"])
    table = read_embeddings(args.data)
    n = min(args.n, len(table))
    emb, lat, lon = np.asarray(table.embedding[:n]), np.asarray(table.lat[:n]), np.asarray(table.lon[:n])

    rows, errors, agreement = [], {}, None
    for k, s in SWEEP:
        t0 = time.perf_counter()
        out = locdiff_predict(method.model, emb, method.config, samples=k, steps=s, seed=args.seed)
        secs = time.perf_counter() - t0
        for agg in ("mean", "support") if k > 1 else ("mean",):
            p_lat, p_lon, _ = out.choose(agg)
            m = geo_metrics(p_lat, p_lon, lat, lon)
            rows.append({"K": k, "S": s, "aggregation": agg, "images_per_s": n / secs, **{c: m[c] for c in KEYS}})
            errors[(k, s, agg)] = np.asarray(distances_km(p_lat, p_lon, lat, lon))
        if (k, s) == (16, 20):
            agreement = np.asarray(out.mean_conf)
    print_table(rows, title=f"{args.name}: accuracy (%) and speed by samples K and steps S ({n} images)")

    # by how much the 16 samples agree (share of samples near the mean answer): all agree, or the images
    # where some disagree, split at their median (ties at 1.0 are common: quantiles alone would be empty)
    some = agreement < 1.0
    cut = float(np.median(agreement[some])) if some.any() else 0.0
    groups = {"most ambiguous": some & (agreement <= cut), "some disagree": some & (agreement > cut),
              "all 16 agree": ~some}
    by_q = []
    for label, sel in groups.items():
        entry = {"group": label, "images": int(sel.sum()),
                 "agreement": f"{agreement[sel].min():.2f}-{agreement[sel].max():.2f}" if sel.any() else "-"}
        for key in ((1, 1, "mean"), (16, 20, "mean"), (16, 20, "support")):
            hit = float((errors[key][sel] <= 200).mean() * 100) if sel.any() else None
            entry[f"K={key[0]} S={key[1]} {key[2]} @200km"] = hit
        by_q.append(entry)
    print_table(by_q, title=f"{args.name}: accuracy within 200 km by how much 16 samples agree")
    extra = what_sampling_adds(args, method, emb, lat, lon, rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{e['group']}\n{e['images']} images, {e['agreement']}" for e in by_q]
    series = [c for c in by_q[0] if c.endswith("@200km")]
    width = 0.8 / len(series)
    for i, c in enumerate(series):
        ax.bar(np.arange(len(by_q)) + (i - (len(series) - 1) / 2) * width, [e[c] or 0 for e in by_q], width, label=c)
    ax.set_xticks(np.arange(len(by_q)), labels)
    ax.set_xlabel("share of the 16 samples near the mean answer")
    ax.set_ylabel("% within 200 km")
    ax.set_title(f"{args.name}: do several samples help ambiguous images?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"sampling_{args.name}.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")
    save(f"sampling_{args.name}", {"run": args.run, "data": args.data, "n": n, "sweep": rows, "by_agreement": by_q,
                                   **extra})


def what_sampling_adds(args: argparse.Namespace, method: LocDiffMethod, emb: np.ndarray, lat: np.ndarray,
                       lon: np.ndarray, sweep: list[dict]) -> dict:
    """The two-place probe, the calibration and the accuracy without the gallery (module docstring)."""
    gallery = Gallery.load(method.gallery_ref, nprobe=method.config.gallery.nprobe) if method.gallery_ref else None
    out: dict = {"radius_km": args.radius, "probe_min_km": posterior.PROBE_MIN_KM}
    no_gallery = [{"method": f"LocDiff K={r['K']} S={r['S']} {r['aggregation']}", **{c: r[c] for c in KEYS}}
                  for r in sweep]
    if gallery is not None:
        _, idx = gallery.search(emb, 1)
        m = geo_metrics(gallery.lat[idx[:, 0]], gallery.lon[idx[:, 0]], lat, lon)
        no_gallery.append({"method": "retrieval top-1 (the run's gallery)", **{c: m[c] for c in KEYS}})
    print_table(no_gallery, title=f"{args.name}: LocDiff alone (no gallery) at 1 and 25 km, and retrieval")
    out["without_gallery"] = no_gallery
    cal = posterior.run_calibration(method.model, method.config, emb, lat, lon, seed=args.seed)
    print_table(cal, title=f"{args.name}: calibration of the samples' and the mean code's confidence "
                           f"(ECE, NLL of the truth in nats; {len(lat)} images)")
    out["calibration"] = cal
    make = posterior.probe_maker(args.benchmark_dir or Path(args.data).parent) if args.probe_n > 0 else None
    if make is None or gallery is None:
        logging.warning("no two-place probe: %s", "--probe-n 0" if args.probe_n <= 0 else
                        "the run has no gallery" if gallery is None else "no benchmark JSON next to --data")
        return out
    probe = make(args.probe_n, args.seed)
    table = posterior.run_probe(method.model, method.config, probe, gallery, radius_km=args.radius, seed=args.seed)
    print_table(table, title=f"{args.name}: two-place probe ({args.probe_n} photos of two places >= "
                             f"{posterior.PROBE_MIN_KM:,.0f} km apart): top-2 answers naming both places "
                             f"within {args.radius:g} km")
    out["two_place_probe"] = table
    return out


if __name__ == "__main__":
    main()
