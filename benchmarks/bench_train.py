"""Training: the engine streaming feature shards against the same engine on the table held in memory, Ray
Train on 2 CPU workers against one plain process, and the peak memory of a 2-worker Ray training at two
data-set sizes, all in the same run.

    python -m benchmarks.bench_train [--steps 200] [--batch 256] [--n-train 20000]
                                     [--memory-sizes 200000,2000000] [--skip-memory]

1. Streaming: `locdiff.engine.train` on the features stage (shards read, checked and parsed by a
   background thread, a shuffle window of 16k rows) vs on an in-memory TableSource of the same rows, one
   thread each. Target: streaming >= 0.9x in-memory.
2. Ray Train: samples/s per core (2 workers, one thread each) vs the plain process. Target >= 0.8x.
3. Memory: peak resident memory (driver + Ray Train workers, sampled every 0.2 s) of a 2-worker Ray
   training on 200,000 and 2,000,000 synthetic rows (128-d, degree 32). Target: they differ by < 25 %.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, proc_status_bytes, save


def _ingest(parquet: Path, root: Path, name: str) -> str:
    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest

    cfg = load_dataset_config("embeddings")
    ingest(name, str(root), source=str(parquet), config=cfg, progress=False)
    return str(root / name / "features" / cfg.encoder)


def engine_throughput(config, source, steps: int, run_dir: Path) -> float:
    """samples/s of the engine on `source` (one thread; after the first steps)."""
    from locdiff import engine
    from locdiff.model.objective import LocDiffTask, engine_settings
    from locdiff.runs import RunFolder

    torch.set_num_threads(1)
    settings = engine_settings(config)
    settings.steps, settings.checkpoint_every, settings.log_every = steps, steps, 50
    res = engine.train(LocDiffTask(config, getattr(source, "shdd_degree", None)), source, settings,
                       store=engine.RunStore(RunFolder(run_dir)), progress=False)
    return res.samples_per_s


def _make_features(n: int, root: str, name: str) -> str:
    """Synthetic rows (128-d) ingested into feature shards; run in a child process so that the memory of
    making 2M rows is not counted as the training's (the driver's allocator keeps freed pages)."""
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    data = write_benchmark(Path(root) / "synth", SynthConfig(n_train=n, n_test=10, n_unseen=10, dim=128))
    folder = _ingest(data["train"], Path(root), name)
    shutil.rmtree(Path(root) / "synth", ignore_errors=True)
    return folder


class PeakRSS:
    """Peaks of the RSS of this process (the driver), of its Ray Train workers (summed) and of the
    controller, and of their sum, sampled every 0.2 s in a thread from /proc (psutil is only Ray's vendored copy)."""

    def __init__(self) -> None:
        self.peak = {"total": 0, "driver": 0, "workers": 0, "controller": 0}
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[str, int]:
        parts = {"driver": proc_status_bytes("VmRSS"), "workers": 0, "controller": 0}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
                if "RayTrainWorker" in cmd:
                    parts["workers"] += proc_status_bytes("VmRSS", pid)
                elif "TrainController" in cmd:
                    parts["controller"] += proc_status_bytes("VmRSS", pid)
            except OSError:  # the process ended meanwhile
                continue
        parts["total"] = sum(parts.values())
        return parts

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for k, v in self._sample().items():
                    self.peak[k] = max(self.peak[k], v)
                time.sleep(0.2)
        except Exception as err:  # noqa: BLE001 - re-raised in __exit__, not a silent zero
            self.error = err

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"memory sampling failed: {self.error}") from self.error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--config", default="tiny", help="model config name or YAML path")
    parser.add_argument("--memory-sizes", default="200000,2000000")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    args = parser.parse_args()

    from locdiff.data.stream import TableSource, open_source
    from locdiff.distributed import RayTrainSettings, ensure_ray, train_on_ray
    from locdiff.pipeline import resolve_config
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    tmp = Path(tempfile.mkdtemp(prefix="bench_train"))
    results: dict[str, object] = {}
    if not args.memory_only:
        paths = write_benchmark(tmp / "synth", SynthConfig(n_train=args.n_train, n_test=10, n_unseen=10))
        feats = _ingest(paths["train"], tmp / "root", "bench")
        config = resolve_config(args.config, overrides=[f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                                                        f"train.checkpoint_every={args.steps}", "train.val_share=0"])
        shards = open_source(feats)
        memory = TableSource(shards.read_all())  # the same rows (float16-stored embeddings) held in memory
        stream_sps = engine_throughput(config, shards, args.steps, tmp / "run-stream")
        mem_sps = engine_throughput(config, memory, args.steps, tmp / "run-mem")
        rows = [{"setup": "engine, in-memory table", "samples_per_s": mem_sps, "vs_in_memory": 1.0},
                {"setup": "engine, streaming feature shards", "samples_per_s": stream_sps,
                 "vs_in_memory": stream_sps / mem_sps}]
        print_table(rows, title=f"streaming vs in-memory, {args.config} config, batch {args.batch}, 1 thread")
        print(f"streaming / in-memory = {stream_sps / mem_sps:.2f}x (target >= 0.9x): "
              f"{'met' if stream_sps / mem_sps >= 0.9 else 'MISSED'}")
        results["streaming"] = {"rows": rows, "ratio": stream_sps / mem_sps, "target": 0.9}

        ensure_ray(num_cpus=2)
        runs = {}
        b = args.batch
        for label, per_worker in (("per_worker", b), ("global", None)):
            t = time.perf_counter()
            result = train_on_ray(config, feats, tmp / f"run-{label}",
                                  RayTrainSettings(num_workers=2, storage_root=str(tmp / "ray"),
                                                   per_worker_batch=per_worker))
            runs[label] = (result.samples_per_s, time.perf_counter() - t)
        half = resolve_config(args.config, overrides=[f"train.steps={args.steps}", f"train.batch_size={b // 2}",
                                                      f"train.checkpoint_every={args.steps}", "train.val_share=0"])
        plain_half = engine_throughput(half, shards, args.steps, tmp / "run-half")
        ray_rows = [
            {"setup": f"plain process, 1 thread, batch {b}", "samples_per_s": stream_sps, "per_core": stream_sps,
             "per_core_vs_ref": 1.0},
            {"setup": f"plain process, 1 thread, batch {b // 2}", "samples_per_s": plain_half, "per_core": plain_half,
             "per_core_vs_ref": 1.0},
            {"setup": f"Ray Train 2 workers, batch {b // 2}/worker (global {b})", "samples_per_s": runs["global"][0],
             "per_core": runs["global"][0] / 2, "per_core_vs_ref": runs["global"][0] / 2 / plain_half},
            {"setup": f"Ray Train 2 workers, batch {b}/worker (global {2 * b})", "samples_per_s": runs["per_worker"][0],
             "per_core": runs["per_worker"][0] / 2, "per_core_vs_ref": runs["per_worker"][0] / 2 / stream_sps},
        ]
        print_table(ray_rows, title="Ray Train vs one process (the same engine, streaming shards)")
        results["ray"] = {"rows": ray_rows, "wall_s": {k: v[1] for k, v in runs.items()}, "target": 0.8}

    if not args.skip_memory:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        mem_rows = []
        for n in [int(x) for x in args.memory_sizes.split(",")]:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                folder = pool.submit(_make_features, n, str(tmp / f"root{n}"), f"m{n}").result()
            cfg = resolve_config(args.config, overrides=["shdd.degree=32", "train.steps=100", "train.batch_size=256",
                                                         "train.checkpoint_every=50", "train.val_share=0"])
            with PeakRSS() as peak:
                t = time.perf_counter()
                train_on_ray(cfg, folder, tmp / f"run-mem{n}", RayTrainSettings(
                    num_workers=2, storage_root=str(tmp / f"ray{n}")))
                wall = time.perf_counter() - t
            mem_rows.append({"rows": n, "peak_rss_gb": peak.peak["total"] / 1e9,
                             **{f"{k}_gb": peak.peak[k] / 1e9 for k in ("driver", "workers", "controller")},
                             "wall_s": wall})
            shutil.rmtree(tmp / f"root{n}", ignore_errors=True)
        ratio = mem_rows[-1]["peak_rss_gb"] / mem_rows[0]["peak_rss_gb"]
        print_table(mem_rows, title="peak memory of a 2-worker Ray training (driver + workers), 128-d, degree 32 "
                                    "(each part's own peak; the total is the peak of the sum)")
        print(f"largest / smallest = {ratio:.2f} (target: within 25 %): "
              f"{'met' if abs(ratio - 1) < 0.25 else 'MISSED'}")
        results["memory"] = {"rows": mem_rows, "ratio": ratio, "target": "within 25 %"}
    save("train", {"steps": args.steps, "batch": args.batch, "n_train": args.n_train, "config": args.config, **results})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
