"""Image encoders behind one interface (`ImageEncoder`, with its `Preprocessor`), built from an
EncoderConfig by `make_encoder` / `make_preprocessor`."""

from __future__ import annotations

from locdiff.data.config import EncoderConfig
from locdiff.embed.base import ImageEncoder, Preprocessor

__all__ = ["ImageEncoder", "Preprocessor", "make_encoder", "make_preprocessor"]

ENCODER_TYPES = ("clip",)


def _check_type(cfg: EncoderConfig) -> None:
    if cfg.type not in ENCODER_TYPES:
        raise ValueError(f"encoder {cfg.name!r}: unknown type {cfg.type!r}; valid: "
                         + ", ".join(repr(t) for t in ENCODER_TYPES))


def make_encoder(cfg: EncoderConfig) -> ImageEncoder:
    """The encoder an EncoderConfig describes, weights loaded (ValueError for an unknown type)."""
    _check_type(cfg)
    from locdiff.embed.clip import ClipEncoder

    return ClipEncoder(cfg)


def make_preprocessor(cfg: EncoderConfig) -> Preprocessor:
    """The encoder's input preprocessing alone, without its weights (ValueError for an unknown type)."""
    _check_type(cfg)
    from locdiff.embed.clip import ClipPreprocessor

    return ClipPreprocessor(cfg)
