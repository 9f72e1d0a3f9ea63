"""`Geolocator`: photos (or their embeddings) in, locations out, from a LocDiff run folder or a model in
the MLflow registry.

    from locdiff import Geolocator
    g = Geolocator.load("runs/tiny")                    # or "models:/locdiff@champion"
    for r in g.locate(["a.jpg", pil_image], top_k=5):
        print(r.id, r.lat, r.lon, r.place, r.confidence, [(m.place, m.probability) for m in r.modes])
    g.locate_embeddings(array)                          # (N, d) embeddings of the run's encoder

Per image:
- `lat`, `lon`: the run's answer (`locdiff predict`'s: LocDiff's chosen aggregation, or LocDiff-H);
- `confidence`: the probability that the photo lies within `radius_km` of the answer, calibrated on the
  run's validation rows (locdiff.model.method);
- `modes`: up to `top_k` distinct local maxima of the predicted density (at least 100 km apart), heaviest
  first, each with its probability (the density's mass in its basin; they sum to at most 1)
  (locdiff.shdd.modes);
- `place` names from the offline gazetteer (locdiff.gazetteer).

Photos go through `locdiff.data.images.load_rgb` (pixel limit, EXIF orientation, RGB, the ingest's
`max_side`), the same preprocessing as the ingest and embed stages, then through the run's image encoder
(run.json `encoder`; GPU when present). An unreadable photo does not stop the others: its result carries
`error` (or, with errors="raise", the first one raises). Embeddings of another encoder than the run's are
refused (`locdiff.runs.check_encoder`). Sampling is seeded per photo (locdiff.model.predict.row_seeds): a
photo's answer depends on the photo and the seed only, not on the other inputs or their order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_BYTESIO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")  # PIL names its buffer in messages
MIN_SEPARATION_KM = 100.0  # modes closer than this are one mode
DEFAULT_TOP_K = 5
ImageInput = Any  # a path (str or PathLike), image bytes, or a PIL image


@dataclass(frozen=True)
class Mode:
    """One alternative location: a local maximum of the predicted density."""

    lat: float
    lon: float
    probability: float  # the density's mass in this mode's basin
    place: str  # "City, Country" of the nearest notable city


@dataclass(frozen=True)
class Location:
    """Where one photo was taken, by the model; `error` says why a photo could not be located."""

    id: str  # the file as given, or "image[i]" / "row[i]"
    lat: float  # degrees; NaN when error
    lon: float
    confidence: float  # calibrated P(truth within radius_km of (lat, lon))
    radius_km: float
    place: str  # "City, Country"
    place_km: float  # distance from (lat, lon) to that city
    modes: tuple[Mode, ...]  # heaviest first
    method: str  # "locdiff" or "locdiff-h"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _max_side() -> int:
    """The ingest's default longest side (DatasetConfig.max_side): locate resizes photos the same way."""
    from locdiff.data.config import DatasetConfig

    return int(next(f.default for f in dataclasses.fields(DatasetConfig) if f.name == "max_side"))


