"""LocDiff against the baselines on the synthetic, the realistic and the cue benchmark, on this machine's CPU
(`make bench`).

The benchmarks (`--benchmarks synth,realbench,cuebench` by default: every world) run one after the other
with the same methods and sizes: `synth` (locdiff/worlds/synth.py, made in memory), `realbench`
(locdiff/worlds/realbench.py, GeoCLIP location-encoder embeddings) and `cuebench` (locdiff/worlds/cuebench.py, country,
region, city, landmark, biome and no-geography cues), the last two written into the work folder with the
same seed. For each, one run prints and saves (benchmarks/results/model.json, or `--out`: results and throughput
by benchmark; while it runs, what is measured so far goes to model.partial.json beside it, so that an interrupted
run leaves its numbers and never replaces a finished run's):
1. accuracy on `val` and `val_unseen` (where defaults are chosen) and on `test` and `test_unseen` (realbench
   also `im2gps3k` and `yfcc26k`; cuebench also `test_landmark`, the landmark photos of `test`) of LocDiff, LocDiff-H
   and every baseline (knn top-1, knn top-16, geocell, regress, flow), LocDiff trained with each other
   objective (KL alone, MSE alone), and the same LocDiff network sampled in one step (one sample, one
   DDIM step: z0 predicted from pure noise at t = T, no iterative denoising), and the same network
   trained as a one-step regressor (every training input is pure noise at t = T, so it learns z0 from
   the embedding alone; `diffusion.min_train_timestep`);
2. inference throughput (images/s, embeddings given) of LocDiff at K = 16, S = 50 and cheaper settings and
   of knn over a 100,000-entry gallery, with the accuracy of each on the same test images;
3. what sampling adds (issue 19, item 4; benchmarks/posterior.py): the row "sampled (K=16, S=20)" next to
   "one-step (K=1, S=1)"; a table of accuracy at 1 and 25 km of LocDiff alone (no gallery) against
   LocDiff-H and retrieval; the two-place probe (`--n-probe` photos made to look like two places at least
   3,000 km apart: the share whose top-2 answers name both places within `--radius` km, for the mean
   code's modes, the samples' clusters and retrieval's two best distinct places); and on `test`, the
   calibration (ECE, NLL of the truth) of the samples' confidence against the mean code's.

    python -m benchmarks.bench_model                 # the full run (base config, 50,000 training images)
    python -m benchmarks.bench_model --quick         # a smoke run on tiny data (minutes; results/model-quick.json)
    python -m benchmarks.bench_model --skip-locdiff  # baselines only
    python -m benchmarks.bench_model --benchmarks realbench  # one benchmark only
    python -m benchmarks.bench_model --benchmarks synth,realbench  # the two smooth worlds
    python -m benchmarks.bench_model --report        # the README's Markdown tables from results/model.json
    python -m benchmarks.bench_model --work DIR --update-hybrid  # LocDiff-H chosen again on DIR's runs
    python -m benchmarks.bench_model --work DIR --update-probe   # the two-place probe measured again on them
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import posterior
from benchmarks.common import RESULTS, model_config, print_table, save
from locdiff.gallery import Gallery
from locdiff.metrics import ACCURACY_KEYS, format_table, geo_metrics
from locdiff.tables import EmbeddingTable
from locdiff.worlds import cuebench, realbench, synth
from locdiff.worlds.synth import SynthConfig, SynthWorld, make_benchmark, make_split

log = logging.getLogger("bench_model")
ROOT = Path(__file__).resolve().parent.parent
SPLITS = {"synth": ("val", "val_unseen", "test", "test_unseen"),
          "realbench": ("val", "val_unseen", "test", "test_unseen", "im2gps3k", "yfcc26k"),
          "cuebench": ("val", "val_unseen", "test", "test_unseen", "test_landmark")}
DEFAULT_BENCHMARKS = "synth,realbench,cuebench"
BASELINES = {  # row name -> (method, options overriding the config's baselines.<method>)
    "knn": ("knn", {"k": 1}),
    "knn top-16": ("knn", {"k": 16, "aggregation": "mode"}),
    "geocell": ("geocell", {}),
    "regress": ("regress", {}),
    "flow": ("flow", {}),
}


def _subset(t: EmbeddingTable, n: int) -> EmbeddingTable:
    return EmbeddingTable(t.ids[:n], t.lat[:n], t.lon[:n], t.embedding[:n], t.source)


class Benchmark(dict):
    """One benchmark's tables by split (`data["train"]`, ...), with its name and the splits evaluated."""

    def __init__(self, name: str, tables: dict[str, EmbeddingTable]):
        super().__init__(tables)
        self.name = name
        self.splits = SPLITS[name]


