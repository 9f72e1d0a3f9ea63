"""`make gpu-check`: the first run of the GPU path, in under 5 minutes on one GPU.

    python -m benchmarks.gpu_check [--steps 300] [--n-train 20000] [--dry-run] [--json PATH]

1. prints the device;
2. trains `tiny` and then `base` for --steps steps at bfloat16 and at float32 (train.amp), in one process
   and through Ray Train with 1 worker x 1 GPU, on the synthetic benchmark;
3. interrupts a run half-way and resumes it, and compares its weights and accuracy with the uninterrupted
   run's;
4. predicts the test split with every run and compares the accuracy with the same run trained on the CPU
   (every threshold within 2 points);
5. reports samples/s (training steps only), the peak GPU memory and the MFU of each run (run.json's
   throughput metrics, locdiff.throughput.Throughput), as a table and as JSON (benchmarks/results/gpu_check.json).

Without a CUDA GPU (or with --dry-run) it is a dry run: the CPU parts run at a tiny size (one `tiny` training
in one process, an interrupted and resumed run, which must end bit-exact, prediction) and every GPU part is
printed as skipped, saying so. tests/test_gpu_check.py runs the dry run. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, print_table, save
from locdiff.data.stream import read_table
from locdiff.distributed import RayTrainSettings, ensure_ray, stop_local_ray
from locdiff.methods import get_method
from locdiff.metrics import geo_metrics
from locdiff.model.config import load_config
from locdiff.resources import model_config_path
from locdiff.runs import RunFolder
from locdiff.training import train_run
from locdiff.worlds.synth import SynthConfig, write_benchmark

ACCURACY_TOLERANCE = 2.0  # points, every threshold: a GPU run against the same run on the CPU
SKIPPED = "SKIPPED (no CUDA GPU)"


def _config(name: str, steps: int, device: str, amp: bool) -> Any:
    overrides = [f"train.steps={steps}", f"train.checkpoint_every={max(1, steps // 2)}",
                 f"train.log_every={max(1, min(50, steps // 4))}", f"train.warmup_steps={max(1, steps // 10)}",
                 f"train.device={device}", f"train.amp={'true' if amp else 'false'}", "train.val_samples=256",
                 "predict.samples=1", "predict.steps=1", "hybrid.tune_on_val=false"]
    return load_config(model_config_path(name), overrides)


def _accuracy(run: Path, test: Path) -> dict[str, float]:
    config = RunFolder(run).read_config()
    table = read_table(str(test))
    pred = get_method("locdiff").load(run, config).predict(table)
    m = geo_metrics(pred.lat, pred.lon, table.lat, table.lon)
    return {k: float(v) for k, v in m.items() if k.startswith("acc_")}


def _weights_diff(a: Path, b: Path) -> float:
    wa, wb = RunFolder(a).load_model()[0], RunFolder(b).load_model()[0]
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def _row(label: str, outcome: Any, acc: dict[str, float]) -> dict[str, Any]:
    m = outcome.record.get("metrics") or {}
    return {"run": label, "steps": outcome.record.get("step"), "samples_per_s": m.get("samples_per_s"),
            "peak_gpu_memory_gib": m.get("peak_gpu_memory_gib"), "mfu": m.get("mfu"),
            "acc_200km": acc.get("acc_200km"), "acc_2500km": acc.get("acc_2500km"), "_acc": acc}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps of each run")
    p.add_argument("--n-train", type=int, default=20_000, help="synthetic training rows")
    p.add_argument("--dry-run", action="store_true", help="the CPU parts only, at a tiny size (also without CUDA)")
    p.add_argument("--json", help="where to write the results (default benchmarks/results/gpu_check.json)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA GPU'}; torch "
          f"{torch.__version__}; {'GPU check' if gpu else 'dry run: the GPU parts are skipped'}", flush=True)
    steps, n_train = (args.steps, args.n_train) if gpu else (8, 400)
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        checks.append({"check": name, "result": SKIPPED if ok is None else "ok" if ok else "FAILED",
                       "detail": detail})

    with tempfile.TemporaryDirectory(prefix="gpucheck") as tmp:
        root = Path(tmp)
        data = write_benchmark(root / "synth", SynthConfig(n_train=n_train, n_test=max(60, n_train // 10),
                                                           n_unseen=40, dim=32 if not gpu else 128, seed=0))
        train, test = str(data["train"]), data["test"]

        def run(label: str, name: str, device: str, amp: bool, *, workers: int = 0,
                interrupt: bool = False) -> dict[str, Any]:
            out = root / label
            config = _config(name, steps, device, amp)
            ray = RayTrainSettings(num_workers=1, gpus_per_worker=1, storage_root=str(root / "ray"),
                                   run_name=label) if workers else None
            if interrupt:
                part = train_run(config, train, out, progress=False, max_steps_this_run=steps // 2)
                stopped = RunFolder(out).load_checkpoint()["step"]
                check(f"{label}: interrupted", not part.record["complete"] and stopped == steps // 2,
                      f"checkpoint at step {stopped} of {steps}")
            outcome = train_run(config, train, out, workers=workers, ray_settings=ray, progress=False)
            row = _row(label, outcome, _accuracy(out, test))
            rows.append(row)
            print(f"  {label}: {row['samples_per_s'] or 0:.0f} samples/s", flush=True)
            return row

        # the CPU reference (and the whole of the dry run's training)
        cpu = run("tiny-fp32-cpu", "tiny", "cpu", False)
        resumed = run("tiny-fp32-cpu-resumed", "tiny", "cpu", False, interrupt=True)
        diff = _weights_diff(root / "tiny-fp32-cpu", root / "tiny-fp32-cpu-resumed")
        check("CPU resume is bit-exact", diff == 0.0, f"max weight difference {diff:.3g}")
        check("CPU resume: the same accuracy", resumed["_acc"] == cpu["_acc"], json.dumps(resumed["_acc"]))
        if gpu:
            ensure_ray()  # one local Ray for the four Ray runs (each would start and stop its own)
        for name in ("tiny", "base"):
            for amp in (True, False):
                precision = "bf16" if amp else "fp32"
                for workers in (0, 1):
                    label = f"{name}-{precision}-{'ray-1x1gpu' if workers else 'process'}"
                    if not gpu:
                        rows.append({"run": label, "samples_per_s": SKIPPED})
                        continue
                    row = run(label, name, "cuda", amp, workers=workers)
                    if name == "tiny":
                        worst = max(abs(row["_acc"][k] - cpu["_acc"][k]) for k in cpu["_acc"])
                        check(f"{label} vs the CPU run: accuracy within {ACCURACY_TOLERANCE:g} points",
                              worst <= ACCURACY_TOLERANCE, f"largest difference {worst:.2f} points")
        if gpu:
            again = run("tiny-bf16-process-resumed", "tiny", "cuda", True, interrupt=True)
            first = next(r for r in rows if r["run"] == "tiny-bf16-process")
            diff = _weights_diff(root / "tiny-bf16-process", root / "tiny-bf16-process-resumed")
            worst = max(abs(again["_acc"][k] - first["_acc"][k]) for k in first["_acc"])
            check("GPU resume (bf16)", worst <= ACCURACY_TOLERANCE,
                  f"max weight difference {diff:.3g}; accuracy within {worst:.2f} points of the uninterrupted run")
            stop_local_ray()
        else:
            check("GPU runs (one process and Ray 1 worker x 1 GPU, tiny and base, bf16 and fp32)", None,
                  "no CUDA GPU on this machine: to be measured on one")
            check("GPU resume and the CPU-vs-GPU accuracy", None, "no CUDA GPU on this machine")

    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    print_table(table, "runs (throughput: training steps only)")
    print_table(checks, "checks")
    payload = {"machine": machine(), "gpu": gpu, "steps": steps, "n_train": n_train, "runs": table,
               "checks": checks}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        save("gpu_check", payload)
    failed = [c["check"] for c in checks if c["result"] == "FAILED"]
    if failed:
        print(f"FAILED: {'; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
