"""The ingest stage: a source's records -> ROOT/NAME/images/shard-NNNNNN.tar + manifest.json.

Records are validated first (ids, coordinates) and numbered in source order; record i goes to shard
i // shard_size under key %09d. Each shard is fetched, validated, written to a temporary file and moved
into place after its progress record; shards already finished with the same settings (and, from a local
folder, the same size and mtime of each photo: one replaced under its name is ingested again) are skipped,
so a re-run after a crash resumes and ends with the same bytes and manifest as an uninterrupted run. A full
disk stops the stage with a NoSpaceError naming the folder; the shard being written leaves no file
behind and the finished ones stay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from locdiff.data import manifest as mf
from locdiff.data import storage
from locdiff.data.config import DatasetConfig, load_dataset_config
from locdiff.data.exif import DISAGREE_KM, distance_km, gps_or_none
from locdiff.data.images import StoredImage, prepare_image
from locdiff.data.shards import json_bytes, sample_key, shard_name, stage_dir, write_tar
from locdiff.data.sources import Plan, Record, Source, make_source
from locdiff.data.sources.embeddings import ingest_embeddings
from locdiff.data.validation import RecordError, SkipLog, SourceError, check_checksum

log = logging.getLogger(__name__)

# seconds to sleep per record: lets tests interrupt an ingest part-way (never set in normal use)
DELAY_ENV = "LOCDIFF_INGEST_DELAY"


def _settings_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Loaded:
    image: StoredImage
    gps: tuple[float, float] | None = None  # the photo's EXIF GPS tag (exif_coordinates)
    gps_problem: str | None = None  # why a present tag was unusable


def _load(src: Source, cfg: DatasetConfig, rec: Record) -> Loaded | RecordError:
    """Fetch, checksum and validate one record's image (and read its GPS tag when the config says so);
    a RecordError is returned, not raised."""
    try:
        data = src.fetch(rec)
        if rec.sha256:
            try:
                check_checksum(data, sha256=rec.sha256, what=rec.ref)
            except ValueError as err:
                log.error("%s: %s", rec.id, err)
                raise RecordError("checksum_mismatch", str(err)) from None
        try:
            image = prepare_image(data, max_side=cfg.max_side, quality=cfg.jpeg_quality, verify=cfg.verify,
                                  max_pixels=cfg.max_image_pixels)
            return Loaded(image, *gps_or_none(data)) if cfg.exif_coordinates else Loaded(image)
        except (RecordError, MemoryError):
            raise
        except Exception as err:  # a crafted file can trip an image plugin in other ways: one record
            raise RecordError("undecodable", f"{type(err).__name__}: {err}") from None
    except RecordError as err:
        return err


def _write_shard(src: Source, cfg: DatasetConfig, out: str, index: int, records: list[Record],
                 settings_key: str, pool: ThreadPoolExecutor | None, progress: tqdm) -> dict[str, Any]:
    name = shard_name(index)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    skips = SkipLog()
    samples = []
    unlabelled = 0
    exif = {"labelled": 0, "disagree": 0, "malformed": 0}

    def load(r: Record) -> Loaded | RecordError:
        return _load(src, cfg, r)

    results = pool.map(load, records) if pool else map(load, records)
    for rec, res in zip(records, results, strict=True):
        if delay:
            time.sleep(delay)
        progress.update(1)
        if isinstance(res, RecordError):
            skips.add(rec.id, res.reason, res.detail)
            continue
        lat, lon = rec.lat, rec.lon
        if res.gps_problem:
            exif["malformed"] += 1
            log.warning("%s: GPS tag ignored (%s)", rec.id, res.gps_problem)
        if res.gps is not None and lat is None:
            (lat, lon), exif["labelled"] = res.gps, exif["labelled"] + 1
        elif res.gps is not None and distance_km(res.gps, lat, lon) > DISAGREE_KM:
            exif["disagree"] += 1  # the metadata's coordinates win
            log.info("%s: the metadata's coordinates are %.1f km from the photo's GPS tag; the metadata's kept",
                     rec.id, distance_km(res.gps, lat, lon))
        if lat is None and cfg.coordinates == "required":
            skips.add(rec.id, "no_coordinates", "no coordinates in the metadata and no GPS tag in the photo")
            continue
        unlabelled += lat is None
        meta = {"id": rec.id, "lat": lat, "lon": lon, "width": res.image.width, "height": res.image.height,
                "dataset": cfg.name, "source": rec.meta, "ref": rec.ref}
        if res.gps is not None:
            meta["exif"] = {"lat": res.gps[0], "lon": res.gps[1]}
        samples.append((sample_key(rec.index), {"jpg": res.image.data, "json": json_bytes(meta)}))
    tmp = os.path.join(storage.local_tmp_dir(out),
                       f"{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        count, digest = write_tar(tmp, samples)
        info = {"shard": name, "count": count, "sha256": digest, "bytes": os.path.getsize(tmp),
                "settings_key": settings_key, "first_key": samples[0][0] if samples else None,
                "unlabelled": unlabelled, "exif": exif, **skips.to_json()}
        mf.write_progress(out, name, info)  # before the shard appears: a visible shard is a finished one
        storage.put_file_atomic(tmp, storage.join(out, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return info


# settings that were added later: in the settings key only when not at their default, so stages
# written before them stay complete
_LIMIT_SETTINGS = ("coordinates", "allow_private_addresses", "max_image_bytes", "max_image_pixels",
                   "exif_coordinates")


TEST_PARTS = ("train", "test")


def in_test_part(record_id: str, share: float) -> bool:
    """Whether a record belongs to the test part of a `test_share` split: a stable hash of its id (the
    same photo falls on the same side on every run and every machine)."""
    return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") < share * 2**64


def _split_plan(plan: Any, share: float, part: str) -> Any:
    """The plan with only the records of one part (the train part keeps the rows skipped while planning); the
    whole plan's records are closed."""
    try:
        records = plan.records.filtered(lambda r: in_test_part(r.id, share) == (part == "test"))
    finally:
        plan.close()
    skips = plan.skips if part == "train" else SkipLog()
    return dataclasses.replace(plan, records=records, rows=len(records) + skips.total, skips=skips)


