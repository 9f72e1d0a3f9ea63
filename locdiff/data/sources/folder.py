"""Any folder or archive (a local path, an http(s) URL or an s3:// URL) of images with a CSV of
`id, lat, lon`. The image of a row is the column `file`/`path`/`filename`/`image` when there is one,
else the id itself when it ends in an image extension, else `ID.jpg`; always a path inside the folder
(absolute paths, '..' and symlinks out of it are refused: outside_source). A CSV with a `url` column is
a URL list instead (http(s):// and s3:// only).

With `coordinates: optional` (`--unlabelled`) lat/lon may be absent, and a folder, archive or s3://
prefix without any CSV is read for every JPEG/PNG/WebP file under it, in sorted order, the relative path
being the id."""

from __future__ import annotations

from typing import Any

from locdiff.data.locations import safe_relpath
from locdiff.data.sources.base import IMAGE_EXTENSIONS, TabularSource
from locdiff.data.validation import RecordError

PATH_COLUMNS = ("file", "path", "filename", "image")


class FolderSource(TabularSource):
    """configs/datasets/folder.yaml (requires --source)."""

    def ref_for(self, row: dict[str, Any], rid: str) -> str:
        if self.images is None:
            return super().ref_for(row, rid)
        col = self.cfg.path_column or next((c for c in PATH_COLUMNS if c in row), None)
        if col and row.get(col):
            path = str(row[col])
        elif not rid:
            raise RecordError("missing_id", "no id and no file name")
        else:
            path = rid if rid.lower().endswith(IMAGE_EXTENSIONS) else f"{rid}.jpg"
        return safe_relpath(f"{self.cfg.image_prefix.strip('/')}/{path}" if self.cfg.image_prefix else path)


SOURCE = FolderSource
