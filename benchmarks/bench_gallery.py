"""Retrieval gallery (`locdiff.gallery`): exact flat vs approximate IVF indexes vs today's torch matmul.

For N entries of d-dimensional synthetic embeddings (default N = 100k and 1M, d = 128) and 1,000 held-out
queries, top-10 by cosine similarity:
- build time and peak resident memory of `Gallery.build` from a stream of 50k-row chunks, the index's
  size on disk, load time and peak memory of `Gallery.load`;
- search throughput (queries/s, one batch of 1,000) and recall@1 / recall@10 against exact search
  (the flat index; recall@k = share of the exact top-k found in the returned top-k), for nprobe 8..64;
- the reference of today's code: `knn.cosine_topk(backend="torch")` (the full (N, d) array in memory,
  chunked matrix products and topk);
- HNSW (faiss IndexHNSWFlat, M = 32) at the smallest N only, as a comparison (its build is far slower),
  and IVF-Flat at the smallest N only (the recall of IVF-fp16 at twice its memory).

Each case runs in its own process so that peak memory (VmHWM from /proc, minus the process's resident
size before the case) is that case's alone. The embeddings are drawn from a clustered low-dimensional
mixture (16 latent dimensions, 1,000 clusters, projected to d with a little isotropic noise), generated
chunk by chunk from a seed: real image embeddings also have low intrinsic dimension, but recall on them
can differ, so check it on the real gallery (the numbers here rank the index types; they do not certify a
recall).

    python -m benchmarks.bench_gallery [--sizes 100000 1000000] [--dim 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.common import print_table, proc_status_bytes, save

QUERIES = 1000
K = 10
CHUNK = 50_000
LATENT = 16
CLUSTERS = 1000


# ---------------------------------------------------------------------- synthetic data
class Synth:
    """Deterministic clustered embeddings, generated chunk by chunk."""

    def __init__(self, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.proj = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.centres = rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32)
        self.geo = np.stack([rng.uniform(-60, 70, CLUSTERS), rng.uniform(-180, 180, CLUSTERS)], 1)

    def draw(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        c = rng.integers(0, CLUSTERS, n)
        z = self.centres[c] + 0.35 * rng.standard_normal((n, LATENT), dtype=np.float32)
        x = z @ self.proj + 0.05 * rng.standard_normal((n, self.dim), dtype=np.float32)
        lat = np.clip(self.geo[c, 0] + rng.normal(0, 2, n), -90, 90)
        lon = (self.geo[c, 1] + rng.normal(0, 2, n) + 180) % 360 - 180
        return x, lat, lon

    def chunks(self, n: int):
        for i, s in enumerate(range(0, n, CHUNK)):
            m = min(CHUNK, n - s)
            x, lat, lon = self.draw(m, 1000 + i)
            yield x, lat, lon, np.char.add("e", np.arange(s, s + m).astype(str))

    def queries(self) -> np.ndarray:
        return self.draw(QUERIES, 7)[0]


# ---------------------------------------------------------------------- child process side
def _status(key: str) -> float:
    return proc_status_bytes(key) / 2**20 or float("nan")  # MiB


def _recall(idx: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    r1 = float((idx[:, 0] == ref[:, 0]).mean())
    r10 = float(np.mean([len(np.intersect1d(a, b)) / ref.shape[1] for a, b in zip(idx, ref, strict=True)]))
    return r1, r10


def _search_rate(fn) -> tuple[float, Any]:
    out = fn()  # warm-up (and the result)
    t = time.perf_counter()
    fn()
    return QUERIES / (time.perf_counter() - t), out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import faiss

    from locdiff.gallery import Gallery, GalleryConfig

    faiss.omp_set_num_threads(spec["threads"])
    import torch

    torch.set_num_threads(spec["threads"])
    n, case = spec["n"], spec["case"]
    synth = Synth(spec["dim"])
    q = synth.queries()
    ref = np.load(spec["ref"]) if os.path.exists(spec["ref"]) else None
    base = _status("VmRSS")
    out: dict[str, Any] = {}
    if case == "stream":  # the chunk generator alone: the memory every case below pays for its input
        for _chunk in synth.chunks(n):
            pass
        out["stream_peak_mb"] = _status("VmHWM") - base
        return out
    if case == "torch":
        def cosine_topk(q: np.ndarray, g: np.ndarray, k: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
            """The reference: exact top-k by chunked torch matrix products (what knn did before the gallery)."""
            gt = torch.nn.functional.normalize(torch.from_numpy(g), dim=1)
            qt = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
            parts = [torch.topk(qt[i:i + chunk] @ gt.T, k, dim=1) for i in range(0, len(qt), chunk)]
            return (torch.cat([p.values for p in parts]).numpy(), torch.cat([p.indices for p in parts]).numpy())

        t = time.perf_counter()
        emb = np.empty((n, spec["dim"]), np.float32)
        for i, (x, *_rest) in enumerate(synth.chunks(n)):
            emb[i * CHUNK: i * CHUNK + len(x)] = x
        out["build_s"] = time.perf_counter() - t
        out["build_peak_mb"] = _status("VmHWM") - base
        qps, (_, idx) = _search_rate(lambda: cosine_topk(q, emb, K))
        out["rows"] = [{"qps": qps, "recall": _recall(idx, ref)}]
        out["search_peak_mb"] = _status("VmHWM") - base
        return out
    if case == "hnsw":
        t = time.perf_counter()
        index = faiss.IndexHNSWFlat(spec["dim"], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        for x, *_rest in synth.chunks(n):
            x = np.ascontiguousarray(x)
            faiss.normalize_L2(x)
            index.add(x)
        out["build_s"] = time.perf_counter() - t
        out["build_peak_mb"] = _status("VmHWM") - base
        qn = q.copy()
        faiss.normalize_L2(qn)
        out["rows"] = []
        for ef in (32, 64, 128):
            index.hnsw.efSearch = ef
            qps, (_, idx) = _search_rate(lambda: index.search(qn, K))
            out["rows"].append({"param": f"efSearch={ef}", "qps": qps, "recall": _recall(idx, ref)})
        out["index_mb"] = faiss.serialize_index(index).nbytes / 2**20
        return out
    if case == "load":
        t = time.perf_counter()
        g = Gallery.load(spec["path"])
        out["load_s"] = time.perf_counter() - t
        out["load_peak_mb"] = _status("VmHWM") - base
        out["load_rss_mb"] = _status("VmRSS") - base
        return out
    # a Gallery build: flat (the exact reference) or an IVF kind
    cfg = GalleryConfig(index=case)
    t = time.perf_counter()
    g = Gallery.build(lambda: synth.chunks(n), count=n, config=cfg)
    out["build_s"] = time.perf_counter() - t
    out["build_peak_mb"] = _status("VmHWM") - base
    out["params"] = g.info["build"]
    out["rows"] = []
    if case == "flat":
        qps, (_, idx) = _search_rate(lambda: g.search(q, K))
        np.save(spec["ref"], idx)
        out["rows"].append({"qps": qps, "recall": (1.0, 1.0)})
    else:
        for nprobe in (8, 16, 32, 64):
            g.nprobe = nprobe
            qps, (_, idx) = _search_rate(lambda: g.search(q, K))
            out["rows"].append({"param": f"nprobe={nprobe}", "qps": qps, "recall": _recall(idx, ref)})
    g.save(spec["path"])
    out["index_mb"] = g.info["files"]["index"]["bytes"] / 2**20
    return out


# ---------------------------------------------------------------------- driver
def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_gallery", "--child", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"case {spec['case']} n={spec['n']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--kinds", nargs="+", default=["ivf_fp16", "ivf_sq8", "ivf_flat"],
                    help="approximate indexes at the smallest size")
    ap.add_argument("--large-kinds", nargs="+", default=["ivf_fp16", "ivf_sq8"],
                    help="approximate indexes at the larger sizes (ivf_flat: the recall of ivf_fp16 at twice "
                         "its memory, shown at the smallest size)")
    ap.add_argument("--no-hnsw", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    streams: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            ref = os.path.join(tmp, f"ref-{n}.npy")
            streams[n] = run_child({"case": "stream", "n": n, "dim": args.dim, "threads": args.threads,
                                    "ref": ref, "path": ""})["stream_peak_mb"]
            kinds = args.kinds if n == min(args.sizes) else args.large_kinds
            cases = ["flat", "torch", *kinds]
            if n == min(args.sizes) and not args.no_hnsw:
                cases.append("hnsw")
            for case in cases:
                spec = {"case": case, "n": n, "dim": args.dim, "threads": args.threads, "ref": ref,
                        "path": os.path.join(tmp, f"{case}-{n}")}
                t = time.perf_counter()
                r = run_child(spec)
                if case in ("flat", *kinds):
                    r.update(run_child({**spec, "case": "load"}))
                print(f"  n={n:,} {case}: {time.perf_counter() - t:.1f} s", flush=True)
                name = {"torch": "torch matmul (knn today)", "hnsw": "hnsw32"}.get(case, case)
                if case != "flat" and "factory" in r.get("params", {}):
                    name = f"{case} ({r['params']['factory']})"
                for s in r["rows"]:
                    rows.append({
                        "n": n, "index": name, "param": s.get("param", ""), "qps": s["qps"],
                        "recall@1": s["recall"][0], "recall@10": s["recall"][1],
                        "build_s": r.get("build_s"), "build_peak_mb": r.get("build_peak_mb"),
                        "index_mb": r.get("index_mb"), "load_s": r.get("load_s"),
                        "load_peak_mb": r.get("load_peak_mb"),
                    })
            flat_qps = next(r["qps"] for r in rows if r["n"] == n and r["index"] == "flat")
            for r in rows:
                if r["n"] == n:
                    r["qps_vs_flat"] = r["qps"] / flat_qps
    print_table(rows, f"gallery: top-{K} of {QUERIES} queries, d={args.dim}, {args.threads} threads")
    print("\npeak memory of generating the input chunks alone (included in build_peak_mb): "
          + ", ".join(f"n={n:,}: {v:.0f} MB" for n, v in streams.items()))
    save("gallery", {"stream_peak_mb": streams, "queries": QUERIES, "k": K, "dim": args.dim, "threads": args.threads,
                     "chunk_rows": CHUNK, "data": f"clustered: {CLUSTERS} clusters in {LATENT} latent dims",
                     "total_s": time.perf_counter() - t0, "rows": rows})


if __name__ == "__main__":
    main()
