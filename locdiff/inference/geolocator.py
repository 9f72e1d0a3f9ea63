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
  run's validation rows (locdiff.model.locdiff_method);
- `modes`: up to `top_k` distinct local maxima of the predicted density smoothed to L/4 (at least 100 km
  apart), heaviest first, each with its probability (the mass in its basin of the L/3 density the
  confidence uses; they sum to at most 1) (locdiff.shdd.modes);
- `place` names from the offline gazetteer (locdiff.gazetteer);
- `exif_lat`, `exif_lon`, `exif_km`: the photo's own EXIF GPS tag, when it carries one, and its distance
  from the answer (None otherwise; a malformed tag is logged on one line and left out).

Photos go through `locdiff.data.images.load_rgb` (pixel limit, EXIF orientation, RGB, the ingest's
`max_side`), the same preprocessing as the ingest and embed stages, then through the run's image encoder
(run.json `encoder`; GPU when present). Photos are read, decoded and preprocessed on a pool of threads
(`DECODE_THREADS`): while the previous batch is being embedded (two batches ahead at most) when the encoder
leaves cores free (a GPU, or fewer torch threads than cores), else between batches, on all cores, so that
decoding never takes cores from the encoder's threads mid-batch. An unreadable photo does
not stop the others: its result carries `error` (or, with errors="raise", the first one raises). Embeddings of
another encoder than the run's are refused (`locdiff.runs.check_encoder`). Sampling is seeded per photo
(locdiff.model.predict.row_seeds): a photo's answer depends on the photo and the seed only, not on the other
inputs or their order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image
from tqdm.auto import tqdm

from locdiff import schema
from locdiff.data.config import DatasetConfig, EncoderConfig
from locdiff.data.exif import distance_km, gps_or_none
from locdiff.data.images import load_rgb
from locdiff.data.validation import RecordError
from locdiff.embed import ImageEncoder, make_encoder
from locdiff.errors import UserError, one_line, printable, printable_name
from locdiff.gazetteer import nearest_places
from locdiff.inference.model_uri import resolve_model
from locdiff.io import first_bad_embedding, write_predictions
from locdiff.model.locdiff_method import LocDiffMethod
from locdiff.runs import RunFolder, check_encoder, resolve_reference
from locdiff.shdd.modes import density_modes
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)

_BYTESIO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")  # PIL names its buffer in messages
MIN_SEPARATION_KM = 100.0  # modes closer than this are one mode
DEFAULT_TOP_K = 5
MAX_TOP_K = 100  # modes per photo (each costs a refinement; modes below 0.1 % of the mass are dropped anyway)
DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))  # photos read, decoded and preprocessed at once
ImageInput = Any  # a path (str or PathLike), image bytes, or a PIL image


@dataclass(frozen=True)
class Mode:
    """One alternative location: a local maximum of the predicted density."""

    lat: float
    lon: float
    probability: float  # the (L/3) density's mass in this mode's basin
    place: str  # "City, Country" of the nearest notable city


@dataclass(frozen=True)
class Location:
    """Where one photo was taken, by the model; `error` says why a photo could not be located."""

    id: str  # the file as given (a non-UTF-8 name escaped: printable_name), or "image[i]" / "row[i]"
    lat: float  # degrees; NaN when error
    lon: float
    confidence: float  # calibrated P(truth within radius_km of (lat, lon))
    radius_km: float
    place: str  # "City, Country"
    place_km: float  # distance from (lat, lon) to that city
    modes: tuple[Mode, ...]  # heaviest first
    method: str  # "locdiff" or "locdiff-h"
    error: str | None = None
    exif_lat: float | None = None  # the photo's own GPS tag, when it carries one (locdiff.data.exif)
    exif_lon: float | None = None
    exif_km: float | None = None  # distance from the tag to (lat, lon)

    @property
    def ok(self) -> bool:
        """True when the photo was located (no `error`)."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, `modes` as a tuple of dicts."""
        return dataclasses.asdict(self)


def _max_side() -> int:
    """The ingest's default longest side (DatasetConfig.max_side): locate resizes photos the same way."""
    return int(next(f.default for f in dataclasses.fields(DatasetConfig) if f.name == "max_side"))


