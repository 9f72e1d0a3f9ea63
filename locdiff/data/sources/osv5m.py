"""OpenStreetView-5M (Astruc et al. 2024; the Hugging Face data set `osv5m/osv5m`): `train.csv` /
`test.csv` (id, latitude, longitude, country, ...) and the images in zips `images/SPLIT/NN.zip`
holding `ID.jpg`.

The files come through huggingface_hub's `hf_hub_download` (its cache, resumable, the Hub's ETag
checks), from the endpoint in HF_ENDPOINT when set (a mirror) and at the revision pinned in the config.
With --source, the same relative paths are read from a local mirror folder, an http(s) base URL or an
s3:// prefix instead.
"""

from __future__ import annotations

import logging
import os
import threading

from locdiff.data import storage
from locdiff.data.download import download_file
from locdiff.data.locations import ArchiveLocation, FileTree
from locdiff.data.sources.base import Plan, Record, TabularSource, file_blocks, plan_records, read_csv_chunks
from locdiff.data.validation import RecordError, SourceError, check_checksum

log = logging.getLogger(__name__)


def hf_download(repo: str, filename: str, revision: str) -> str:
    """A file of a Hugging Face data set repo, through huggingface_hub (HF_ENDPOINT honoured)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        return hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset", revision=revision,
                               endpoint=os.environ.get("HF_ENDPOINT") or None)
    except EntryNotFoundError:
        raise SourceError(f"hf://datasets/{repo}@{revision}: no file {filename!r}") from None
    except HfHubHTTPError as err:
        raise SourceError(f"hf://datasets/{repo}@{revision}/{filename}: {err}") from None


class MultiArchive(FileTree):
    """Several zips read as one folder; each is opened (downloaded) the first time it is needed."""

    def __init__(self, opener, names: list[str]) -> None:  # noqa: ANN001
        self.opener, self.names = opener, names
        self.url = ",".join(names)
        self._open: dict[str, ArchiveLocation] = {}
        self._lock = threading.Lock()

    def archives(self) -> list[ArchiveLocation]:
        with self._lock:
            for n in self.names:
                if n not in self._open:
                    self._open[n] = self.opener(n)
        return [self._open[n] for n in self.names]

    def read(self, relpath: str, max_bytes: int | None = None) -> bytes:
        for arc in self.archives():
            if arc.exists(relpath):
                return arc.read(relpath, max_bytes)
        damaged = [a.url for a in self.archives() if a.damaged]
        raise RecordError("damaged_archive" if damaged else "missing_file",
                          f"{relpath} in none of {len(self.names)} image zips"
                          + (f" (damaged: {damaged})" if damaged else ""))

    def exists(self, relpath: str) -> bool:
        return any(a.exists(relpath) for a in self.archives())

    def checksums(self) -> dict[str, str]:
        return {n: a.sha256 for n, a in zip(self.names, self.archives(), strict=True)}


class Osv5mSource(TabularSource):
    """configs/datasets/osv5m.yaml."""

    def _file(self, relpath: str) -> str:
        """A local path of a repo file: from the --source mirror or the Hub (cached)."""
        if self.source is None:
            if not self.cfg.hf_repo:
                raise SourceError(f"data set {self.cfg.name!r}: no hf_repo in the config; give --source")
            return hf_download(self.cfg.hf_repo, relpath, self.cfg.hf_revision)
        url = storage.join(self.source, relpath)
        try:
            return download_file(url, max_bytes=self.cfg.max_archive_bytes,
                                 **self._retry_kw())[0]  # local paths are returned as they are
        except FileNotFoundError:
            raise SourceError(f"{self.source}: the mirror has no {relpath!r}") from None

    def plan(self, limit: int | None = None) -> Plan:
        cfg = self.cfg
        name = cfg.metadata.filename or f"{cfg.split}.csv"
        path = self._file(name)
        try:
            storage.open_local(path, max_bytes=cfg.max_metadata_bytes).close()
        except (FileNotFoundError, storage.TooBigError) as err:
            raise SourceError(f"{name}: {err} (max_metadata_bytes)") from None
        digest = check_checksum(file_blocks(path), sha256=cfg.metadata.sha256, what=name)
        origin = (f"hf://datasets/{cfg.hf_repo}@{cfg.hf_revision}" if self.source is None else self.source)
        self.provenance["metadata"] = {"url": f"{origin}/{name}", "sha256": digest}
        if not cfg.hf_images:
            raise SourceError(f"data set {cfg.name!r}: the config lists no image zips (hf_images)")
        self.images = MultiArchive(lambda n: ArchiveLocation(self._file(n), max_bytes=cfg.max_image_bytes),
                                   list(cfg.hf_images))
        self.parallel = False
        self.provenance["images"] = {"url": f"{origin}/{{{','.join(cfg.hf_images)}}}"}
        records, rows, skips = plan_records(read_csv_chunks(path, name), cfg, f"{origin}/{name}", self.ref_for,
                                            limit)
        return Plan(records, rows, skips, dict(self.provenance))

    def fetch(self, record: Record) -> bytes:
        return self.images.read(record.ref)  # type: ignore[union-attr]


SOURCE = Osv5mSource
