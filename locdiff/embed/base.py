"""The image-encoder interface: PIL images in, (N, d) float32 embeddings out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from PIL import Image

from locdiff.data.config import EncoderConfig


class ImageEncoder(ABC):
    """An image encoder. Subclasses load their weights in __init__ and set `dim`."""

    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        self.dim = 0

    @property
    def name(self) -> str:
        return self.cfg.name

    def describe(self) -> dict[str, object]:
        """What the features manifest records about the encoder."""
        return {"name": self.cfg.name, "type": self.cfg.type, "model": self.cfg.model,
                "revision": self.cfg.revision, "normalize": self.cfg.normalize}

    @abstractmethod
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """(N,) RGB images -> (N, dim) float32 embeddings."""


def make_encoder(cfg: EncoderConfig) -> ImageEncoder:
    """The encoder an EncoderConfig describes (ValueError for an unknown type)."""
    if cfg.type == "clip":
        from locdiff.embed.clip import ClipEncoder

        return ClipEncoder(cfg)
    raise ValueError(f"encoder {cfg.name!r}: unknown type {cfg.type!r}; valid: 'clip'")
