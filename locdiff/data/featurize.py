"""The embedding stage: ROOT/NAME/images shards -> ROOT/NAME/features/ENCODER shards + manifest.json.

Feature shard i holds, for every decodable sample of image shard i and under the same key,
`KEY.emb.npy` (the image embedding, float16 by default), `KEY.shdd.npy` (float32 SHDD target of the
location at degree L, when a degree is asked) and `KEY.json` (id, lat, lon). Like ingest it resumes:
finished shards (same inputs, encoder and degree) are skipped. Runs in this process (batched, GPU when
there is one) or on Ray Data (`locdiff.embed.ray_runner`: shards decoded in parallel, one model per actor,
GPU actors when there are GPUs); both write the same shards through `write_feature_shard`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from locdiff.data import manifest as mf
from locdiff.data import storage
from locdiff.data.config import EncoderConfig, load_encoder_config
from locdiff.data.images import load_rgb
from locdiff.data.shards import (
    group_samples,
    json_bytes,
    json_member,
    npy_bytes,
    parse_tar_bytes,
    stage_dir,
    write_tar,
)
from locdiff.data.validation import (
    ChecksumError,
    RecordError,
    ShardError,
    SkipLog,
    check_record_coordinates,
    sha256_bytes,
)
from locdiff.embed import make_encoder
from locdiff.embed.ray_runner import embed_with_ray
from locdiff.orchestration.ray_session import RayUnavailable
from locdiff.shdd import encode

if TYPE_CHECKING:
    from PIL import Image

    from locdiff.embed.base import ImageEncoder

log = logging.getLogger(__name__)

RUNNERS = ("auto", "local", "ray")
# runner "auto" uses Ray only for jobs this large: a Ray run costs about 10 CPU-seconds before its first
# image (actors load the model, decode workers start), as much as decoding 3000 images (bench_embed)
RAY_MIN_SHARDS = 2
RAY_MIN_IMAGES = 5000
LOCAL_THREADS = 4  # shards embedded at a time by the local runner (at most; one per CPU)


def shdd_targets(lat: np.ndarray, lon: np.ndarray, degree: int) -> np.ndarray:
    """(N,) degrees -> (N, (degree+1)**2) float32 SHDD codes (computed in float64)."""

    return encode(torch.as_tensor(lat, dtype=torch.float64), torch.as_tensor(lon, dtype=torch.float64),
                  degree).to(torch.float32).numpy()


def read_shard_chunks(job: dict[str, Any], preprocess: Callable[[list[Image.Image]], np.ndarray]
                      ) -> Iterator[dict[str, Any]]:
    """Read one image shard, check its sha256 and decode it into chunks of up to job["batch_size"]
    decodable samples, preprocessed for the encoder.

    Every runner embeds these same chunks as its batches, so the local and Ray runners give the same
    embeddings. A chunk: shard, index (0, 1, ...), keys, metas ({id, lat, lon} each), inputs (the
    encoder's input array, or an empty float32 array for a shard without a decodable sample) and last
    (True on the shard's final chunk, which also carries `skipped`: SkipLog.to_json() of the shard).

    Raises:
        ChecksumError: the shard differs from the images manifest.
    """
    data = mf.read_shard_bytes(job["images_url"], job)
    if sha256_bytes(data) != job["sha256"]:
        raise ChecksumError(f"{job['images_url']}: sha256 {sha256_bytes(data)} differs from the images "
                            f"manifest's {job['sha256']} (damaged shard); re-run `locdiff data ingest`")
    buf = memoryview(data)
    skips = SkipLog()
    bs = int(job["batch_size"])
    keys: list[str] = []
    metas: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    index = 0
    seen = 0

    def chunk(last: bool) -> dict[str, Any]:
        inputs = preprocess(images) if images else np.zeros((0,), np.float32)
        out = {"shard": job["shard"], "index": index, "keys": list(keys), "metas": list(metas),
               "inputs": inputs, "last": last}
        if last:
            out["skipped"] = skips.to_json()
        return out

    for key, parts in group_samples(parse_tar_bytes(buf, what=job["images_url"])):
        if "json" not in parts:
            raise ShardError(f"{job['images_url']}: sample {key} has no json member; the shard is corrupt")
        if "/" in key or "\\" in key or key.startswith("."):  # the key names the features shard's members
            raise ShardError(f"{job['images_url']}: sample key {key[:100]!r} is not a plain name (a path in a "
                             "member's name); the shard is corrupt")
        o, s = parts["json"]
        meta = json_member(buf[o: o + s], url=job["images_url"], key=key)
        seen += 1
        try:
            if meta.get("lat") is not None or meta.get("lon") is not None:  # both null: an unlabelled photo
                check_record_coordinates(meta.get("lat"), meta.get("lon"))  # a crafted "lat": "n", NaN or 999
            o, s = parts["jpg"]
            image = load_rgb(bytes(buf[o: o + s]))  # the one preprocessing: EXIF orientation too
        except (RecordError, KeyError) as err:
            reason = err.reason if isinstance(err, RecordError) else "missing_file"
            skips.add(meta.get("id", key), reason, str(err))
            continue
        if len(images) == bs:  # a full batch, and more samples follow
            yield chunk(last=False)
            keys, metas, images = [], [], []
            index += 1
        keys.append(key)
        metas.append({"id": meta.get("id", key), "lat": meta.get("lat"), "lon": meta.get("lon")})
        images.append(image)
    if job.get("count") is not None and seen != job["count"]:
        raise ShardError(f"{job['images_url']}: {seen} samples, the images manifest says {job['count']}; the shard "
                         "is corrupt (re-run `locdiff data ingest`)")
    yield chunk(last=True)


def write_feature_shard(job: dict[str, Any], keys: list[str], metas: list[dict[str, Any]], emb: np.ndarray,
                        skipped: dict[str, Any], dim: int) -> dict[str, Any]:
    """Write one feature shard (embeddings in job["storage_dtype"], SHDD targets at job["degree"]) and
    its progress record, atomically; returns the progress record."""
    emb = emb.astype(job["storage_dtype"])
    shdd = None
    if job["degree"] is not None and keys:
        shdd = shdd_targets(np.array([m["lat"] for m in metas]), np.array([m["lon"] for m in metas]),
                            int(job["degree"]))
    samples = []
    for i, key in enumerate(keys):
        parts = {"emb.npy": npy_bytes(emb[i]), "json": json_bytes(metas[i])}
        if shdd is not None:
            parts["shdd.npy"] = npy_bytes(shdd[i])
        samples.append((key, parts))
    out = job["out"]
    tmp = os.path.join(storage.local_tmp_dir(out), f"{job['shard']}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        count, digest = write_tar(tmp, samples)
        info = {"shard": job["shard"], "count": count, "sha256": digest,
                "bytes": os.path.getsize(tmp), "settings_key": job["settings_key"], "dim": int(dim),
                **skipped}
        mf.write_progress(out, job["shard"], info)
        storage.put_file_atomic(tmp, storage.join(out, job["shard"]))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return info


def embed_shard(job: dict[str, Any], encoder: ImageEncoder) -> dict[str, Any]:
    """Encode one image shard into one feature shard in this process; returns its progress record.

    job: images_url, sha256, shard, out, degree, storage_dtype, batch_size, settings_key.
    """
    keys: list[str] = []
    metas: list[dict[str, Any]] = []
    embs: list[np.ndarray] = []
    skipped: dict[str, Any] = {}
    for c in read_shard_chunks(job, encoder.preprocess):
        keys += c["keys"]
        metas += c["metas"]
        if c["keys"]:
            embs.append(encoder.embed(c["inputs"]))
        if c["last"]:
            skipped = c["skipped"]
    emb = np.concatenate(embs) if embs else np.zeros((0, encoder.dim), np.float32)
    return write_feature_shard(job, keys, metas, emb, skipped, encoder.dim)


def embed_shards_local(jobs: list[dict[str, Any]], encoder: ImageEncoder, *, threads: int | None = None,
                       progress: bool = True, desc: str = "embed") -> Iterator[dict[str, Any]]:
    """`embed_shard` for every job in this process, `threads` shards at a time (default: one per CPU,
    at most LOCAL_THREADS): JPEG decoding and resizing release the GIL, so the threads decode in
    parallel while the model runs. Yields each shard's progress record as it is written."""

    threads = max(1, min(len(jobs), threads or min(os.cpu_count() or 1, LOCAL_THREADS)))
    with tqdm(total=len(jobs), desc=desc, unit="shard", disable=not progress) as bar, \
            ThreadPoolExecutor(threads, thread_name_prefix="embed") as pool:
        queue = iter(jobs)
        running = {pool.submit(embed_shard, job, encoder) for job in itertools.islice(queue, threads)}
        try:
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    info = future.result()
                    bar.update(1)
                    yield info
                    running |= {pool.submit(embed_shard, job, encoder) for job in itertools.islice(queue, 1)}
        finally:
            for future in running:
                future.cancel()


def choose_runner(runner: str, todo: list[dict[str, Any]]) -> str:
    """"local" or "ray" for the shard jobs `todo`.

    "auto" picks Ray when it is installed, the job has at least RAY_MIN_SHARDS shards and RAY_MIN_IMAGES
    images, and Ray has more to work with than this process's threads: a cluster (RAY_ADDRESS), several
    GPUs, or more CPUs than LOCAL_THREADS. On 2 cores the local runner was the faster (bench_embed).
    """
    if runner not in RUNNERS:
        raise ValueError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner != "auto":
        return runner

    images = sum(int(j.get("count") or 0) for j in todo)
    if len(todo) < RAY_MIN_SHARDS or images < RAY_MIN_IMAGES or importlib.util.find_spec("ray") is None:
        return "local"

    if os.environ.get("RAY_ADDRESS") or torch.cuda.device_count() > 1 or (os.cpu_count() or 1) > LOCAL_THREADS:
        return "ray"
    return "local"


def embed(name: str, root: str, encoder: str | EncoderConfig, *, degree: int | None = None,
          runner: str = "auto", num_actors: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Embed the images of ROOT/NAME (and add SHDD targets at `degree`); returns the features manifest.

    Args:
        encoder: an encoder config name (configs/encoders/), a local model folder, a hub id or an
            EncoderConfig; its name is the features folder.
        degree: SHDD degree L of the stored targets; None for none.
        runner: "local" (this process, a few shards at a time on threads: `embed_shards_local`), "ray"
            (Ray Data: shards decoded in parallel tasks, one model per actor, GPU actors when the cluster
            has GPUs; see locdiff.embed.ray_runner) or "auto" (see `choose_runner`). Every runner writes
            the same shards.
        num_actors: Ray runner only: the most encoder actors (default: see `embed_with_ray`).

    Raises:
        FileNotFoundError: the images stage has not completed.
        ChecksumError: an image shard differs from its manifest.
        RayUnavailable: runner "ray" and Ray could not be started or reached ("auto" embeds locally).
    """
    if degree is not None and (isinstance(degree, bool) or int(degree) != degree or degree < 0):
        raise ValueError(f"--degree must be an integer >= 0, got {degree!r}")
    if runner not in RUNNERS:
        raise ValueError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    enc_cfg = encoder if isinstance(encoder, EncoderConfig) else load_encoder_config(encoder)
    images_dir = stage_dir(root, name, "images")
    images = mf.require_manifest(images_dir, "ingest")
    entries = mf.shard_entries(images, images_dir)  # checked: a crafted manifest cannot name a file outside
    if degree is not None and images.get("unlabelled"):
        raise ValueError(f"{images_dir}: {images['unlabelled']} of {images['count']} images have no "
                         "coordinates, and SHDD targets need them: embed without --degree")
    out = stage_dir(root, name, "features", enc_cfg.name)
    encoder_desc = {"name": enc_cfg.name, "type": enc_cfg.type, "model": enc_cfg.model,
                    "revision": enc_cfg.revision, "normalize": enc_cfg.normalize}
    identity = encoder_desc if not str(enc_cfg.revision or "").startswith("sha256:") \
        else {**encoder_desc, "model": None}  # a packaged encoder: its digest, wherever its folder lies
    key = hashlib.sha256(json.dumps([images["shards"], identity, degree, enc_cfg.storage_dtype,
                                     mf.software_versions()], sort_keys=True).encode()).hexdigest()[:16]
    old = mf.read_manifest(out)
    if old is not None and old.get("settings_key") == key:
        log.info("%s: already complete (%d samples); nothing to do", out, old["count"])
        return old
    if old is not None:
        log.warning("%s: inputs, encoder or degree changed; rewriting the stage", out)
        storage.remove(mf.manifest_path(out))
    with storage.disk_full_is_an_error(out if not storage.is_remote(out) else storage.local_tmp_dir(out)), \
            storage.removed_if_failed_empty(out):  # a failed fresh run (no encoder, say) leaves no empty folder
        storage.makedirs(out)
        storage.clear_local_tmp(out)  # partial files of a killed run
        jobs = [{"images_url": storage.join(images_dir, s["shard"]), "sha256": s["sha256"], "shard": s["shard"],
                 "count": s["count"], "bytes": s["bytes"], "out": out, "degree": degree,
                 "storage_dtype": enc_cfg.storage_dtype, "batch_size": enc_cfg.batch_size, "settings_key": key}
                for s in entries]
        done = {j["shard"]: mf.shard_finished(out, j["shard"], key) for j in jobs}
        todo = [j for j in jobs if done[j["shard"]] is None]
        chosen = choose_runner(runner, todo) if todo else "local"
        log.info("%s: %d of %d shards to embed (%s runner)", out, len(todo), len(jobs), chosen)
        if todo and chosen == "ray":
            try:
                for info in embed_with_ray(todo, enc_cfg, read_chunks=read_shard_chunks,
                                           write_shard=write_feature_shard, num_actors=num_actors,
                                           progress=progress, desc=f"embed {name}"):
                    done[info["shard"]] = info
            except RayUnavailable as err:
                if runner == "ray":
                    raise
                log.warning("%s; embedding in this process instead", err)
                chosen = "local"
                todo = [j for j in jobs if done[j["shard"]] is None]
        if todo and chosen == "local":
            model = make_encoder(enc_cfg)
            for info in embed_shards_local(todo, model, progress=progress, desc=f"embed {name}"):
                done[info["shard"]] = info
        infos = [done[j["shard"]] for j in jobs]
        skips = SkipLog()
        for info in infos:
            skips.merge(info.get("skipped", {}), info.get("skipped_examples", {}))
        dims = {i["dim"] for i in infos if i["count"]}
        if len(dims) > 1:
            raise ValueError(f"{out}: shards of different embedding dimensions {sorted(dims)}")
        dim = dims.pop() if dims else None
        if dim is None:
            dim = make_encoder(enc_cfg).dim
        manifest = {
            "stage": "features", "dataset": name, "encoder": encoder_desc,
            "embedding": {"dim": dim, "dtype": enc_cfg.storage_dtype, "shape": [dim]},
            "degree": degree,
            "shdd": None if degree is None else {"degree": degree, "dim": (degree + 1) ** 2, "dtype": "float32",
                                                 "shape": [(degree + 1) ** 2]},
            "inputs": {"images_manifest": {k: images.get(k) for k in ("settings_key", "count")},
                       "images_shards_sha256": hashlib.sha256(json.dumps(images["shards"]).encode()).hexdigest()},
            "settings_key": key, "software": mf.software_versions(),
            "count": sum(i["count"] for i in infos),
            "shards": [{k: i[k] for k in ("shard", "count", "sha256", "bytes")} for i in infos],
            **skips.to_json(),
        }
        path = mf.write_manifest(out, manifest)
        log.info("%s: %d embeddings (dim %d) in %d shards", path, manifest["count"], dim, len(infos))
        return manifest
