"""MP-16 (Larson et al. 2017; about 4.7M geotagged Flickr images, the usual training set): the
GeoEstimation metadata CSV (IMG_ID, LAT, LON) joined by id with the published URL list.

Two downloaders, one result:
- `builtin` (default for small lists): the project's own fetcher (threads, retries with backoff; dead
  links counted as missing_file/unreachable), shard by shard, resumable like every stage.
- `img2dataset` (the optional extra `pip install 'locdiff[mp16]'`; `auto` picks it above
  `img2dataset_threshold` URLs when installed): downloads all URLs into its own WebDataset shards
  under ROOT/NAME/_img2dataset (incremental mode: re-running resumes), after which the ingest reads the
  images from those shards and counts img2dataset's failures per record. img2dataset resolves and
  fetches URLs itself: hosts that resolve to private addresses are refused before it starts (unless
  allowed), but it does not pin the address it checked nor check redirects, and it decodes images
  under its own limits (the ingest then re-checks each image's bytes and pixels). Use the builtin
  downloader for URL lists you do not trust.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from locdiff.data import storage
from locdiff.data.download import private_addresses_allowed, refused_hosts
from locdiff.data.locations import ArchiveLocation
from locdiff.data.sources.base import Plan, Record, TabularSource
from locdiff.data.sources.records import PAGE, RecordSpill, StringTable
from locdiff.data.validation import RecordError

log = logging.getLogger(__name__)


def _img2dataset():
    try:
        import img2dataset  # noqa: PLC0415 (optional extra)
    except ImportError:
        raise ImportError("the img2dataset downloader needs the optional extra: pip install "
                          "'locdiff[mp16]' (or set downloader: builtin in configs/datasets/mp16.yaml)"
                          ) from None
    return img2dataset


class Mp16Source(TabularSource):
    """configs/datasets/mp16.yaml."""

    def __init__(self, cfg, source=None) -> None:  # noqa: ANN001
        super().__init__(cfg, source)
        self._downloaded: StringTable | None = None  # img2dataset's index (`_index_entry`)
        self._tars: dict[str, ArchiveLocation] = {}

    def use_img2dataset(self, n_urls: int) -> bool:
        mode = self.cfg.downloader
        if mode == "img2dataset":
            _img2dataset()
            return True
        if mode == "auto" and n_urls >= self.cfg.img2dataset_threshold:
            try:
                _img2dataset()
                return True
            except ImportError as err:
                log.warning("%s; using the builtin downloader for %d URLs", err, n_urls)
        return False

    def prepare(self, plan: Plan, root: str, name: str) -> None:
        """Run img2dataset over every URL when it is the chosen downloader."""
        if not self.use_img2dataset(len(plan.records)):
            return
        if storage.is_remote(root):
            work = os.path.join(storage.local_tmp_dir(root), name, "_img2dataset")
        else:
            work = os.path.join(root, name, "_img2dataset")
        self.close()
        self._downloaded = run_img2dataset(plan.records, work, self.cfg,
                                           refuse_private=not private_addresses_allowed(
                                               self.cfg.allow_private_addresses))
        self.parallel = False

    def fetch(self, record: Record) -> bytes:
        if self._downloaded is None:
            return super().fetch(record)
        got = _index_entry(self._downloaded, record.id)
        if isinstance(got, RecordError):
            raise got
        tar, member = got
        loc = self._tars.get(tar)
        if loc is None:
            self._tars.clear()  # shards are read in order: keep one open
            loc = self._tars[tar] = ArchiveLocation(tar, max_bytes=self.cfg.max_image_bytes)
        return loc.read(member)

    def close(self) -> None:
        if self._downloaded is not None:
            self._downloaded.close()
            self._downloaded = None
        self._tars.clear()


def _index_entry(index: StringTable, rid: str) -> tuple[str, str] | RecordError:
    """What img2dataset did with a record's URL: (tar path, member name) or the RecordError it failed with."""
    got = index.get(rid)
    if got is None:
        return RecordError("unreachable", "img2dataset returned nothing for this URL")
    kind, a, b = json.loads(got)
    return (a, b) if kind == "ok" else RecordError(a, b)