def _evaluate(model: Any, data: Benchmark, splits: tuple[str, ...] | None = None,
              **options: Any) -> dict[str, dict[str, float]]:
    """Accuracy and speed of `model.predict(table, **options)` on each split (default: the benchmark's)."""
    out = {}
    for split in data.splits if splits is None else splits:
        t0 = time.perf_counter()
        p = model.predict(data[split], **options)
        secs = time.perf_counter() - t0
        out[split] = {**geo_metrics(p.lat, p.lon, data[split].lat, data[split].lon),
                      "predict_s": secs, "images_per_s": len(data[split]) / secs}
    return out


def _fit(name: str, config: dict[str, Any], data: dict[str, EmbeddingTable],
         run_dir: Path) -> tuple[Any, float]:
    from locdiff.methods import get_method

    method = get_method(name).from_config(config)
    t0 = time.perf_counter()
    method.fit(data["train"], data.get("val"), run_dir, progress=True)
    return method, time.perf_counter() - t0


def baseline_config(config: dict[str, Any], row: str) -> tuple[str, dict[str, Any]]:
    """The method name and config of a BASELINES row (its options over the config's baselines.<method>)."""
    name, opts = BASELINES[row]
    return name, {**config, "method": name,
                  "baselines": {**config.get("baselines", {}), name: {**config.get("baselines", {}).get(name, {}),
                                                                      **opts}}}


def baseline_dir(work: Path, row: str) -> Path:
    return work / row.replace(" ", "_")


def run_baselines(config: dict[str, Any], data, work: Path, results: dict[str, Any], report) -> None:
    for row in BASELINES:
        name, cfg = baseline_config(config, row)
        log.info("baseline %s", row)
        method, fit_s = _fit(name, cfg, data, baseline_dir(work, row))
        results[row] = {"fit_s": fit_s, **_evaluate(method, data)}
        report(row)


def run_locdiff(args, data, work: Path, results: dict[str, Any], report) -> Any:
    from locdiff.model.config import load_config

    base_cfg = load_config(args.config, args.set)
    chosen = base_cfg.train.objective
    method, fit_s = _fit_locdiff(base_cfg, data, work / "locdiff")
    k, s = posterior.SAMPLED
    for row, opts in (("LocDiff", {"method": "locdiff"}), ("LocDiff-H", {"method": "locdiff-h"}),
                      ("one-step (K=1, S=1)", {"method": "locdiff", "samples": 1, "steps": 1}),
                      (f"sampled (K={k}, S={s})", {"method": "locdiff", "samples": k, "steps": s})):
        log.info("evaluate %s", row)
        results[row] = {"fit_s": fit_s if row == "LocDiff" else None, "objective": chosen,
                        **_evaluate(method, data, **opts)}
        report(row)
    return method


def run_ablations(args, data, work: Path, results: dict[str, Any], report) -> None:
    """The same network trained as a one-step regressor, and LocDiff trained with each objective other than
    the config's (`--ablations`: three more trainings per benchmark)."""
    from locdiff.model.config import load_config

    base_cfg = load_config(args.config, args.set)
    chosen = base_cfg.train.objective
    # the same network trained as a one-step regressor: input always pure noise (t = T - 1), one step
    cfg = load_config(args.config, [*args.set, f"diffusion.min_train_timestep={base_cfg.diffusion.timesteps - 1}"])
    log.info("one-step regressor")
    reg, secs = _fit_locdiff(cfg, data, work / "locdiff_one_step_regressor")
    row = "one-step regressor (trained at t=T)"
    results[row] = {"fit_s": secs, "objective": chosen, **_evaluate(reg, data, method="locdiff", samples=1, steps=1)}
    report(row)
    for objective in ("kl+mse", "kl", "mse"):
        if objective == chosen:
            continue
        cfg = load_config(args.config, [*args.set, f"train.objective={objective}"])
        log.info("objective %s", objective)
        m, secs = _fit_locdiff(cfg, data, work / f"locdiff_{objective}")
        row = f"LocDiff ({objective})"
        results[row] = {"fit_s": secs, "objective": objective, **_evaluate(m, data, method="locdiff")}
        report(row)