class Geolocator:
    """A trained LocDiff predictor with its image encoder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, *, source: str | None = None, device: str | None = None,
                 _keep: Any = None) -> None:
        """Load from a run folder (or a packaged model's data folder, the same layout); prefer `load`."""
        from locdiff.errors import UserError
        from locdiff.model.method import LocDiffMethod
        from locdiff.runs import RunFolder

        self.run = RunFolder(folder)
        self.source = source or str(folder)
        cfg = self.run.read_config()
        trained = cfg.get("method", "locdiff")
        if trained != "locdiff":
            raise UserError(f"{self.source}: a run of method {trained!r}; locate needs a LocDiff run (train one "
                            "with `locdiff train --method locdiff`)")
        if device is not None:
            cfg = {**cfg, "train": {**cfg.get("train", {}), "device": device}}
        self.method = LocDiffMethod.load(self.run.path, cfg)
        self.encoder_record = self.run.encoder()
        self.device = device
        self._encoder: Any = None
        self._keep = _keep  # a downloaded model's temporary folder lives as long as the Geolocator

    def __repr__(self) -> str:
        return f"Geolocator({self.source!r})"

    @classmethod
    def load(cls, uri: str | os.PathLike, *, device: str | None = None,
             tracking_uri: str | None = None) -> Geolocator:
        """A run folder, a saved MLflow model folder, or a model URI (`models:/locdiff@champion`,
        `models:/locdiff/3`, `runs:/RUN_ID/model`) resolved through MLflow (tracking URI: the argument,
        else MLFLOW_TRACKING_URI, else the local default store)."""
        from locdiff.inference.pyfunc import resolve_model

        folder, keep = resolve_model(str(uri), tracking_uri=tracking_uri)
        return cls(folder, source=str(uri), device=device, _keep=keep)

    # -- the encoder -------------------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return int(self.method.model.embed_dim)

    @property
    def radius_km(self) -> float:
        """The radius the confidence refers to."""
        return self.method.confidence_radius_km

    def encoder_config(self) -> Any:
        """The EncoderConfig of the run's image encoder (from run.json `encoder`)."""
        from locdiff import schema
        from locdiff.data.config import EncoderConfig
        from locdiff.errors import UserError

        rec = self.encoder_record
        if not rec.get("model"):
            raise UserError(f"{self.source}: the run does not record its image encoder (trained on an "
                            "embeddings table without --encoder); locate photos with a run trained on "
                            "features of `locdiff data embed` or with `locdiff train --encoder NAME`, or pass "
                            "embeddings (Geolocator.locate_embeddings)")
        model = str(rec["model"])
        if model.startswith(("/", ".")) and not Path(model).exists():
            raise UserError(f"{self.source}: the run's image encoder {model} (a local folder) does not exist "
                            "here; copy it there or locate with embeddings")
        fields = {f.name for f in dataclasses.fields(EncoderConfig)}
        data = {k: v for k, v in rec.items() if k in fields and v is not None}
        data.setdefault("name", Path(model).name)
        if self.device is not None:
            data["device"] = self.device
        return schema.build(EncoderConfig, data, source=f"{self.source}: run.json encoder")

    def encoder(self) -> Any:
        """The run's image encoder, built once (`locdiff.embed.make_encoder`)."""
        if self._encoder is None:
            from locdiff.embed import make_encoder
            from locdiff.errors import UserError

            self._encoder = make_encoder(self.encoder_config())
            if int(self._encoder.dim) != self.embedding_dim:
                raise UserError(f"{self.source}: its encoder gives {self._encoder.dim}-d embeddings, the "
                                f"model takes {self.embedding_dim}-d ones; the run folder is inconsistent")
        return self._encoder

    # -- locating ----------------------------------------------------------------------------------------
    def embed(self, images: Iterable[ImageInput], *, batch_size: int | None = None, progress: bool = False
              ) -> tuple[list[str], np.ndarray, dict[int, str]]:
        """(ids, embeddings of the readable images (M, d), {input index: error}) in input order."""
        from tqdm.auto import tqdm

        from locdiff.data.images import load_rgb
        from locdiff.data.validation import RecordError

        items = list(images)
        ids = [_name(x, i) for i, x in enumerate(items)]
        encoder = self.encoder() if items else None
        bs = batch_size or (self.encoder_config().batch_size if items else 1)
        side = _max_side()
        errors: dict[int, str] = {}
        parts: list[np.ndarray] = []
        bar = tqdm(total=len(items), disable=not progress, desc="locate", unit="photo")
        for start in range(0, len(items), bs):
            batch = []
            for i in range(start, min(start + bs, len(items))):
                try:
                    batch.append(load_rgb(items[i], max_side=side))
                except RecordError as err:
                    errors[i] = f"{err.reason}: {_BYTESIO.sub('', err.detail)}"
                    log.warning("%s: cannot read the photo (%s); skipped", ids[i], errors[i])
            if batch:
                parts.append(np.asarray(encoder.encode(batch), np.float32))
            bar.update(min(bs, len(items) - start))
        bar.close()
        dim = self.embedding_dim
        emb = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        return ids, emb, errors

    def locate(self, images: ImageInput | Sequence[ImageInput], *, top_k: int = DEFAULT_TOP_K,
               method: str = "locdiff", batch_size: int | None = None, progress: bool = False,
               errors: str = "report", seed: int = 0) -> list[Location]:
        """Locate photos: paths, image bytes or PIL images (one or a list). Returns one Location per input,
        in order; an unreadable one has `error` set (errors="raise": a UserError naming it instead)."""
        from locdiff.errors import UserError

        if errors not in ("report", "raise"):
            raise ValueError(f"errors must be 'report' or 'raise'; got {errors!r}")
        if isinstance(images, str | bytes | os.PathLike) or _is_pil(images):
            images = [images]
        ids, emb, failed = self.embed(images, batch_size=batch_size, progress=progress)
        if failed and errors == "raise":
            i = min(failed)
            raise UserError(f"{ids[i]}: cannot read the photo ({failed[i]})")
        good = [i for i in range(len(ids)) if i not in failed]
        located = self.locate_embeddings(emb, top_k=top_k, method=method, ids=[ids[i] for i in good],
                                         encoder=self.encoder_record, seed=seed) if good else []
        out: list[Location] = []
        it = iter(located)
        for i, name in enumerate(ids):
            out.append(_failed(name, failed[i], method, self.radius_km) if i in failed else next(it))
        return out

    def locate_embeddings(self, embeddings: Any, *, top_k: int = DEFAULT_TOP_K, method: str = "locdiff",
                          ids: Sequence[str] | None = None, encoder: dict[str, Any] | None = None,
                          seed: int = 0, progress: bool = False) -> list[Location]:
        """Locate precomputed embeddings (N, d) (or one (d,)) of the run's encoder. `encoder`: the record of
        the encoder that made them, when known (a features manifest's `encoder`): checked against the run's."""
        from locdiff.errors import UserError
        from locdiff.gazetteer import nearest_places
        from locdiff.runs import check_encoder
        from locdiff.shdd.modes import density_modes
        from locdiff.tables import EmbeddingTable

        if top_k < 1:
            raise UserError(f"top_k must be >= 1; got {top_k}")
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim == 1:
            emb = emb[None]
        if emb.ndim != 2:
            raise UserError(f"embeddings must be (N, d); got shape {emb.shape}")
        check_encoder(self.encoder_record, encoder, emb.shape[1], run=self.source, data="the embeddings")
        if not np.isfinite(emb).all():
            row = int(np.argwhere(~np.isfinite(emb))[0, 0])
            raise UserError(f"embedding row {row} holds NaN or inf")
        n = emb.shape[0]
        names = [f"row[{i}]" for i in range(n)] if ids is None else [str(x) for x in ids]
        if len(names) != n:
            raise UserError(f"{len(names)} ids for {n} embeddings")
        if n == 0:
            return []
        table = EmbeddingTable(ids=np.asarray(names, dtype=object), lat=None, lon=None, embedding=emb,
                               source="embeddings")
        pred = self.method.predict(table, method=method, seed=seed, progress=progress)
        modes = density_modes(pred.density_code, top_k, min_separation_km=MIN_SEPARATION_KM)
        places = nearest_places(np.concatenate([pred.lat, modes.lat.ravel()]),
                                np.concatenate([pred.lon, modes.lon.ravel()]))
        mode_places = np.asarray(places[n:], dtype=object).reshape(modes.lat.shape)
        radius = self.radius_km
        out = []
        for i in range(n):
            ms = tuple(Mode(float(modes.lat[i, j]), float(modes.lon[i, j]), float(modes.probability[i, j]),
                            mode_places[i, j].label if mode_places[i, j] is not None else "")
                       for j in range(modes.lat.shape[1]) if np.isfinite(modes.probability[i, j]))
            p = places[i]
            out.append(Location(id=names[i], lat=float(pred.lat[i]), lon=float(pred.lon[i]),
                                confidence=float(pred.confidence[i]), radius_km=radius,
                                place=p.label if p else "", place_km=p.distance_km if p else float("nan"),
                                modes=ms, method=method))
        return out


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(x, Image.Image)


def _name(x: Any, i: int) -> str:
    if isinstance(x, str | os.PathLike):
        return os.fspath(x)
    return f"image[{i}]"


def _failed(name: str, error: str, method: str, radius: float) -> Location:
    nan = float("nan")
    return Location(id=name, lat=nan, lon=nan, confidence=nan, radius_km=radius, place="", place_km=nan,
                    modes=(), method=method, error=error)


# -- tables ----------------------------------------------------------------------------------------------

def locations_columns(locations: Sequence[Location], top_k: int) -> dict[str, list[Any]]:
    """The extra columns of a predictions table of located photos: place, place_km, confidence_radius_km,
    error, and mode{i}_lat/lon/probability/place for i = 1..top_k (empty slots NaN / "")."""
    cols: dict[str, list[Any]] = {"place": [r.place for r in locations], "place_km": [r.place_km for r in locations],
                                  "confidence_radius_km": [r.radius_km for r in locations],
                                  "error": [r.error or "" for r in locations]}
    for j in range(top_k):
        m = [r.modes[j] if j < len(r.modes) else None for r in locations]
        cols[f"mode{j + 1}_lat"] = [x.lat if x else float("nan") for x in m]
        cols[f"mode{j + 1}_lon"] = [x.lon if x else float("nan") for x in m]
        cols[f"mode{j + 1}_probability"] = [x.probability if x else float("nan") for x in m]
        cols[f"mode{j + 1}_place"] = [x.place if x else "" for x in m]
    return cols


def write_locations(path: str | os.PathLike, locations: Sequence[Location], top_k: int) -> None:
    """Write located photos as a predictions table (README "Formats": id, pred_lat, pred_lon, method,
    confidence, then the columns of `locations_columns`); Parquet or CSV by extension. Photos that could
    not be read are left out (they are reported, not predicted)."""
    from locdiff.io import write_predictions

    ok = [r for r in locations if r.ok]
    write_predictions(path, [r.id for r in ok], None, None, [r.lat for r in ok], [r.lon for r in ok],
                      method=[r.method for r in ok], confidence=[r.confidence for r in ok],
                      extra={k: v for k, v in locations_columns(ok, top_k).items() if k != "error"})


def format_locations(locations: Sequence[Location], *, modes: int = 3) -> str:
    """A readable text table: file, lat, lon, place, confidence, and the first `modes` top-k modes."""
    if not locations:
        return "(no photos)"
    radius = next((r.radius_km for r in locations), 0.0)
    head = ["file", "lat", "lon", "place", f"confidence ({radius:g} km)", "top-k modes (probability)"]
    rows = []
    for r in locations:
        if not r.ok:
            rows.append([r.id, "-", "-", f"(not located: {r.error.split(':', 1)[0]})", "-", ""])
            continue
        place = f"{r.place} ({r.place_km:,.0f} km)" if r.place else ""
        alts = "; ".join(f"{m.place or f'{m.lat:.2f},{m.lon:.2f}'} {m.probability:.2f}" for m in r.modes[:modes])
        rows.append([r.id, f"{r.lat:.4f}", f"{r.lon:.4f}", place, f"{r.confidence:.2f}", alts])
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(head)]
    widths[-1] = len(head[-1])  # the last column is not padded
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