def ingest(name: str, root: str, *, source: str | None = None, limit: int | None = None,
           config: DatasetConfig | None = None, progress: bool = True,
           test_share: float | None = None, part: str = "train") -> dict[str, Any]:
    """Ingest data set NAME into ROOT/NAME/images; returns the manifest.

    Reads only what the source names: file references stay inside the source, image URLs are
    http(s):// or s3:// on public addresses (unless the config allows private ones), every read has a
    byte limit and every image a pixel limit; whatever is refused is skipped and counted by reason.

    Args:
        name: data set name (configs/datasets/NAME.yaml) and folder under ROOT.
        root: a local folder or s3://bucket/prefix.
        source: a folder, archive, CSV, http(s) URL or s3:// URL to read instead of the published URLs.
        limit: only the first N rows of the metadata.
        config: a DatasetConfig to use instead of configs/datasets/NAME.yaml.
        test_share, part: keep only one part of a split of the records by a stable hash of their id:
            `part` "test" keeps about `test_share` of them, "train" the others (`ingest_split` writes both).

    Raises:
        SourceError: the source as a whole is unusable (no CSV, no coordinate columns, ...).
        ChecksumError: a file differs from its published checksum.
        storage.NoSpaceError: the disk filled up (a ValueError naming the folder; finished shards stay).
    """
    cfg = config or load_dataset_config(name)
    for what, url in (("--source", source), ("--root", root), (f"data set {cfg.name!r}: metadata.url",
                                                                cfg.metadata.url),
                      (f"data set {cfg.name!r}: images.url", cfg.images.url)):
        storage.check_no_credentials(url, what)  # before any read or write
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if cfg.source == "embeddings":
        if test_share is not None:  # its rows are copied whole: both parts would hold every row
            raise ValueError(f"--test-share: data set {cfg.name!r} (an embeddings table) is not split; split the "
                             "table itself and ingest each part under its own NAME")
        features = stage_dir(root, name, "features", cfg.encoder)
        with storage.disk_full_is_an_error(features if not storage.is_remote(features)
                                           else storage.local_tmp_dir(features)):
            return ingest_embeddings(cfg, name, root, source=source, limit=limit)
    if test_share is not None and not 0 < test_share < 1:
        raise ValueError(f"--test-share must be a number between 0 and 1, both excluded; got {test_share}")
    if test_share is not None and part not in TEST_PARTS:
        raise ValueError(f"the part of a split ingest must be one of {', '.join(TEST_PARTS)}; got {part!r}")
    out = stage_dir(root, name, "images")
    src = make_source(cfg, source)
    plan = src.plan(limit)
    try:
        if test_share is not None:
            plan = _split_plan(plan, test_share, part)
        return _ingest_plan(src, plan, cfg, name, root, out, source, limit, test_share, part, progress)
    finally:
        plan.close()
        src.close()