class Geolocator:
    """A trained LocDiff predictor with its image encoder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, *, source: str | None = None, device: str | None = None,
                 _keep: tempfile.TemporaryDirectory[str] | None = None) -> None:
        """Load from a run folder (or a packaged model's data folder, the same layout); prefer `load`."""
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
        self.encoder_record = packaged_encoder(self.run.encoder(), self.run.path)
        self.device = device
        self._encoder: ImageEncoder | None = None
        self._keep = _keep  # a downloaded model's temporary folder lives as long as the Geolocator

    def __repr__(self) -> str:
        return f"Geolocator({self.source!r})"

    @classmethod
    def load(cls, uri: str | os.PathLike, *, device: str | None = None,
             tracking_uri: str | None = None) -> Geolocator:
        """A run folder, a saved MLflow model folder, or a model URI (`models:/locdiff@champion`,
        `models:/locdiff/3`, `runs:/RUN_ID/model`) resolved through MLflow (tracking URI: the argument,
        else MLFLOW_TRACKING_URI, else the local default store)."""
        folder, keep = resolve_model(str(uri), tracking_uri=tracking_uri)
        return cls(folder, source=str(uri), device=device, _keep=keep)

    # -- the encoder -------------------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        """The dimension d of the embeddings the model takes (its image encoder's)."""
        return int(self.method.model.embed_dim)

    @property
    def radius_km(self) -> float:
        """The radius the confidence refers to."""
        return self.method.confidence_radius_km

    def encoder_config(self) -> EncoderConfig:
        """The EncoderConfig of the run's image encoder (from run.json `encoder`)."""
        rec = self.encoder_record
        if not rec.get("model"):
            raise UserError(f"{self.source}: the run does not record its image encoder (trained on an "
                            "embeddings table without --encoder); locate photos with a run trained on "
                            "features of `locdiff data embed` or with `locdiff train --encoder NAME`, or pass "
                            "embeddings (Geolocator.locate_embeddings)")
        # a hub id, a local path recorded at training, or a folder inside the model: never a URL
        model = resolve_reference(self.run.path, rec["model"], f"{self.source}: run.json encoder.model", hub_id=True)
        if model.startswith(("/", ".")) and not Path(model).exists():
            raise UserError(f"{self.source}: the run's image encoder {model} (a local folder) does not exist "
                            "here; copy it there or locate with embeddings")
        fields = {f.name for f in dataclasses.fields(EncoderConfig)}
        data = {k: v for k, v in rec.items() if k in fields and v is not None} | {"model": model}
        data.setdefault("name", Path(model).name)
        if self.device is not None:
            data["device"] = self.device
        return schema.build(EncoderConfig, data, source=f"{self.source}: run.json encoder")

    def encoder(self) -> ImageEncoder:
        """The run's image encoder, built once (`locdiff.embed.make_encoder`)."""
        if self._encoder is None:
            self._encoder = make_encoder(self.encoder_config())
            if int(self._encoder.dim) != self.embedding_dim:
                raise UserError(f"{self.source}: its encoder gives {self._encoder.dim}-d embeddings, the "
                                f"model takes {self.embedding_dim}-d ones; the run folder is inconsistent")
        return self._encoder

    # -- locating ----------------------------------------------------------------------------------------
    def embed(self, images: Iterable[ImageInput], *, batch_size: int | None = None, progress: bool = False
              ) -> tuple[list[str], np.ndarray, dict[int, str]]:
        """(ids, embeddings of the readable images (M, d), {input index: error}) in input order."""
        ids, emb, errors, _ = self._embed(list(images), batch_size=batch_size, progress=progress)
        return ids, emb, errors

    def _embed(self, items: list[ImageInput], *, batch_size: int | None, progress: bool,
               names: Sequence[str] | None = None
               ) -> tuple[list[str], np.ndarray, dict[int, str], dict[int, tuple[float, float]]]:
        """`embed`, plus {input index: (lat, lon) of its GPS tag}. Photos are read, decoded and preprocessed
        on DECODE_THREADS threads: batches b + 1 and b + 2 while batch b is embedded when the encoder leaves
        cores free; else batch b just before it is embedded (decode threads beside an encoder that keeps
        every core busy slow both: 0.79x of the embedding alone, against 0.99x for one after the other, on
        2 cores with a CPU ViT-B/32). `names`: the inputs' ids (a request's `id` column), else _name's."""
        cap = self.method.config.limits.max_batch_size
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer)
                                       or not 1 <= batch_size <= cap):  # a negative one embedded nothing
            raise UserError(f"batch_size must be an integer in [1, {cap}] (limits.max_batch_size); got {batch_size!r}")
        if names is not None and len(names) != len(items):
            raise UserError(f"{len(names)} ids for {len(items)} photos")
        ids = [_name(x, i) for i, x in enumerate(items)] if names is None else [str(x) for x in names]
        encoder = self.encoder() if items else None
        bs = batch_size or (self.encoder_config().batch_size if items else 1)
        side = _max_side()
        errors: dict[int, str] = {}
        gps: dict[int, tuple[float, float]] = {}
        parts: list[np.ndarray] = []

        def prepare(i: int) -> tuple[np.ndarray | None, str | None, tuple[float, float] | None]:
            try:
                x = encoder.preprocess([load_rgb(items[i], max_side=side)])
            except RecordError as err:
                return None, f"{err.reason}: {_BYTESIO.sub('', err.detail)}", None
            tag, problem = gps_or_none(items[i])  # once load_rgb has checked it: a regular file within limits
            if problem:
                log.warning("%s: GPS tag ignored (%s)", printable(ids[i]), printable(problem))
            return x, None, tag

        batches = [range(s, min(s + bs, len(items))) for s in range(0, len(items), bs)]
        bar = tqdm(total=len(items), disable=not progress, desc="locate", unit="photo")
        ahead = 2 if encoder is not None and encoder.cpu_threads() < (os.cpu_count() or 1) else 0
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="locate-decode") as pool:
            pending = {k: [pool.submit(prepare, i) for i in batches[k]] for k in range(min(ahead, len(batches)))}
            for k, batch in enumerate(batches):
                done = [f.result() for f in pending.pop(k, None) or [pool.submit(prepare, i) for i in batch]]
                if ahead and k + ahead < len(batches):
                    pending[k + ahead] = [pool.submit(prepare, i) for i in batches[k + ahead]]
                inputs = []
                for i, (x, err, tag) in zip(batch, done, strict=True):
                    if tag is not None:
                        gps[i] = tag
                    if err is not None:
                        errors[i] = err
                        log.warning("%s: cannot read the photo (%s); skipped", printable(ids[i]), printable(err))
                    else:
                        inputs.append(x)
                if inputs:
                    parts.append(np.asarray(encoder.embed(np.concatenate(inputs)), np.float32))
                bar.update(len(batch))
        bar.close()
        dim = self.embedding_dim
        emb = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        return ids, emb, errors, gps

    def locate(self, images: ImageInput | Sequence[ImageInput], *, top_k: int = DEFAULT_TOP_K,
               method: str = "locdiff", batch_size: int | None = None, progress: bool = False,
               errors: str = "report", seed: int = 0, ids: Sequence[str] | None = None) -> list[Location]:
        """Locate photos: paths, image bytes or PIL images (one or a list). Returns one Location per input,
        in order; an unreadable one has `error` set (errors="raise": a UserError naming it instead). `ids`:
        one per photo, the names its Location and the log take (default: the file, or "image[i]")."""

        if errors not in ("report", "raise"):
            raise ValueError(f"errors must be 'report' or 'raise'; got {errors!r}")
        check_top_k(top_k)
        if isinstance(images, str | bytes | os.PathLike) or _is_pil(images):
            images = [images]
        ids, emb, failed, gps = self._embed(list(images), batch_size=batch_size, progress=progress, names=ids)
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
        nan = np.full(len(out), np.nan)
        lat, lon = nan.copy(), nan.copy()
        for i, (la, lo) in gps.items():
            lat[i], lon[i] = la, lo
        return with_gps_tags(out, lat, lon)

    def locate_embeddings(self, embeddings: ArrayLike, *, top_k: int = DEFAULT_TOP_K, method: str = "locdiff",
                          ids: Sequence[str] | None = None, encoder: dict[str, Any] | None = None,
                          seed: int = 0, progress: bool = False) -> list[Location]:
        """Locate precomputed embeddings (N, d) (or one (d,)) of the run's encoder. `encoder`: the record of
        the encoder that made them, when known (a features manifest's `encoder`): checked against the run's."""
        check_top_k(top_k)
        try:
            emb = np.asarray(embeddings, dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as err:  # strings, ragged rows, objects, 10**400
            raise UserError(f"embeddings must be numbers of shape (N, d) ({one_line(str(err), 120)})") from None
        if emb.ndim == 1:
            emb = emb[None]
        if emb.ndim != 2:
            raise UserError(f"embeddings must be (N, d); got shape {emb.shape}")
        check_encoder(self.encoder_record, encoder, emb.shape[1], run=self.source, data="the embeddings")
        if (bad := first_bad_embedding(emb)) is not None:
            row, why = bad
            raise UserError(f"embedding row {row}: {why}")
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


def check_top_k(top_k: object, name: str = "top_k") -> int:
    """`top_k` when it is an integer in [1, MAX_TOP_K]; a UserError naming `name` (e.g. "--top-k") otherwise."""
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or not 1 <= top_k <= MAX_TOP_K:
        raise UserError(f"{name} must be an integer in [1, {MAX_TOP_K}]; got {top_k!r}")
    return int(top_k)


def with_gps_tags(locations: Sequence[Location], lat: np.ndarray, lon: np.ndarray) -> list[Location]:
    """The locations with each photo's own GPS tag (lat, lon; NaN: none) and its distance from the answer."""
    out = []
    for r, la, lo in zip(locations, lat, lon, strict=True):
        if np.isfinite(la) and np.isfinite(lo):
            km = distance_km((float(la), float(lo)), r.lat, r.lon)
            r = dataclasses.replace(r, exif_lat=float(la), exif_lon=float(lo), exif_km=km if np.isfinite(km) else None)
        out.append(r)
    return out


def packaged_encoder(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The encoder record with a packaged encoder (a registered model's `encoder` folder, revision
    sha256:DIGEST; locdiff.inference.pyfunc) named by its absolute location in `folder`; others as they are."""
    model = str(record.get("model") or "")
    if not str(record.get("revision") or "").startswith("sha256:") or not model or Path(model).is_absolute() \
            or ".." in Path(model).parts or not (folder / model).is_dir():
        return record
    return {**record, "model": str((folder / model).resolve())}


def _is_pil(x: object) -> bool:
    return isinstance(x, Image.Image)


def _name(x: ImageInput, i: int) -> str:
    if isinstance(x, str | os.PathLike):
        return printable_name(os.fspath(x))
    return f"image[{i}]"


def _failed(name: str, error: str, method: str, radius: float) -> Location:
    nan = float("nan")
    return Location(id=name, lat=nan, lon=nan, confidence=nan, radius_km=radius, place="", place_km=nan,
                    modes=(), method=method, error=error)


# -- tables ----------------------------------------------------------------------------------------------

def locations_columns(locations: Sequence[Location], top_k: int) -> dict[str, list[Any]]:
    """The extra columns of a predictions table of located photos: place, place_km, confidence_radius_km,
    error, exif_lat/exif_lon/exif_km when a photo carries a GPS tag, and mode{i}_lat/lon/probability/place
    for i = 1..top_k (empty slots NaN / "")."""
    cols: dict[str, list[Any]] = {"place": [r.place for r in locations], "place_km": [r.place_km for r in locations],
                                  "confidence_radius_km": [r.radius_km for r in locations],
                                  "error": [r.error or "" for r in locations]}
    if any(r.exif_lat is not None for r in locations):  # the photos' own GPS tags (NaN where none)
        nan = float("nan")
        for key in ("exif_lat", "exif_lon", "exif_km"):
            cols[key] = [nan if getattr(r, key) is None else getattr(r, key) for r in locations]
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
    ok = [r for r in locations if r.ok]
    write_predictions(path, [r.id for r in ok], None, None, [r.lat for r in ok], [r.lon for r in ok],
                      method=[r.method for r in ok], confidence=[r.confidence for r in ok],
                      extra={k: v for k, v in locations_columns(ok, top_k).items() if k != "error"})


def format_locations(locations: Sequence[Location], *, modes: int = 3) -> str:
    """A readable text table: file, lat, lon, place, confidence, and the first `modes` top-k modes."""
    if not locations:
        return "(no photos)"
    radius = next((r.radius_km for r in locations), 0.0)
    tags = any(r.exif_lat is not None for r in locations)
    head = ["file", "lat", "lon", "place", f"confidence ({radius:g} km)",
            *(["photo's GPS tag (km from answer)"] if tags else []), "top-k modes (probability)"]
    rows = []
    for r in locations:
        tag = ([] if not tags else ["-"] if r.exif_lat is None else
               [f"{r.exif_lat:.4f},{r.exif_lon:.4f}" + (f" ({r.exif_km:,.0f} km)" if r.exif_km is not None else "")])
        if not r.ok:
            rows.append([r.id, "-", "-", f"(not located: {r.error.split(':', 1)[0]})", "-", *tag, ""])
            continue
        place = f"{r.place} ({r.place_km:,.0f} km)" if r.place else ""
        alts = "; ".join(f"{m.place or f'{m.lat:.2f},{m.lon:.2f}'} {m.probability:.2f}" for m in r.modes[:modes])
        rows.append([r.id, f"{r.lat:.4f}", f"{r.lon:.4f}", place, f"{r.confidence:.2f}", *tag, alts])
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(head)]
    widths[-1] = len(head[-1])  # the last column is not padded
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