def _fit_locdiff(cfg, data, run_dir: Path):
    from locdiff.model.locdiff_method import LocDiffMethod

    method = LocDiffMethod(cfg)
    t0 = time.perf_counter()
    # LocDiff-H's parameters are chosen on val and val_unseen together (locdiff.model.hybrid)
    method.fit(data["train"], data.get("val"), run_dir, progress=True, val_unseen=data.get("val_unseen"))
    return method, time.perf_counter() - t0


def throughput(args, data, locdiff: Any | None, work: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """images/s (embeddings given) and accuracy on the same `test` images."""
    from locdiff.methods import get_method

    test = _subset(data["test"], args.n_throughput)
    rows = []

    def measure(name: str, fn) -> None:
        fn()  # warm-up (first-call allocations, lazy imports)
        t0 = time.perf_counter()
        p = fn()
        secs = time.perf_counter() - t0
        m = geo_metrics(p.lat, p.lon, test.lat, test.lon)
        rows.append({"method": name, "images": len(test), "images_per_s": len(test) / secs,
                     **{k: m[k] for k in (*ACCURACY_KEYS,
                                          "median_km")}})

    if locdiff is not None:
        for k, s in ((16, 50), (16, 20), (8, 10), (4, 10), (1, 10), (1, 1)):
            measure(f"LocDiff K={k} S={s}", lambda k=k, s=s: locdiff.predict(test, samples=k, steps=s))
        measure("LocDiff-H K=16 S=50",
                lambda: locdiff.predict(test, method="locdiff-h", samples=16, steps=50))
    # knn over a 100,000-entry gallery: the same world and test images, a larger training split.
    gallery = _gallery(args, data)
    # knn searches the gallery of locdiff.gallery (faiss; exact or IVF by size): it has no `backend` option
    knn = get_method("knn").from_config({"baselines": {"knn": {"k": 1}}})
    knn.fit(gallery, None, work / "knn_gallery", progress=False)
    measure(f"knn top-1, {args.gallery:,} gallery", lambda: knn.predict(test))
    base_knn = next((r for r in rows if r["method"].startswith("knn")), None)
    for r in rows:  # ratio against knn measured in the same run
        r["speed_vs_knn"] = r["images_per_s"] / base_knn["images_per_s"] if base_knn else None
    return rows


def _kept_runs(args: argparse.Namespace, payload: dict[str, Any]
               ) -> Iterator[tuple[str, argparse.Namespace, Benchmark, Any, float, bool]]:
    """Each benchmark of a saved run with its data and the LocDiff fit kept in `args.work` (resumed: nothing
    trains): (name, the run's own arguments, data, method, seconds, whether LocDiff-H was chosen again, as
    it is when its selection rule changed). The run's own arguments (sizes, seed, config, probe size) come from
    the payload, so the data are the same."""
    saved = argparse.Namespace(**{**payload["args"], "work": args.work})
    for bench in payload["benchmarks"]:
        # the config recorded relative to the repository (an absolute path stays as it is)
        yield bench, saved, *kept_run(bench, saved, Path(args.work), ROOT / saved.config)


def kept_run(bench: str, data_args: argparse.Namespace, work_root: Path, config: str | Path
             ) -> tuple[Benchmark, Any, float, bool]:
    """A benchmark's data and the LocDiff fit kept in WORK/<bench>/locdiff (resumed: nothing trains), the
    seconds that took, and whether LocDiff-H was chosen again (as it is when its selection rule changed)."""
    from locdiff.model.config import load_config

    run = work_root / bench / "locdiff"
    if not run.is_dir():
        raise SystemExit(f"{run}: no LocDiff run to reuse (run bench_model --work {work_root} first)")
    selection = run / "selection.json"
    before = selection.read_bytes() if selection.is_file() else b""
    data = load_benchmark(bench, data_args, work_root / bench)
    method, secs = _fit_locdiff(load_config(config, data_args.set), data, run)
    return data, method, secs, selection.read_bytes() != before


def results_path(args: argparse.Namespace) -> Path:
    """The results JSON: --out, else benchmarks/results/model.json (model-quick.json for a --quick run)."""
    return Path(args.out) if args.out else RESULTS / ("model-quick.json" if args.quick else "model.json")


def partial_path(path: Path) -> Path:
    """Where an unfinished run's checkpoints go: NAME.partial.json beside the results."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _record_update(args: argparse.Namespace, payload: dict[str, Any], entry: dict[str, Any]) -> None:
    """Save the payload with one more entry in `updates` (its own machine and date stay: the run's)."""
    save(results_path(args), {**payload, "updates": [*payload.get("updates", []),
                                                     {**entry, "date": time.strftime("%Y-%m-%d %H:%M:%S")}]})


def update_hybrid(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """Re-choose LocDiff-H on the saved run's LocDiff fits in `args.work` and replace its rows of `payload`; the
    update's entry records each benchmark's chosen parameters and novelty signal."""
    from locdiff.model.hybrid import SELECTION_RULE

    chosen = {}
    for bench, _, data, method, secs, _ in _kept_runs(args, payload):
        poe, signal = method.selection.get("hybrid_poe") or {}, method.selection.get("hybrid_signal", "s_top")
        log.info("%s: LocDiff-H chosen again in %.0f s: %s, novelty signal %s", bench, secs, poe, signal)
        chosen[bench] = {**{k: v if math.isfinite(v) else str(v) for k, v in poe.items()}, "signal": signal}
        payload["results"][bench]["LocDiff-H"] = {**payload["results"][bench]["LocDiff-H"],
                                                  **_evaluate(method, data, method="locdiff-h")}
        print("\n" + format_table({f"{bench} / LocDiff-H / {s}": payload["results"][bench]["LocDiff-H"][s]
                                   for s in data.splits}), flush=True)
    _record_update(args, payload, {"rows": ["LocDiff-H"], "selection_rule": SELECTION_RULE, "chosen": chosen})


def update_probe(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """Measure the two-place probe again on the saved run's LocDiff fits in `args.work` (after a change of how
    the top-2 answers are found, e.g. locdiff.shdd.modes) and replace its rows of `payload`; the calibration
    and every other row stay."""
    for bench, saved, data, method, _, rechosen in _kept_runs(args, payload):
        if rechosen:
            log.warning("%s: resuming the kept run chose LocDiff-H again (its selection rule changed), so its "
                        "row in model.json no longer matches the run: run --update-hybrid too", bench)
        payload["sampling"][bench] = {**payload["sampling"][bench],
                                      "two_place_probe": _probe(saved, data, method, method.get_gallery())}
    _record_update(args, payload, {"rows": ["two-place probe"], "flag": "--update-probe"})


def _probe(args, data: Benchmark, locdiff: Any, gallery: Gallery) -> list[dict[str, Any]]:
    """The two-place probe's table (benchmarks/posterior.py) of a LocDiff run, printed and returned."""
    probe = two_place_probe(data.name, _world(data.name, args), args.n_probe, args.seed)
    rows = posterior.run_probe(locdiff.model, locdiff.config, probe, gallery, radius_km=args.radius, seed=args.seed)
    print_table(rows, title=f"{data.name}: two-place probe ({args.n_probe} photos of two places >= "
                            f"{posterior.PROBE_MIN_KM:,.0f} km apart): top-2 answers naming both places "
                            f"within {args.radius:g} km")
    return rows


def two_place_probe(name: str, world: Any, n: int, seed: int) -> Any:
    """`n` two-place probe photos of a benchmark's world (`_world`), by its module's two_place_probe."""
    module = {"realbench": realbench, "cuebench": cuebench, "synth": synth}[name]
    return module.two_place_probe(world, n, seed)


def _world(name: str, args) -> Any:
    """The world of a benchmark (its geography and embedding rules) with the run's settings."""
    if name == "realbench":
        return realbench.RealBenchWorld(_realbench_config(args))
    if name == "cuebench":
        return cuebench.CueWorld(_cuebench_config(args))
    return SynthWorld(SynthConfig(**{**_synth_kwargs(args), "n_train": args.gallery}))


def _gallery(args, data: Benchmark) -> EmbeddingTable:
    world = _world(data.name, args)
    if data.name == "realbench":
        return realbench.make_split(world, "train", args.gallery)
    if data.name == "cuebench":
        return cuebench.make_split(world, "train", args.gallery).table
    return make_split(world, "train", args.gallery)


def what_sampling_adds(args, data: Benchmark, locdiff: Any) -> dict[str, Any]:
    """The two-place probe over the run's gallery (the training rows) and the calibration on `test`
    (benchmarks/posterior.py)."""
    rows = _probe(args, data, locdiff, locdiff.get_gallery())
    test = data["test"]
    cal = posterior.run_calibration(locdiff.model, locdiff.config, test.embedding, test.lat, test.lon, seed=args.seed)
    print_table(cal, title=f"{data.name} / test: calibration of the samples' and the mean code's confidence")
    return {"two_place_probe": rows, "calibration_test": cal, "radius_km": args.radius,
            "probe_min_km": posterior.PROBE_MIN_KM}


def _realbench_config(args):
    from locdiff.worlds.realbench import RealBenchConfig

    return RealBenchConfig(seed=args.seed, n_train=args.n_train_realbench, n_val=args.n_val,
                           n_val_unseen=args.n_val // 2, n_test=args.n_test, n_test_unseen=args.n_unseen,
                           n_yfcc=args.n_yfcc)


def _cuebench_config(args) -> cuebench.CueBenchConfig:
    return cuebench.CueBenchConfig(seed=args.seed, n_train=args.n_train_cuebench, n_val=args.n_val,
                                   n_val_unseen=args.n_val // 2, n_test=args.n_test, n_test_unseen=args.n_unseen)


def load_benchmark(name: str, args, work: Path) -> Benchmark:
    """One benchmark: synth made in memory, realbench and cuebench written to WORK/<name> and read back
    (cuebench's `test_landmark`: the rows of `test` that its labels call landmark photos)."""
    if name == "synth":
        return Benchmark(name, make_benchmark(SynthConfig(**_synth_kwargs(args))))
    from locdiff.io import read_embeddings

    if name == "cuebench":
        paths = cuebench.write_benchmark(work / "cuebench", _cuebench_config(args))
        tables = {split: read_embeddings(path) for split, path in paths.items()}
        kind = cuebench.read_labels(work / "cuebench" / "labels" / "test.parquet")["kind"]
        t, rows = tables["test"], kind == "landmark"
        tables["test_landmark"] = EmbeddingTable(t.ids[rows], t.lat[rows], t.lon[rows], t.embedding[rows],
                                                 f"{t.source} (landmark photos)")
        return Benchmark(name, tables)
    from locdiff.worlds.realbench import write_benchmark

    paths = write_benchmark(work / "realbench", _realbench_config(args))
    return Benchmark(name, {split: read_embeddings(path) for split, path in paths.items()})


def _synth_kwargs(args) -> dict[str, Any]:
    return {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "n_unseen": args.n_unseen,
            "n_val_unseen": args.n_val // 2, "seed": args.seed, "dim": args.dim}


REPORT_ROWS = {  # README row name -> the row of results/model.json
    "retrieval (knn top-1)": "knn", "retrieval (knn top-16, mode)": "knn top-16",
    "cell classifier (geocell)": "geocell",
    "regression (regress)": "regress", "flow (flow)": "flow", "LocDiff (one-step, K=1 S=1)": "one-step (K=1, S=1)",
    "LocDiff (sampled, K={} S={})".format(*posterior.SAMPLED): "sampled (K={}, S={})".format(*posterior.SAMPLED),
    "LocDiff-H": "LocDiff-H"}


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as saved in the JSON: paths inside the repository relative to it, others by their
    file name (no machine-local path goes into a file that may be shared)."""
    out = dict(vars(args))
    for key in ("config", "work", "out"):
        if out.get(key):
            path = Path(out[key]).resolve()
            out[key] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return out


def markdown_report(payload: dict[str, Any]) -> str:
    """The README's results tables from a saved results/model.json: per benchmark, accuracy (%) at 1 / 25 /
    200 / 750 / 2,500 km of every method on every split, then the two-place probe."""
    out = []
    for bench in payload["benchmarks"]:
        res = payload["results"].get(bench, {})
        splits = [s for s in SPLITS[bench] if any(s in r for r in res.values())]
        if not splits:
            continue
        sizes = payload.get("sizes", {}).get(bench, {})
        out.append(f"**{bench}** ({sizes.get('train', 0):,} training rows; "
                   + ", ".join(f"{s} {sizes.get(s, 0):,}" for s in splits) + ")\n")
        out.append("| method | " + " | ".join(splits) + " |")
        out.append("|---" * (len(splits) + 1) + "|")
        for label, row in REPORT_ROWS.items():
            if row in res:
                cells = [" / ".join(f"{res[row][s][k]:.1f}" for k in ACCURACY_KEYS) if s in res[row] else ""
                         for s in splits]
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    probe = [(bench, r) for bench in payload["benchmarks"]
             for r in payload.get("sampling", {}).get(bench, {}).get("two_place_probe", [])]
    if probe:
        radius = payload["args"].get("radius", posterior.NAME_RADIUS_KM)
        out.append(f"**Two-place probe** (photos of two places at least {posterior.PROBE_MIN_KM:,.0f} km apart: "
                   f"% whose top-2 answers name both places within {radius:g} km / name at least one)\n")
        out.append("| benchmark | method | names both | names one | probes |")
        out.append("|---|---|---|---|---|")
        for bench, r in probe:
            out.append(f"| {bench} | {r['method']} | {r['names_both_%']:.1f} | {r['names_one_%']:.1f} | "
                       f"{r['probes']} |")
        out.append("")
    cal = [(bench, r) for bench in payload["benchmarks"]
           for r in payload.get("sampling", {}).get(bench, {}).get("calibration_test", [])]
    if cal:
        out.append("**Calibration on test** (confidence = the answer's probability of lying within the radius: "
                   "ECE before / after isotonic calibration, NLL of the truth in nats)\n")
        out.append("| benchmark | setting | answer | confidence | radius km | hit rate | ECE raw | ECE calibrated "
                   "| NLL |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for bench, r in cal:
            out.append(f"| {bench} | {r['setting']} | {r['answer']} | {r['confidence']} | {r['radius_km']:.0f} | "
                       f"{r['hit_rate']:.3f} | {r['ece_raw']:.3f} | {r['ece_calibrated']:.3f} | {r['nll_truth']:.2f} |")
        out.append("")
    m = payload.get("machine", {})
    out.append(f"Machine: {m.get('cpus')} CPUs, torch {m.get('torch')} with {m.get('torch_threads')} threads, "
               f"cuda {m.get('cuda')}; run of {m.get('date')}"
               + ("" if payload.get("complete") else f" (incomplete: last stage {payload.get('last_stage')})") + ".")
    for u in payload.get("updates", []):
        if u.get("flag") == "--update-probe":
            out.append(f"Rows {', '.join(u['rows'])} measured again on the same trained runs on {u['date']} "
                       "(`--update-probe`).")
        else:
            out.append(f"Rows {', '.join(u['rows'])} chosen again and re-measured on the same trained runs on "
                       f"{u['date']} (selection rule {u['selection_rule']}, `--update-hybrid`).")
    return "\n".join(out)


def default_args() -> argparse.Namespace:
    """The command line's defaults (the sizes and seed other benchmarks reuse to make the same data)."""
    return build_parser().parse_args([])


def add_reuse_arguments(ap: argparse.ArgumentParser, work_help: str, set_help: str = "config override") -> None:
    """--work, --benchmarks, --config and --set of a benchmark that reuses this one's data (and runs)."""
    ap.add_argument("--work", required=True, help=work_help)
    ap.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, metavar="NAMES")
    ap.add_argument("--config", default=str(ROOT / "configs/model/base.yaml"), type=model_config,
                    help="model config name or YAML path (default base)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def reuse_data_args(args: argparse.Namespace) -> argparse.Namespace:
    """This benchmark's defaults (sizes, seed, dimensions: the same data) with `args`' benchmarks, config and
    overrides (`add_reuse_arguments`)."""
    data_args = default_args()
    data_args.benchmarks, data_args.config, data_args.set = args.benchmarks, args.config, args.set
    return data_args


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS, metavar="NAMES",
                    help=f"comma-separated, run in this order, from {','.join(SPLITS)} (default {DEFAULT_BENCHMARKS})")
    ap.add_argument("--config", default=str(ROOT / "configs/model/base.yaml"), type=model_config,
                    help="model config name or YAML path (default base)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--n-train", type=int, default=50_000, help="synth training rows")
    ap.add_argument("--n-train-realbench", type=int, default=60_000, help="realbench training rows (as in issue 9)")
    ap.add_argument("--n-train-cuebench", type=int, default=60_000, help="cuebench training rows")
    ap.add_argument("--n-val", type=int, default=4_000,
                    help="validation rows (val_unseen: half): what base.yaml chooses on (train.val_samples 4,096)")
    ap.add_argument("--n-test", type=int, default=2_000)
    ap.add_argument("--n-unseen", type=int, default=1_000)
    ap.add_argument("--n-yfcc", type=int, default=4_000, help="realbench yfcc26k rows (0: all 25,600)")
    ap.add_argument("--dim", type=int, default=128, help="synth embedding dimension (realbench: 512, cuebench: 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gallery", type=int, default=100_000, help="knn gallery size for the throughput")
    ap.add_argument("--n-throughput", type=int, default=256, help="test images timed per setting")
    ap.add_argument("--n-probe", type=int, default=500, help="two-place probe photos per benchmark (0: none)")
    ap.add_argument("--radius", type=float, default=posterior.NAME_RADIUS_KM,
                    help="two-place probe: a top-2 answer names a place within this many km (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (tiny config, small data)")
    ap.add_argument("--skip-locdiff", action="store_true")
    ap.add_argument("--ablations", action="store_true",
                    help="also train the one-step regressor and the other objectives (3 more trainings each)")
    ap.add_argument("--report", action="store_true",
                    help="print the README's Markdown tables from the results JSON (--out) and exit")
    ap.add_argument("--out", help="the results JSON that --report and the updates read (default "
                                  "benchmarks/results/model.json; with --quick, model-quick.json)")
    ap.add_argument("--work", help="keep run directories (and the realbench tables) here (default: a temporary folder)")
    ap.add_argument("--update-hybrid", action="store_true",
                    help="after a change of LocDiff-H's selection rule: choose its parameters again on the LocDiff "
                         "runs kept in --work (no training) and re-measure its row only; every other row, the probe, "
                         "the calibration and the throughput stay as benchmarks/results/model.json has them")
    ap.add_argument("--update-probe", action="store_true",
                    help="after a change of how the top-2 answers are found: measure the two-place probe again on "
                         "the LocDiff runs kept in --work (no training); every other row stays")
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    for flag, update in (("--update-hybrid", update_hybrid), ("--update-probe", update_probe)):
        if not getattr(args, flag[2:].replace("-", "_")):
            continue
        if not args.work:
            ap.error(f"{flag} needs --work: the folder of the run whose LocDiff fits it reuses")
        path = results_path(args)
        if not path.is_file():
            ap.error(f"{flag}: {path} does not exist; run the benchmark first")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        update(args, json.loads(path.read_text()))
        return
    if args.report:
        path = results_path(args)
        if not path.is_file():
            ap.error(f"--report: {path} does not exist; run the benchmark first")
        print(markdown_report(json.loads(path.read_text())))
        return
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = sorted(set(benchmarks) - set(SPLITS))
    if unknown or not benchmarks:
        ap.error(f"--benchmarks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SPLITS)}")
    if args.quick:
        args.n_train, args.n_val, args.n_test, args.n_unseen, args.n_yfcc = 4_000, 300, 300, 200, 300
        args.n_train_realbench = args.n_train_cuebench = 4_000
        args.gallery, args.n_throughput, args.n_probe = 10_000, 64, min(args.n_probe, 200)
        if args.config.endswith("base.yaml"):
            args.config = str(ROOT / "configs/model/tiny.yaml")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = results_path(args)
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {b: {} for b in benchmarks}  # benchmark -> row -> split -> metrics
    errors: dict[str, str] = {}
    speed: dict[str, list[dict[str, Any]]] = {b: [] for b in benchmarks}
    sampling: dict[str, dict[str, Any]] = {}  # benchmark -> what sampling adds (probe, calibration)
    sizes: dict[str, dict[str, int]] = {}

    def payload() -> dict[str, Any]:
        return {"args": recorded_args(args), "synth": _synth_kwargs(args), "benchmarks": benchmarks, "sizes": sizes,
                "results": results, "throughput": speed, "sampling": sampling, "errors": errors}

    def checkpoint(stage: str) -> None:
        """Save what is measured so far (an interrupted run still leaves its numbers)."""
        save(partial_path(out), {**payload(), "complete": False, "last_stage": stage,
                       "elapsed_s": time.perf_counter() - t_start})

    with tempfile.TemporaryDirectory() as tmp:
        work_root = Path(args.work) if args.work else Path(tmp)
        config: dict[str, Any] = {}
        if not args.skip_locdiff:
            from locdiff.model.config import config_to_dict, load_config

            config = config_to_dict(load_config(args.config, args.set))
        for bench in benchmarks:
            torch.manual_seed(args.seed)
            work = work_root / bench
            data = load_benchmark(bench, args, work)
            sizes[bench] = {k: len(v) for k, v in data.items()}
            log.info("%s benchmark: %s", bench, sizes[bench])
            res = results[bench]

            def report(row: str, bench=bench, data=data, res=res) -> None:
                print("\n" + format_table({f"{bench} / {row} / {s}": res[row][s] for s in data.splits}), flush=True)
                checkpoint(f"{bench}: {row}")

            run_baselines(config, data, work, res, report)
            locdiff = None
            if not args.skip_locdiff:
                try:
                    locdiff = run_locdiff(args, data, work, res, report)
                except Exception as err:  # noqa: BLE001 - report it and still measure the rest
                    log.exception("LocDiff failed on %s", bench)
                    errors[f"{bench}/locdiff"] = f"{type(err).__name__}: {err}"
            if locdiff is not None and args.n_probe > 0:
                try:
                    sampling[bench] = what_sampling_adds(args, data, locdiff)
                except Exception as err:  # noqa: BLE001
                    log.exception("the two-place probe or the calibration failed on %s", bench)
                    errors[f"{bench}/sampling"] = f"{type(err).__name__}: {err}"
                checkpoint(f"{bench}: two-place probe and calibration")
            speed[bench].extend(throughput(args, data, locdiff, work, config))
            checkpoint(f"{bench}: throughput")
            if locdiff is not None and args.ablations:
                try:
                    run_ablations(args, data, work, res, report)
                except Exception as err:  # noqa: BLE001
                    log.exception("objective ablation failed on %s", bench)
                    errors[f"{bench}/objectives"] = f"{type(err).__name__}: {err}"
    keys = (*ACCURACY_KEYS, "median_km", "geoscore")
    print_table([{"benchmark": bench, "split": split, "method": row, "n": r[split]["n"],
                  **{k: r[split][k] for k in keys}}
                 for bench in benchmarks for split in SPLITS[bench] for row, r in results[bench].items()],
                title="accuracy (%) by benchmark and split (training rows: "
                      + ", ".join(f"{b} {sizes[b]['train']:,}" for b in benchmarks) + ")")
    no_gallery = ("LocDiff", "one-step (K=1, S=1)", "sampled (K={}, S={})".format(*posterior.SAMPLED), "LocDiff-H",
                  "knn", "knn top-16")
    print_table([{"benchmark": bench, "split": split, "method": row,
                  "gallery": "yes" if row.startswith(("LocDiff-H", "knn")) else "no",
                  **{k: results[bench][row][split][k] for k in ("acc_1km", "acc_25km")}}
                 for bench in benchmarks for split in SPLITS[bench] for row in no_gallery if row in results[bench]],
                title="accuracy (%) at 1 and 25 km: LocDiff alone (no gallery) against LocDiff-H and retrieval")
    for key, title in (("two_place_probe", f"two-place probe: top-2 answers naming both places within "
                                           f"{args.radius:g} km"),
                       ("calibration_test", "test: calibration of the samples' and the mean code's confidence (ECE, "
                                            "NLL of the truth in nats)")):
        print_table([{"benchmark": bench, **r} for bench in benchmarks for r in sampling.get(bench, {}).get(key, [])],
                    title=title)
    print_table([{"benchmark": bench, "method": row, "fit_s": r.get("fit_s"),
                  **{f"{s} img/s": r[s]["images_per_s"] for s in ("test", "test_unseen")}}
                 for bench in benchmarks for row, r in results[bench].items()],
                title="training time and prediction speed")
    print_table([{"benchmark": bench, **row} for bench in benchmarks for row in speed[bench]],
                title=f"throughput on {args.n_throughput} test images (embeddings given)")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total / 60:.1f} min")
    if errors:
        print(f"errors: {errors}")
    save(out, {**payload(), "complete": True, "total_s": total})
    partial_path(out).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