def _ingest_plan(src: Source, plan: Plan, cfg: DatasetConfig, name: str, root: str, out: str, source: str | None,
                 limit: int | None, test_share: float | None, part: str, progress: bool) -> dict[str, Any]:
    settings = {"max_side": cfg.max_side, "jpeg_quality": cfg.jpeg_quality, "verify": cfg.verify,
                "shard_size": cfg.shard_size, "limit": limit}
    if test_share is not None:
        settings["split"] = {"test_share": test_share, "part": part}
    defaults = DatasetConfig(name=cfg.name, source=cfg.source)
    settings.update({k: getattr(cfg, k) for k in _LIMIT_SETTINGS if getattr(cfg, k) != getattr(defaults, k)})
    key = _settings_key([settings, plan.provenance, len(plan.records), mf.software_versions()])
    # a photo replaced under its name in a local folder (its size or mtime): its shard is written again
    size = cfg.shard_size
    n_shards = -(-len(plan.records) // size)
    if src.versions([]) is None:  # the source cannot tell
        shard_keys, files_key = [key] * n_shards, None
    else:
        shard_keys = [_settings_key([key, src.versions(chunk)]) for chunk in plan.records.chunks(size)]
        files_key = _settings_key(shard_keys)
    old = mf.read_manifest(out)
    if old is not None and old.get("settings_key") == key and old.get("files_key") == files_key:
        log.info("%s: already complete (%d samples); nothing to do", out, old["count"])
        return old
    if old is not None:  # a different ingest of the same name: the stage is incomplete until rewritten
        log.warning("%s: settings or source changed; rewriting the stage", out)
        storage.remove(mf.manifest_path(out))
    with storage.disk_full_is_an_error(out if not storage.is_remote(out) else storage.local_tmp_dir(out)):
        storage.makedirs(out)
        storage.clear_local_tmp(out)  # partial files of a killed run
        if hasattr(src, "prepare"):
            src.prepare(plan, root, name)
        shards: list[dict[str, Any]] = []
        skips = SkipLog()
        skips.merge(plan.skips.counts, plan.skips.examples)
        pool = ThreadPoolExecutor(max(1, cfg.workers)) if src.parallel else None
        bar = tqdm(total=len(plan.records), desc=f"ingest {name}", unit="img", disable=not progress)
        try:
            for i, chunk in enumerate(plan.records.chunks(size)):
                info = mf.shard_finished(out, shard_name(i), shard_keys[i])
                if info is None:
                    info = _write_shard(src, cfg, out, i, chunk, shard_keys[i], pool, bar)
                else:
                    bar.update(len(chunk))
                shards.append(info)
                skips.merge(info.get("skipped", {}), info.get("skipped_examples", {}))
        finally:
            bar.close()
            if pool:
                pool.shutdown()
        _remove_stale_shards(out, n_shards)
        count = sum(s["count"] for s in shards)
        if count == 0 and skips.counts.get("no_coordinates"):
            raise SourceError(f"{source}: no metadata CSV (no .csv file) and none of the {plan.rows} photos "
                              "carries a GPS tag: give a CSV of id, lat, lon beside them, or --unlabelled")
        manifest = {
            "stage": "images", "dataset": name, "source_name": cfg.source, "split": cfg.split,
            "license": cfg.license, "citation": cfg.citation.strip(),
            "source": plan.provenance, "settings": settings, "settings_key": key,
            **({"files_key": files_key} if files_key is not None else {}),
            "software": mf.software_versions(), "rows": plan.rows, "count": count,
            "coordinates": cfg.coordinates,
            "unlabelled": sum(int(s.get("unlabelled", 0)) for s in shards),
            **({"exif": {k: sum(int((s.get("exif") or {}).get(k, 0)) for s in shards)
                         for k in ("labelled", "disagree", "malformed")}} if cfg.exif_coordinates else {}),
            "shards": [{k: s[k] for k in ("shard", "count", "sha256", "bytes")} for s in shards],
            **skips.to_json(),
        }
        assert count + skips.total == plan.rows, (count, skips.total, plan.rows)  # nothing dropped silently
        path = mf.write_manifest(out, manifest)
    log.info("%s: %d samples in %d shards, skipped %s", path, count, len(shards), dict(skips.counts) or 0)
    return manifest


def ingest_split(name: str, root: str, test_share: float, *, source: str | None = None, limit: int | None = None,
                 config: DatasetConfig | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """A collection as training data and a test set in one go: ROOT/NAME (about 1 - test_share of the
    records) and ROOT/NAME-test (the others), split by a stable hash of each record's id; returns
    {"train": manifest, "test": manifest}."""
    return {part: ingest(name if part == "train" else f"{name}-test", root, source=source, limit=limit,
                         config=config, progress=progress, test_share=test_share, part=part)
            for part in TEST_PARTS}


def _remove_stale_shards(out: str, n: int) -> None:
    """Shards past the last one of this run belong to an earlier, larger ingest: remove them."""
    for fname in storage.list_files(out):
        if fname.startswith("shard-") and fname.endswith(".tar") and int(fname[6:12]) >= n:
            storage.remove(storage.join(out, fname))
            storage.remove(mf.progress_path(out, fname))
