"""The image-encoder interface, in two steps so that they can run in different processes:
`Preprocessor` (PIL images -> model input array; CPU only, no weights) and `ImageEncoder.embed`
(model input -> (N, d) float32 embeddings). `ImageEncoder.encode` does both."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np
from PIL import Image

from locdiff.data.config import EncoderConfig


class Preprocessor(ABC):
    """Turns decoded RGB images into the encoder's input array (no model weights loaded)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """(N,) RGB images, N >= 1 -> (N, ...) float32 model inputs."""


class ImageEncoder(ABC):
    """An image encoder. Subclasses load their weights in __init__ and set `dim` and `preprocess`."""

    preprocess: Preprocessor

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

    def cpu_threads(self) -> int:
        """How many CPU cores `embed` keeps busy: 0 on an accelerator; here, all of them."""
        return os.cpu_count() or 1

    @abstractmethod
    def embed(self, inputs: np.ndarray) -> np.ndarray:
        """(N, ...) model inputs from `preprocess` (N may be 0) -> (N, dim) float32 embeddings."""

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """(N,) RGB images -> (N, dim) float32 embeddings."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed(self.preprocess(images))
