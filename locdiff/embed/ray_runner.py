"""The embedding stage on Ray Data: shards decoded in parallel CPU tasks, one encoder per actor.

    shard jobs --flat_map, CPU tasks--> chunks: read a shard, check it, decode, preprocess (no weights)
               --map_batches, actor pool--> embeddings: one model per actor, on a GPU when the cluster
                                            has GPUs (`gpus_per_actor` each), else on CPU
               --driver--> a shard's chunks gathered, then `write_shard` writes its feature shard

Ray Data streams the chunks (its backpressure bounds the memory in flight). The caller hands in the
functions that read and write shards (`locdiff.data.featurize.read_shard_chunks` and
`write_feature_shard`), so this module knows nothing of the shard format and the chunks are the local
runner's batches: both runners write the same shards. A shard is written as soon as its last chunk is
embedded, so a killed run resumes from its finished shards like the local runner.

Resources: decode tasks ask for 0.75 CPU and, on a CPU-only cluster, actors for half a CPU, so that on
2 cores two decode tasks and an actor run side by side and never starve each other (STACK.md: 1-CPU
actors on 2 cores hung Ray Data); Ray runs each actor's torch on one thread. Ray is imported inside
functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from locdiff.data.config import EncoderConfig
from locdiff.embed import make_encoder, make_preprocessor
from locdiff.orchestration.ray_session import ensure_ray

log = logging.getLogger(__name__)

READ_CPUS = 0.75  # per decode task: on 2 CPUs, two decode tasks and one half-CPU actor
CPU_ACTOR_CPUS = 0.5  # per encoder actor on a CPU-only cluster
GPU_ACTOR_CPUS = 1.0  # per encoder actor on a GPU (half a CPU where CPUs are scarce)

ReadChunks = Callable[[dict[str, Any], Callable], Iterator[dict[str, Any]]]
WriteShard = Callable[[dict[str, Any], list[str], list[dict[str, Any]], np.ndarray, dict[str, Any], int],
                      dict[str, Any]]

_PREPROCESSORS: dict[str, Any] = {}  # per worker process: the preprocessor of each encoder config


def _preprocessor(cfg_json: str) -> Any:
    if cfg_json not in _PREPROCESSORS:
        _PREPROCESSORS[cfg_json] = make_preprocessor(EncoderConfig(**json.loads(cfg_json)))
    return _PREPROCESSORS[cfg_json]


def _read(row: dict[str, Any], *, read_chunks: ReadChunks, cfg_json: str) -> Iterator[dict[str, Any]]:
    """flat_map: one shard job -> its chunks (decoded and preprocessed), one row each."""
    job = json.loads(row["job"])
    for c in read_chunks(job, _preprocessor(cfg_json)):
        yield {"job": row["i"], "index": c["index"], "last": c["last"], "inputs": c["inputs"],
               "meta": json.dumps({"keys": c["keys"], "metas": c["metas"], "skipped": c.get("skipped")})}


class _Embedder:
    """A Ray Data actor: loads the encoder once, then embeds one chunk per row."""

    def __init__(self, cfg_json: str) -> None:
        self.encoder = make_encoder(EncoderConfig(**json.loads(cfg_json)))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        embs = [self.encoder.embed(np.asarray(x, np.float32)) for x in batch["inputs"]]
        return {"job": batch["job"], "index": batch["index"], "last": batch["last"], "meta": batch["meta"],
                "emb": [e.astype(np.float32).tobytes() for e in embs],
                "dim": np.full(len(embs), self.encoder.dim, np.int64)}


def _unwrap(err: BaseException) -> BaseException:
    """The user-facing error (ValueError, FileNotFoundError ...) inside Ray's wrappers, else `err`."""
    seen = err
    while seen is not None:
        if isinstance(seen, ValueError | FileNotFoundError | PermissionError):
            return seen
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return err


