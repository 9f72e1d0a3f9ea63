"""Image encoders behind one interface (`ImageEncoder`, with its `Preprocessor`), built from an
EncoderConfig by `make_encoder` / `make_preprocessor`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from locdiff.data.config import EncoderConfig
from locdiff.embed.base import ImageEncoder, Preprocessor
from locdiff.embed.clip import ClipEncoder, ClipPreprocessor

__all__ = ["ImageEncoder", "Preprocessor", "encoder_digest", "make_encoder", "make_preprocessor"]

ENCODER_TYPES = ("clip",)


def _check_type(cfg: EncoderConfig) -> None:
    if cfg.type not in ENCODER_TYPES:
        raise ValueError(f"encoder {cfg.name!r}: unknown type {cfg.type!r}; valid: "
                         + ", ".join(repr(t) for t in ENCODER_TYPES))


def make_encoder(cfg: EncoderConfig) -> ImageEncoder:
    """The encoder an EncoderConfig describes, weights loaded (ValueError for an unknown type)."""
    _check_type(cfg)
    return ClipEncoder(cfg)


def make_preprocessor(cfg: EncoderConfig) -> Preprocessor:
    """The encoder's input preprocessing alone, without its weights (ValueError for an unknown type)."""
    _check_type(cfg)
    return ClipPreprocessor(cfg)


def encoder_digest(folder: str | Path) -> str:
    """sha256 of a local encoder folder's model files (each name and its bytes; *.json and *.safetensors,
    in name order): the identity of a packaged encoder, wherever its folder lies."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
