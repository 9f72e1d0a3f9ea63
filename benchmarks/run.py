"""`make bench`: every benchmark that runs on its own, then those that reuse `bench_model`'s trained runs, in
turn; each prints its table and writes its JSON (benchmarks/results/). `python -m benchmarks.run NAME ...` runs
only those (NAME without `bench_`). Benchmarks that need a run or a folder of the user's, or train for hours
beyond `bench_model`, are listed with the command to run them by hand."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# reuse bench_model's kept runs (its --work folder, made for this `make bench` and removed after it); run after it
REUSE = ("mode_smoothing", "heldout")
# not run by `make bench`: name -> why, and how to run it
BY_HAND = {
    "kl_choice": "trains LocDiff with three more settings on every world (about 1.5 h on 2 cores): "
                 "python -m benchmarks.bench_kl_choice --work DIR",
    "sampling": "needs a trained run and a validation table: "
                "python -m benchmarks.bench_sampling --run RUN --data VAL.parquet",
}


def names() -> list[str]:
    """Every benchmarks/bench_*.py, without the prefix."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def plan(only: list[str], work: str) -> tuple[list[list[str]], list[str]]:
    """The commands to run (standalone ones first, bench_model with --work, then the reusing ones) and the
    lines saying which benchmarks are left to run by hand."""
    chosen = [n for n in names() if not only or n in only]
    needs_model = any(n in REUSE for n in chosen)
    standalone = [n for n in chosen if n not in REUSE and n not in BY_HAND]
    if needs_model and "model" not in standalone:
        standalone.append("model")  # the reusing benchmarks need its runs
    commands = [[sys.executable, "-m", f"benchmarks.bench_{n}", *(["--work", work] if n == "model" and needs_model
                                                                  else [])] for n in standalone]
    commands += [[sys.executable, "-m", f"benchmarks.bench_{n}", "--work", work] for n in chosen if n in REUSE]
    skipped = [f"bench_{n}: not run by make bench: {BY_HAND[n]}" for n in chosen if n in BY_HAND]
    return commands, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(names())}")
    only = ap.parse_args(argv).names
    unknown = sorted(set(only) - set(names()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(names())}", file=sys.stderr)
        return 2
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench-model-") as work:
        commands, skipped = plan(only, work)
        for cmd in commands:
            print(f"\n##### {' '.join(cmd[2:])}", flush=True)
            if subprocess.call(cmd, cwd=HERE.parent):
                failed.append(cmd[2])
    for line in skipped:
        print(line)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