def embed_with_ray(jobs: list[dict[str, Any]], cfg: EncoderConfig, *, read_chunks: ReadChunks,
                   write_shard: WriteShard, num_actors: int | None = None, gpus_per_actor: float = 1.0,
                   progress: bool = True, desc: str = "embed") -> Iterator[dict[str, Any]]:
    """Embed every shard job on Ray Data; yields each shard's progress record as it is written.

    Uses the cluster at RAY_ADDRESS, else a local Ray (`locdiff.orchestration.ray_session.ensure_ray`).

    Args:
        jobs: shard jobs (JSON-able dicts with a "shard" name), as `read_chunks` and `write_shard` take.
        read_chunks: (job, preprocess) -> the shard's chunks: index, last, keys, metas, inputs, and on
            the last chunk `skipped`; runs in Ray tasks.
        write_shard: (job, keys, metas, embeddings, skipped, dim) -> progress record; runs here.
        num_actors: encoder actors; default one per `gpus_per_actor` GPUs, or without GPUs a pool that
            Ray Data grows from 1 up to half the cluster's CPUs while chunks wait for an actor.
        gpus_per_actor: GPUs each actor asks for (0.5 puts two models on a GPU).

    Raises:
        RayUnavailable: Ray could not be started or reached.
        ChecksumError (and the other errors of read_chunks / write_shard), raised as themselves.
    """
    import ray

    ensure_ray()
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 1.0))
    gpus = 0.0 if (cfg.device or "").startswith("cpu") else float(resources.get("GPU", 0.0))
    if gpus >= gpus_per_actor > 0:
        n = num_actors or max(1, int(gpus // gpus_per_actor))
        actor_cpus = GPU_ACTOR_CPUS if cpus >= 4 * n else CPU_ACTOR_CPUS
        pool = ray.data.ActorPoolStrategy(size=n)
        actor = {"num_gpus": gpus_per_actor, "num_cpus": actor_cpus}
    else:
        n = num_actors or max(1, int(cpus // 2))
        pool = ray.data.ActorPoolStrategy(size=n) if num_actors else ray.data.ActorPoolStrategy(min_size=1,
                                                                                               max_size=n)
        actor = {"num_cpus": CPU_ACTOR_CPUS}
    cfg_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # one bar, over shards, below
    ds = ray.data.from_items([{"i": i, "job": json.dumps(j)} for i, j in enumerate(jobs)],
                             override_num_blocks=len(jobs))
    ds = ds.flat_map(_read, fn_kwargs={"read_chunks": read_chunks, "cfg_json": cfg_json}, num_cpus=READ_CPUS)
    ds = ds.map_batches(_Embedder, fn_constructor_kwargs={"cfg_json": cfg_json}, batch_size=1, compute=pool,
                        **actor)
    log.info("ray: %d shards, up to %d encoder actor(s) (%s)", len(jobs), n,
             f"{gpus_per_actor} GPU each" if "num_gpus" in actor else f"{actor['num_cpus']} CPU each")
    chunks: dict[int, dict[int, dict[str, Any]]] = {}
    sizes: dict[int, int] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="shard", disable=not progress)
    written = 0
    try:
        for row in ds.iter_rows():
            j = int(row["job"])
            chunks.setdefault(j, {})[int(row["index"])] = row
            if row["last"]:
                sizes[j] = int(row["index"]) + 1
            if len(chunks[j]) != sizes.get(j):
                continue
            got = chunks.pop(j)
            parts = [got[i] for i in range(sizes[j])]
            metas = [json.loads(p["meta"]) for p in parts]
            dim = int(parts[0]["dim"])
            emb = np.frombuffer(b"".join(p["emb"] for p in parts), np.float32).reshape(-1, dim)
            info = write_shard(jobs[j], [k for m in metas for k in m["keys"]],
                               [x for m in metas for x in m["metas"]], emb, metas[-1]["skipped"], dim)
            written += 1
            bar.update(1)
            yield info
    except Exception as err:
        cause = _unwrap(err)
        if cause is err:
            raise
        raise cause from None
    finally:
        bar.close()
        ctx.enable_progress_bars = saved
    if written != len(jobs):  # only if Ray Data lost rows: fail rather than write a short manifest
        raise RuntimeError(f"ray: {len(jobs) - written} of {len(jobs)} shards never completed")
    log.info("ray: embedded %d shards", len(jobs))
    log.debug("ray data stats:\n%s", ds.stats())
