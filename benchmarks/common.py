"""Shared helpers for the benchmark scripts: a printed table and a JSON file per benchmark."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from locdiff.data.storage import remove_stale_temporaries

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,  # the CUDA build torch was compiled for (None: a CPU build)
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def proc_status_bytes(key: str, pid: int | str = "self") -> int:
    """A memory line of /proc/PID/status (VmRSS, VmHWM, ...) in bytes; 0 when the line is absent (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    return 0


def print_table(rows: list[dict[str, Any]], title: str = "") -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if title:
        print(f"\n== {title} ==")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def save(name: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` with this machine's description as RESULTS/NAME.json (or to the path given), atomically:
    the file holds the old results or all of the new ones, never part of them."""
    path = RESULTS / f"{name}.json" if isinstance(name, str) else Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(str(path.with_name(f".{path.name}")))  # those of saves killed inside the write
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
        os.replace(tmp, path)
    finally:  # a full disk: no partial temporary file stays
        tmp.unlink(missing_ok=True)
    print(f"\nwrote {path}")
    return path


def timeit(fn, *, repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of `repeat` calls, in seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def no_options(doc: str | None) -> None:
    """The command line of a benchmark that takes no options: --help prints its docstring, anything else is
    refused (exit 2) before it starts."""
    argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()


def model_config(name: str) -> str:
    """--config of a benchmark: a model config name (configs/model/NAME.yaml) or a YAML path, as
    `locdiff train --config` takes it; an unknown one is the parser's one-line error."""
    from locdiff.errors import UserError
    from locdiff.resources import model_config_path

    try:
        return str(model_config_path(name))
    except (UserError, ValueError, FileNotFoundError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