def run_img2dataset(records: RecordSpill, work: str, cfg: Any, *, refuse_private: bool = True) -> StringTable:
    """Download the records' URLs with img2dataset (resumable) and index its output by record id (on disk,
    `_index_entry` reads it). With `refuse_private`, URLs whose host resolves to a non-public address are
    left out of the download and indexed as refused. Neither the URLs nor the index are held in memory."""

    img2dataset = _img2dataset()
    os.makedirs(work, exist_ok=True)
    url_list = os.path.join(work, "urls.parquet")
    index = StringTable("img2dataset-index.sqlite")
    try:
        write = not os.path.exists(url_list)
        tmp = f"{url_list}.tmp-{os.getpid()}"
        storage.remove_stale_temporaries(url_list)
        writer = None
        verdicts: dict[tuple[str, int], RecordError | None] = {}  # per host: the lookups of earlier chunks
        try:
            for chunk in records.chunks(PAGE):
                if write:
                    bad = refused_hosts([r.ref for r in chunk], verdicts) if refuse_private else {}
                    kept = [r for r in chunk if r.ref not in bad]
                    table = pa.table({"url": [r.ref for r in kept], "rid": [r.id for r in kept]})
                    writer = writer or pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
            if write:
                if writer is None:
                    pq.write_table(pa.table({"url": pa.array([], pa.string()), "rid": pa.array([], pa.string())}),
                                   tmp)
                else:
                    writer.close()
                    writer = None
                os.replace(tmp, url_list)
        finally:
            if writer is not None:
                writer.close()
            if os.path.exists(tmp):
                os.remove(tmp)
        out = os.path.join(work, "shards")
        img2dataset.download(
            url_list=url_list, input_format="parquet", url_col="url", save_additional_columns=["rid"],
            output_folder=out, output_format="webdataset", image_size=cfg.max_side,
            resize_mode="keep_ratio_largest",
            resize_only_if_bigger=True, encode_format="jpg", encode_quality=cfg.jpeg_quality, skip_reencode=True,
            processes_count=max(1, os.cpu_count() or 1), thread_count=cfg.workers, timeout=int(cfg.timeout),
            retries=cfg.retries, number_sample_per_shard=10_000, incremental_mode="incremental",
            enable_wandb=False, extract_exif=False,
        )
        for meta in sorted(glob.glob(os.path.join(out, "*.parquet"))):
            tar = meta[: -len(".parquet")] + ".tar"
            for batch in pq.ParquetFile(meta).iter_batches(columns=["key", "rid", "status", "error_message"]):
                rows = []
                for key, rid, status, error in zip(*(batch.column(c).to_pylist() for c in
                                                     ("key", "rid", "status", "error_message")), strict=True):
                    if status == "success":
                        rows.append((str(rid), json.dumps(["ok", tar, f"{key}.jpg"])))
                    else:
                        text = str(error or status)
                        reason = "missing_file" if any(c in text for c in ("404", "410", "403")) else "unreachable"
                        rows.append((str(rid), json.dumps(["err", reason, f"img2dataset: {text}"])))
                index.put_many(rows)
        if refuse_private:  # after img2dataset's rows: a refused URL stays refused (lookups made once a host)
            for chunk in records.chunks(PAGE):
                bad = refused_hosts([r.ref for r in chunk], verdicts)
                index.put_many((r.id, json.dumps(["err", bad[r.ref].reason, bad[r.ref].detail]))
                               for r in chunk if r.ref in bad)
    except BaseException:
        index.close()
        raise
    stats = sorted(glob.glob(os.path.join(out, "*_stats.json")))
    if stats:
        failed = sum(json.load(open(s)).get("failed_to_download", 0) for s in stats)
        log.info("img2dataset: %d shards, %d URLs failed", len(stats), failed)
    return index


SOURCE = Mp16Source
