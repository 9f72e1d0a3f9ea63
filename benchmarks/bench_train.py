"""Training throughput: Ray Train on 2 CPU workers (DDP) against the same `train_step` in one plain
process, in the same run, on the synthetic benchmark with the `tiny` model config.

    python -m benchmarks.bench_train [--steps 200] [--batch 256]

Per core: Ray's samples/s divided by its 2 workers (one thread each) against the plain process with one
thread. Target: >= 0.8x. The plain process with 2 threads is shown for reference. Ray's figure is the
training loop's own (after start-up), the start-up cost is reported separately.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table, save


def plain_throughput(config, table, steps: int, threads: int) -> float:
    """samples/s of `train_step` in this process with `threads` torch threads (after 5 warm-up steps)."""
    from locdiff.model.train import EMA, build_model, encode_targets, lr_lambda, make_optimizer, train_step

    from locdiff.model.schedule import NoiseSchedule

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        emb = torch.as_tensor(np.ascontiguousarray(table.embedding, dtype=np.float32))
        z0 = encode_targets(table.lat, table.lon, config.shdd.degree)
        model = build_model(config, emb.shape[1])
        model.set_embedding_stats(emb.mean(0), emb.std(0))
        opt = make_optimizer(model, config)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))
        ema = EMA(model, config.train.ema_decay)
        schedule = NoiseSchedule(config.diffusion.timesteps)
        gen = torch.Generator().manual_seed(1)
        bs = config.train.batch_size
        n = len(table)

        def run(k: int) -> None:
            for _ in range(k):
                idx = torch.randint(0, n, (bs,), generator=gen)
                train_step(model, {"embedding": emb[idx], "z0": z0[idx]}, opt, config, schedule=schedule,
                           generator=gen, ema=ema, lr_scheduler=sched)

        run(5)
        t = time.perf_counter()
        run(steps)
        return steps * bs / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)


def config_with_batch(config, batch: int):
    from dataclasses import replace

    return replace(config, train=replace(config.train, batch_size=batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--config", default="tiny", help="model config name or YAML path")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from locdiff.distributed import RayTrainSettings, ensure_ray, train_on_ray
    from locdiff.io import read_embeddings
    from locdiff.pipeline import resolve_config
    from locdiff.synth import SynthConfig, write_benchmark

    tmp = Path(tempfile.mkdtemp(prefix="bench_train"))
    paths = write_benchmark(tmp / "synth", SynthConfig(n_train=args.n_train, n_test=10, n_unseen=10))
    table = read_embeddings(paths["train"])
    config = resolve_config(args.config, overrides=[f"train.steps={args.steps}",
                                                    f"train.batch_size={args.batch}",
                                                    f"train.checkpoint_every={args.steps}"])

    plain1 = plain_throughput(config, table, args.steps, threads=1)
    plain2 = plain_throughput(config, table, args.steps, threads=2)
    half = config_with_batch(config, args.batch // 2)
    plain_half = plain_throughput(half, table, args.steps, threads=1)
    ensure_ray(num_cpus=2)  # one local Ray for both runs (stopped when this process exits)
    runs = {}
    # The weak-scaling run first: the first Ray run also pays for the cluster's start-up processes.
    for label, per_worker in (("per_worker", args.batch), ("global", None)):
        t = time.perf_counter()
        result = train_on_ray(config, str(paths["train"]), tmp / f"run-{label}",
                              RayTrainSettings(num_workers=2, storage_root=str(tmp / "ray"),
                                               per_worker_batch=per_worker))
        runs[label] = (result.samples_per_s, time.perf_counter() - t)
    b, h = args.batch, args.batch // 2
    rows = [
        {"setup": f"plain process, 1 thread, batch {b}", "cores": 1, "samples_per_s": plain1,
         "per_core": plain1, "reference": "-"},
        {"setup": f"plain process, 1 thread, batch {h}", "cores": 1, "samples_per_s": plain_half,
         "per_core": plain_half, "reference": "-"},
        {"setup": f"plain process, 2 threads, batch {b}", "cores": 2, "samples_per_s": plain2,
         "per_core": plain2 / 2, "reference": f"plain batch {b}"},
        {"setup": f"Ray Train 2 CPU workers, batch {h}/worker (global {b})", "cores": 2,
         "samples_per_s": runs["global"][0], "per_core": runs["global"][0] / 2,
         "reference": f"plain batch {h}"},
        {"setup": f"Ray Train 2 CPU workers, batch {b}/worker (global {2 * b})", "cores": 2,
         "samples_per_s": runs["per_worker"][0], "per_core": runs["per_worker"][0] / 2,
         "reference": f"plain batch {b}"},
    ]
    refs = {f"plain batch {b}": plain1, f"plain batch {h}": plain_half}
    for r in rows:
        r["per_core_vs_ref"] = r["per_core"] / refs[r["reference"]] if r["reference"] in refs else 1.0
    print_table(rows, title=f"training throughput, {args.config} config, {args.steps} steps")
    for label, (sps, wall) in runs.items():
        print(f"Ray Train ({label} batch) wall time including start-up: {wall:.1f} s "
              f"(training loop alone: {args.steps * (b if label == 'global' else 2 * b) / sps:.1f} s)")
    ratio = rows[4]["per_core_vs_ref"]
    print(f"per-core ratio, the same step (batch {b} per process): Ray/plain {ratio:.2f}x (target >= 0.8x): "
          f"{'met' if ratio >= 0.8 else 'MISSED'}; with the global batch split: "
          f"{rows[3]['per_core_vs_ref']:.2f}x")
    save("train", {"steps": args.steps, "batch": args.batch, "n_train": args.n_train, "config": args.config,
                   "rows": rows, "ray_wall_s": {k: v[1] for k, v in runs.items()},
                   "ratio_per_core": ratio, "ratio_per_core_global_batch": rows[3]["per_core_vs_ref"],
                   "target": 0.8})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
