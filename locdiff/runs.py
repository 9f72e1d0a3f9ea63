"""The run folder: one module owns its layout, its atomic writes and its one checkpoint format.

    RUN/
      config.yaml        the resolved, validated config (written before training starts)
      checkpoint.pt      training state: weights, EMA, optimizer, LR schedule, step, RNG, stream position.
                         torch.save of tensors and plain values only: read with weights_only=True
      metrics.jsonl      one JSON line per log step (and validation)
      model.safetensors  the predictor's tensors (the EMA weights for LocDiff); no pickle
      model.json         what rebuilds the predictor around them (dimensions, method state)
      selection.json     choices made on validation (aggregation, LocDiff-H weight and radius), bound to
                         model.safetensors by its sha256 (`weights_sha256`): written before the weights, so
                         a training killed between the two leaves a pair that `read_selection` refuses
      run.json           the record, written last: completion key, data identities, encoder, gallery
                         reference, final metrics. A run is complete exactly when run.json holds the
                         completion key of its config and data.

The completion key is the hash of the resolved config and the identities of the training and validation
data (their manifests or content hashes): the same config on the same data is the same run (skipped when
complete, resumed when not); anything else is another run. `check_compatible` guards resuming a folder
with another config (the CLI and the pipeline both call it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from locdiff.data.config import load_encoder_config
from locdiff.data.datasource import open_source
from locdiff.data.storage import TooBigError, file_sha256, read_local
from locdiff.errors import CorruptFileError, UserError, one_line, reraise_for
from locdiff.hashing import stable_hash
from locdiff.model.config import MAX_STEPS, Config, config_to_dict, read_run_config

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
WEIGHTS = "model.safetensors"
MODEL = "model.json"
SELECTION = "selection.json"
RECORD = "run.json"
MAX_JSON_BYTES = 64 << 20  # a run's JSON files are kB; a larger one is refused unread
DAMAGED = "the run folder is damaged: train again into a new --out"
# what every checkpoint holds (locdiff.engine writes it; a file without one of these is not resumable)
CHECKPOINT_KEYS = ("task", "model", "optimizer", "lr_scheduler", "step", "rng")

# config keys that may change between a run and its resumption (they do not change the weights)
RESUMABLE_CHANGES = ("train.steps", "train.checkpoint_every", "train.log_every", "train.val_samples",
                     "train.device", "train.loader_threads", "train.threads", "train.peak_tflops", "predict.",
                     "hybrid.", "limits.")


def completion_key(config: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """The identity of a training: hash of the resolved config and the data identities. The `limits`
    section (memory budgets) is left out: it never changes what is trained."""
    config = {k: v for k, v in config.items() if k != "limits"}
    return stable_hash({"config": config, "data": data})


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 5}} -> {"train.steps": 5}; `baselines` stays one value per baseline."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "baselines":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of path to write; it replaces path when the block succeeds and is
    removed when it fails (a full disk leaves no partial file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to path through a temporary sibling (a full disk is a DiskFullError naming path)."""
    with reraise_for(path, writing=True), atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def local_run_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path; a UserError where it is a URL: a run folder is local (Path("s3://b/run") would be
    the local folder s3:/b/run, which `train --out s3://...` wrote and `predict --run s3://...` named)."""
    if "://" in os.fspath(path):
        raise UserError(f"{path}: a run folder is a local folder, not a URL; give a local path")
    return Path(path)


class RunFolder:
    """A run directory (local). Every file of a run is written through this class."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = local_run_dir(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of `name` in the run; CorruptFileError where it is a symlink leading out of the run folder
        (an untrusted run never makes the reader open /etc/passwd or a device)."""
        path = self.path / name
        if path.is_symlink() and not path.resolve().is_relative_to(self.path.resolve()):
            raise CorruptFileError(path, f"{path}: a symlink leading out of the run folder; {DAMAGED}")
        return path

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"run folder {self.path}: cannot create it ({err.strerror}); choose "
                                  "another --out") from None

    # -- config ------------------------------------------------------------------------------------
    def has_config(self) -> bool:
        return self.file(CONFIG).is_file()

    def read_config(self) -> dict[str, Any]:
        """The resolved config mapping of the run (validated by the caller's config system)."""
        self.file(CONFIG)  # refuses a symlink out of the run
        return read_run_config(self.path)

    def write_config(self, config: Config | Mapping[str, Any]) -> None:
        """Write the resolved config (a Config or a mapping) atomically."""
        data = config if isinstance(config, Mapping) else config_to_dict(config)
        self.create()
        write_text_atomic(self.file(CONFIG), yaml.safe_dump(dict(data), sort_keys=False))

    def check_compatible(self, config: Mapping[str, Any]) -> None:
        """A folder holding a run may only be resumed with a config that trains the same weights."""
        if not self.has_config():
            return
        old, new = flatten(self.read_config()), flatten(config)
        diff = [k for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
                and not any(k == c or (c.endswith(".") and k.startswith(c)) for c in RESUMABLE_CHANGES)]
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
            raise ValueError(f"{self.path} holds a run with a different config ({details}); use a new "
                             "--out to train a different config")

    # -- training checkpoint ----------------------------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """torch.save the training state atomically. Only tensors and plain values (the weights_only
        loader rejects anything else, so a run folder never needs pickle)."""
        self.create()
        path = self.file(CHECKPOINT)
        # serialised in memory, then written by Python: a full disk is an OSError (ENOSPC) here, where
        # torch's own writer (even into a Python file) may raise a RuntimeError ("unexpected pos") that
        # reads like a damaged file; the temporary file goes either way
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        with reraise_for(path, what="checkpoint", writing=True), atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        path = self.file(CHECKPOINT)
        if not path.exists():
            return None
        return load_state(path, map_location)

    def check_resumable(self, embed_dim: int, data: str = "the data") -> None:
        """Before anything is written: the folder's checkpoint (if any) must be readable, complete and
        trained on `embed_dim`-d embeddings (UserError naming the checkpoint otherwise). Memory-mapped, so
        the tensors are not read."""
        path = self.file(CHECKPOINT)
        if not path.exists():
            return
        state = load_state(path, mmap=True)
        check_checkpoint(state, path, embed_dim=embed_dim, data=data)
        # training on would fail at its first step, after the run's files were rewritten
        check_finite(state["model"], path, "delete it to train from scratch")

    def remove_partial_files(self) -> None:
        """Remove the temporary files (`atomic_path`'s `.NAME.<random>.tmp`) that a training killed inside a
        write left: a re-run never reads them, and each kill would leave one more (a checkpoint's size)."""
        names = (CONFIG, CHECKPOINT, METRICS, WEIGHTS, MODEL, SELECTION, RECORD)
        for path in self.path.glob(".*.tmp") if self.path.is_dir() else ():
            if any(path.name.startswith(f".{n}.") for n in names) and path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()

    @contextlib.contextmanager
    def removed_if_unstarted(self) -> Iterator[None]:
        """Around the start of a training: when it fails before its first checkpoint in a folder that held
        no run, the files it wrote (config.yaml, metrics.jsonl) go, and the folder when it made it, so a
        refused or failed fresh run leaves nothing behind. A folder with a checkpoint is never touched."""
        existed, had_config = self.path.exists(), self.has_config()
        try:
            yield
        except BaseException:
            if not had_config and not self.file(CHECKPOINT).exists():
                for name in (CONFIG, METRICS):
                    with contextlib.suppress(OSError):
                        self.file(name).unlink()
                if not existed:
                    with contextlib.suppress(OSError):
                        self.path.rmdir()  # only when empty: anything else someone wrote stays
            raise

    # -- metrics log ---------------------------------------------------------------------------------------
    def append_metrics(self, rows: list[Mapping[str, Any]]) -> None:
        if not rows:
            return
        self.create()
        with reraise_for(self.file(METRICS), writing=True), self.file(METRICS).open("a") as f:
            f.writelines(json.dumps(dict(r)) + "\n" for r in rows)

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(METRICS)
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop log lines after `step` (a resumed run writes them again)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        if rows or self.file(METRICS).exists():
            write_text_atomic(self.file(METRICS), "".join(json.dumps(r) + "\n" for r in rows))

    # -- the predictor -------------------------------------------------------------------------------------
    def save_model(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                   selection: Mapping[str, Any] | None = None) -> None:
        """The predictor: tensors as safetensors, the rest as JSON; `selection` (the choices made for these
        weights) is written first, bound to them by their sha256 (`read_selection`)."""
        self.create()
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        if selection is not None:
            write_json_atomic(self.file(SELECTION), {**selection, "weights_sha256": hashlib.sha256(data).hexdigest()})
        # written by Python: a full disk is an OSError (ENOSPC), named, and the temporary file goes
        with reraise_for(self.file(WEIGHTS), writing=True), atomic_path(self.file(WEIGHTS)) as tmp:
            tmp.write_bytes(data)
        write_json_atomic(self.file(MODEL), dict(meta))

    def has_model(self) -> bool:
        return self.file(WEIGHTS).is_file() and self.file(MODEL).is_file()

    def load_model(self, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, description) of the predictor; UserError naming the file when one is damaged."""
        for name in (WEIGHTS, MODEL):
            if self.file(name).is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(self.file(name)))
            if self.file(name).exists() and not self.file(name).is_file():  # a FIFO, a device
                raise CorruptFileError(self.file(name), f"{self.file(name)}: not a regular file; {DAMAGED}")
        if not self.has_model():
            raise FileNotFoundError(f"{self.path}: no trained model ({WEIGHTS}, {MODEL}); the run has not "
                                    "finished training (run `locdiff train` again to resume it)")
        path = self.file(WEIGHTS)
        try:
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptFileError(path, f"{path}: cannot read the model weights ({str(err).splitlines()[0]}); "
                                   "the file is damaged: train again into a new --out") from None
        check_finite(tensors, path, "the file is damaged: train again into a new --out")
        meta = self.read_json(MODEL)
        dim = meta.get("embed_dim") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("method"), str) or type(dim) is not int or dim < 1:
            raise CorruptFileError(self.file(MODEL), f"{self.file(MODEL)}: not a locdiff model description (it "
                                   f"needs 'method' and a positive integer 'embed_dim'); {DAMAGED}")
        ref = meta.get("gallery")
        if ref is not None:  # inside the folder or a local path recorded at training: never a URL
            where = f"{self.file(MODEL)}: gallery.uri"
            uri = ref.get("uri") if isinstance(ref, dict) else ref
            if isinstance(ref, dict) and not isinstance(ref.get("sha256", ""), str):
                raise CorruptFileError(self.file(MODEL), f"{self.file(MODEL)}: gallery.sha256 is not a string; "
                                       f"{DAMAGED}")
            uri = resolve_reference(self.path, uri, where)
            meta = {**meta, "gallery": {**ref, "uri": uri} if isinstance(ref, dict) else uri}
        return tensors, meta

    def read_selection(self) -> dict[str, Any]:
        """selection.json ({} when the run has none); a UserError naming the run folder when it was chosen for
        other weights than model.safetensors (a training killed between writing the two). A selection written
        before the binding existed is read as it is."""
        if not self.file(SELECTION).exists():
            return {}
        selection = self.read_json(SELECTION)
        bound = selection.get("weights_sha256")
        if bound is not None and bound != file_sha256(self.file(WEIGHTS)):
            raise UserError(f"{self.path}: {SELECTION} was chosen for other weights than {WEIGHTS} (a training "
                            "was stopped while saving them); run the same `locdiff train` command again to finish it")
        return selection

    # -- small JSON files ----------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        self.create()
        write_json_atomic(self.file(name), obj)

    def read_json(self, name: str, default: Any = None) -> Any:
        path = self.file(name)
        if not path.exists():
            if default is not None:
                return default
            raise FileNotFoundError(f"{path}: missing")
        try:  # a regular file only: a FIFO or device in an untrusted run folder must not block the read
            raw = read_local(str(path), max_bytes=MAX_JSON_BYTES)
        except TooBigError:
            raise CorruptFileError(path, f"{path}: larger than {MAX_JSON_BYTES} bytes; {DAMAGED}") from None
        except FileNotFoundError:
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path)) from None
            raise CorruptFileError(path, f"{path}: not a regular file; {DAMAGED}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptFileError(path, f"{path}: not valid JSON ({err}); {DAMAGED}") from None
        except RecursionError:
            raise CorruptFileError(path, f"{path}: not valid JSON (nested too deeply); {DAMAGED}") from None
        except ValueError as err:  # an integer of more digits than Python converts
            raise CorruptFileError(path, f"{path}: not valid JSON ({one_line(str(err), 80)}); {DAMAGED}") from None
        if not isinstance(data, dict):  # every JSON file of a run is an object
            kind = {type(None): "null", list: "list", str: "string", bool: "boolean"}.get(type(data), "number")
            raise CorruptFileError(path, f"{path}: not a JSON object (a {kind}); {DAMAGED}")
        return data

    # -- the record ------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        """run.json, None when the run has none; UserError for a run of a later format than this version's."""
        if not self.file(RECORD).exists():
            return None
        rec = self.read_json(RECORD)
        version = rec.get("format_version", 1)
        if type(version) is not int or version < 1:
            raise CorruptFileError(self.file(RECORD), f"{self.file(RECORD)}: format_version {str(version)[:40]!r} is "
                                   f"not a positive integer; {DAMAGED}")
        if version > FORMAT_VERSION:
            raise UserError(f"{self.file(RECORD)}: a run of format {version}, written by a later locdiff (this one "
                            f"reads formats up to {FORMAT_VERSION}); upgrade locdiff to use it")
        return rec

    def is_complete(self, key: str | None = None) -> bool:
        rec = self.record()
        return rec is not None and rec.get("complete", False) and (key is None or rec.get("key") == key)

    def write_record(self, record: Mapping[str, Any]) -> None:
        self.write_json(RECORD, {"format_version": FORMAT_VERSION, **record})

    def clear_record(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.file(RECORD).unlink()

    def encoder(self) -> dict[str, Any]:
        """The encoder the run's training embeddings came from (run.json `encoder`: name, type, model,
        revision, normalize, dim; whatever is known), with `dim` from model.json when run.json lacks it."""
        enc = (self.record() or {}).get("encoder") or {}
        if not isinstance(enc, dict) or not isinstance(enc.get("dim", 0), int):
            raise CorruptFileError(self.file(RECORD), f"{self.file(RECORD)}: encoder is not a mapping with an integer "
                                   f"dim; {DAMAGED}")
        enc = dict(enc)
        if "dim" not in enc and self.file(MODEL).is_file():
            dim = self.read_json(MODEL).get("embed_dim")
            if dim is not None:
                enc["dim"] = int(dim)
        return enc


def check_finite(tensors: Any, path: str | os.PathLike, hint: str) -> None:
    """CorruptFileError naming `path` and the first tensor of `tensors` (a name -> tensor mapping) that holds
    NaN or inf."""
    bad = [k for k, t in (tensors.items() if isinstance(tensors, Mapping) else ())
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CorruptFileError(path, f"{path}: the weights hold NaN or inf ({bad[0]}{more}); {hint}")


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
               mmap: bool = False, what: str = "the checkpoint",
               hint: str = "it is damaged or not a locdiff checkpoint: delete it to train from scratch",
               ) -> dict[str, Any]:
    """torch.load with weights_only=True (the project's one torch reader): a file carrying code is refused
    (its code never runs), a damaged one is a CorruptFileError naming it (`what`, `hint`). mmap=True maps
    the tensors instead of reading them."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the read, a device never end it
        raise CorruptFileError(path, f"{path}: not a regular file; {hint}")
    with reraise_for(path, what=what, hint=hint):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except (OSError, MemoryError, ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError,
                zipfile.BadZipFile):
            raise  # reraise_for names the file and the kind of damage
        except Exception as err:  # noqa: BLE001 - whatever else the reader of a crafted file raises
            raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(state, dict):
        raise CorruptFileError(path, f"{path}: not a locdiff checkpoint (a {type(state).__name__}); delete it "
                               "to train from scratch")
    return state


def check_checkpoint(state: dict[str, Any], path: str | os.PathLike, *, embed_dim: int | None = None,
                     data: str = "the data") -> None:
    """UserError naming the checkpoint when it lacks a key every checkpoint has, or was trained on
    embeddings of another dimension than `embed_dim` (the dimension of `data`)."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CorruptFileError(path, f"{path}: not a complete locdiff checkpoint (no {', '.join(map(repr, missing))}); "
                               "delete it to train from scratch")
    step = state["step"]
    if type(step) is not int or not 0 <= step <= MAX_STEPS:
        raise CorruptFileError(path, f"{path}: not a locdiff checkpoint (step {str(step)[:40]!r}, not an integer in "
                               f"[0, {MAX_STEPS:,}]); delete it to train from scratch")
    dim = state.get("embed_dim")
    if dim is not None and (type(dim) is not int or dim < 1):
        raise CorruptFileError(path, f"{path}: not a locdiff checkpoint (embed_dim {dim!r}); delete it to train "
                               "from scratch")
    if embed_dim is not None and dim is not None and dim != int(embed_dim):
        raise UserError(f"{path}: trained on {dim}-d embeddings, but {data} has {embed_dim}-d; use the data it "
                        "was trained on, or another run folder (--out)")


def encoder_record(manifest: Mapping[str, Any] | None, *, name: str | None = None,
                   dim: int | None = None) -> dict[str, Any]:
    """What made the embeddings: from a features manifest's `encoder` section, or `--encoder NAME` for a
    table (with its dimension; a UserError when the encoder config states another width)."""
    enc: dict[str, Any] = dict((manifest or {}).get("encoder") or {})
    if name and not enc:
        enc = {"name": name}
        try:
            cfg = load_encoder_config(name)
            enc = {"name": cfg.name, "type": cfg.type, "model": cfg.model, "revision": cfg.revision,
                   "normalize": cfg.normalize}
        except (ValueError, FileNotFoundError, OSError):
            cfg = None  # a free-form name: recorded as given
        if cfg is not None and cfg.dim is not None and dim is not None and int(dim) != cfg.dim:
            raise UserError(f"--encoder {name}: makes {cfg.dim}-d embeddings, and the table's are {int(dim)}-d; "
                            "give the encoder that made them (or none)")
    model = enc.get("model")
    if isinstance(model, str) and "://" not in model and not os.path.isabs(model) and os.path.isdir(model):
        enc["model"] = os.path.abspath(model)  # a local encoder folder given relative to where training ran
    if manifest is not None and "embedding" in manifest:
        dim = dim or int(manifest["embedding"]["dim"])
    if dim is not None:
        enc["dim"] = int(dim)
    return enc


def describe_encoder(enc: Mapping[str, Any] | None) -> str:
    """`NAME (MODEL@REVISION, dim D)` from an encoder record, with what is known."""
    enc = enc or {}
    model = enc.get("model")
    if model and enc.get("revision"):
        model = f"{model}@{enc['revision']}"
    inner = ", ".join(p for p in (model, f"dim {enc['dim']}" if enc.get("dim") else None) if p)
    name = enc.get("name") or "an unrecorded encoder"
    return f"{name} ({inner})" if inner else str(name)


def check_encoder(run_encoder: Mapping[str, Any], data_encoder: Mapping[str, Any] | None, dim: int, *,
                  run: str, data: str) -> None:
    """Refuse embeddings that another encoder made than the run's (a one-line UserError).

    The dimensions must match; so must the model, its revision and the normalisation where both sides
    record them (the encoder name is compared only when neither side records its model: a config name
    and a hub id can name the same model).

    Args:
        run_encoder: the run's record (`RunFolder.encoder()`).
        data_encoder: the data's encoder (a features manifest's `encoder`), None when unknown (a table).
        dim: the data's embedding dimension.
        run, data: how to name the run and the data in the message.
    """
    data_enc = {**(data_encoder or {}), "dim": int(dim)}
    problems = []
    if run_encoder.get("dim") is not None and int(run_encoder["dim"]) != int(dim):
        problems.append(f"dimension {dim} != {run_encoder['dim']}")
    both = lambda key: run_encoder.get(key) is not None and data_enc.get(key) is not None  # noqa: E731
    same_content = both("revision") and str(run_encoder["revision"]).startswith("sha256:") \
        and run_encoder["revision"] == data_enc["revision"]  # a packaged encoder: its files, wherever they lie
    if both("model") and not same_content and str(run_encoder["model"]) != str(data_enc["model"]):
        problems.append(f"model {data_enc['model']} != {run_encoder['model']}")
    elif not both("model") and both("name") and run_encoder["name"] != data_enc["name"]:
        problems.append(f"encoder {data_enc['name']} != {run_encoder['name']}")
    if both("revision") and str(run_encoder["revision"]) != str(data_enc["revision"]):
        problems.append(f"revision {data_enc['revision']} != {run_encoder['revision']}")
    if both("normalize") and bool(run_encoder["normalize"]) != bool(data_enc["normalize"]):
        problems.append(f"normalize {data_enc['normalize']} != {run_encoder['normalize']}")
    if problems and not data_encoder:  # a table: only its dimension is known
        raise UserError(f"{data}: column 'embedding' has dimension {dim}; {run} was trained on "
                        f"{describe_encoder(run_encoder)} embeddings; embed the data with the run's encoder, "
                        "or use a run trained on this encoder")
    if problems:
        raise UserError(f"{data}: embeddings from {describe_encoder(data_enc)} do not fit {run}, trained on "
                        f"{describe_encoder(run_encoder)} embeddings ({'; '.join(problems)}); embed the data "
                        "with the run's encoder, or use a run trained on this encoder")


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def resolve_reference(folder: str | os.PathLike, value: object, what: str, *, hub_id: bool = False) -> str:
    """Where a reference read from a run's or model's files (model.json `gallery.uri`, run.json `encoder.model`)
    may lead: a path relative to `folder` that stays inside it (returned absolute), a local absolute path
    recorded at training time, or, with hub_id=True, a Hugging Face hub id (`org/name`). Any URL scheme
    (s3://, http://, ftp://, memory://, file://, ...) and any path leading out of the folder is a UserError
    naming `what` (the file and key): nothing is fetched or opened for it. A run trained on remote data keeps
    its gallery inside the run folder (`locdiff.gallery.gallery_for_run`)."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise CorruptFileError(what, f"{what}: not a location ({str(value)[:80]!r}); {DAMAGED}")
    if "://" in value or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value):
        raise UserError(f"{what}: {value[:200]!r} is not accepted from a run folder (only paths inside it and "
                        "local paths recorded at training; nothing is fetched from it); train the run again")
    if os.path.isabs(value):
        return value
    if hub_id and not value.startswith(".") and _HUB_ID.fullmatch(value) and ".." not in value:
        return value
    root = Path(folder).resolve()
    target = (root / value).resolve()
    if not target.is_relative_to(root):
        raise UserError(f"{what}: {value[:200]!r} leads out of {folder}; a run's references stay inside it")
    return str(target)


def absolute_location(data: Any) -> Any:
    """A local path as an absolute one (a run records where its data is: `--train data/x.parquet` must
    still be found from another folder); URLs, tables and other objects unchanged."""
    if isinstance(data, str | os.PathLike) and "://" not in str(data):
        return os.path.abspath(os.fspath(data))
    return data


def check_data_encoder(run: RunFolder, data: str) -> None:
    """`check_encoder` for a features folder (its manifest names the encoder) or a table (the dimension
    only) that is about to be predicted with `run`."""
    src = open_source(data)
    check_encoder(run.encoder(), (src.manifest or {}).get("encoder"), src.dim, run=str(run.path),
                  data=src.location)
