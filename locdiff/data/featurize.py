"""The embedding stage: ROOT/NAME/images shards -> ROOT/NAME/features/ENCODER shards + manifest.json.

Feature shard i holds, for every decodable sample of image shard i and under the same key,
`KEY.emb.npy` (the image embedding, float16 by default), `KEY.shdd.npy` (float32 SHDD target of the
location at degree L, when a degree is asked) and `KEY.json` (id, lat, lon). Like ingest it resumes:
finished shards (same inputs, encoder and degree) are skipped. Runs in-process (batched, GPU when there
is one) or, with backend="ray", one Ray actor per GPU (`locdiff.embed.ray_runner`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from typing import Any

import numpy as np
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
from locdiff.data.validation import ChecksumError, RecordError, ShardError, SkipLog, sha256_bytes

log = logging.getLogger(__name__)


def shdd_targets(lat: np.ndarray, lon: np.ndarray, degree: int) -> np.ndarray:
    """(N,) degrees -> (N, (degree+1)**2) float32 SHDD codes (computed in float64)."""
    import torch

    from locdiff.shdd import encode

    return encode(torch.as_tensor(lat, dtype=torch.float64), torch.as_tensor(lon, dtype=torch.float64),
                  degree).to(torch.float32).numpy()


def embed_shard(job: dict[str, Any], encoder) -> dict[str, Any]:  # noqa: ANN001 (an ImageEncoder)
    """Encode one image shard into one feature shard; returns its progress record.

    job: images_url, sha256, shard, out, degree, storage_dtype, batch_size, settings_key.
    """
    data = storage.read_bytes(job["images_url"])
    if sha256_bytes(data) != job["sha256"]:
        raise ChecksumError(f"{job['images_url']}: sha256 {sha256_bytes(data)} differs from the images "
                            f"manifest's {job['sha256']} (damaged shard); re-run `locdiff data ingest`")
    buf = memoryview(data)
    skips = SkipLog()
    keys, metas, images = [], [], []
    for key, parts in group_samples(parse_tar_bytes(buf, what=job["images_url"])):
        if "json" not in parts:
            raise ShardError(f"{job['images_url']}: sample {key} has no json member; the shard is corrupt")
        o, s = parts["json"]
        meta = json_member(buf[o: o + s], url=job["images_url"], key=key)
        try:
            o, s = parts["jpg"]
            images.append(load_rgb(bytes(buf[o: o + s])))  # the one preprocessing: EXIF orientation too
        except (RecordError, KeyError) as err:
            reason = err.reason if isinstance(err, RecordError) else "missing_file"
            skips.add(meta.get("id", key), reason, str(err))
            continue
        keys.append(key)
        metas.append({"id": meta.get("id", key), "lat": meta.get("lat"), "lon": meta.get("lon")})
    bs = int(job["batch_size"])
    embs = [encoder.encode(images[i: i + bs]) for i in range(0, len(images), bs)]
    emb = np.concatenate(embs) if embs else np.zeros((0, encoder.dim), np.float32)
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
                "bytes": os.path.getsize(tmp), "settings_key": job["settings_key"], "dim": int(encoder.dim),
                **skips.to_json()}
        mf.write_progress(out, job["shard"], info)
        storage.put_file_atomic(tmp, storage.join(out, job["shard"]))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return info


def embed(name: str, root: str, encoder: str | EncoderConfig, *, degree: int | None = None,
          backend: str = "local", progress: bool = True) -> dict[str, Any]:
    """Embed the images of ROOT/NAME (and add SHDD targets at `degree`); returns the features manifest.

    Args:
        encoder: an encoder config name (configs/encoders/), a local model folder, a hub id or an
            EncoderConfig; its name is the features folder.
        degree: SHDD degree L of the stored targets; None for none.
        backend: "local" (this process) or "ray" (one actor per GPU; see locdiff.embed.ray_runner).

    Raises:
        FileNotFoundError: the images stage has not completed.
        ChecksumError: an image shard differs from its manifest.
    """
    if degree is not None and (isinstance(degree, bool) or int(degree) != degree or degree < 0):
        raise ValueError(f"--degree must be an integer >= 0, got {degree!r}")
    enc_cfg = encoder if isinstance(encoder, EncoderConfig) else load_encoder_config(encoder)
    images_dir = stage_dir(root, name, "images")
    images = mf.require_manifest(images_dir, "ingest")
    if degree is not None and images.get("unlabelled"):
        raise ValueError(f"{images_dir}: {images['unlabelled']} of {images['count']} images have no "
                         "coordinates, and SHDD targets need them: embed without --degree")
    out = stage_dir(root, name, "features", enc_cfg.name)
    encoder_desc = {"name": enc_cfg.name, "type": enc_cfg.type, "model": enc_cfg.model,
                    "revision": enc_cfg.revision, "normalize": enc_cfg.normalize}
    key = hashlib.sha256(json.dumps([images["shards"], encoder_desc, degree, enc_cfg.storage_dtype,
                                     mf.software_versions()], sort_keys=True).encode()).hexdigest()[:16]
    old = mf.read_manifest(out)
    if old is not None and old.get("settings_key") == key:
        log.info("%s: already complete (%d samples); nothing to do", out, old["count"])
        return old
    if old is not None:
        log.warning("%s: inputs, encoder or degree changed; rewriting the stage", out)
        storage.remove(mf.manifest_path(out))
    with storage.disk_full_is_an_error(out if not storage.is_remote(out) else storage.local_tmp_dir(out)):
        storage.makedirs(out)
        storage.clear_local_tmp(out)  # partial files of a killed run
        jobs = [{"images_url": storage.join(images_dir, s["shard"]), "sha256": s["sha256"], "shard": s["shard"],
                 "out": out, "degree": degree, "storage_dtype": enc_cfg.storage_dtype,
                 "batch_size": enc_cfg.batch_size, "settings_key": key} for s in images["shards"]]
        done = {j["shard"]: mf.shard_finished(out, j["shard"], key) for j in jobs}
        todo = [j for j in jobs if done[j["shard"]] is None]
        log.info("%s: %d of %d shards to embed", out, len(todo), len(jobs))
        if todo and backend == "ray":
            from locdiff.embed.ray_runner import embed_with_ray

            for info in embed_with_ray(todo, enc_cfg):
                done[info["shard"]] = info
        elif todo:
            if backend != "local":
                raise ValueError(f"unknown backend {backend!r}; valid: 'local', 'ray'")
            from locdiff.embed import make_encoder

            model = make_encoder(enc_cfg)
            for job in tqdm(todo, desc=f"embed {name}", unit="shard", disable=not progress):
                done[job["shard"]] = embed_shard(job, model)
        infos = [done[j["shard"]] for j in jobs]
        skips = SkipLog()
        for info in infos:
            skips.merge(info.get("skipped", {}), info.get("skipped_examples", {}))
        dims = {i["dim"] for i in infos if i["count"]}
        if len(dims) > 1:
            raise ValueError(f"{out}: shards of different embedding dimensions {sorted(dims)}")
        dim = dims.pop() if dims else None
        if dim is None:
            from locdiff.embed import make_encoder

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
