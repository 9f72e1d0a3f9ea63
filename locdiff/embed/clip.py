"""CLIP image encoder through transformers (default: openai/clip-vit-large-patch14, 768-d).

Only the vision tower and its projection are loaded (`CLIPVisionModelWithProjection` reads a full CLIP
checkpoint). Runs on CUDA when available, with autocast in float16 (bfloat16 where supported) unless the
config says otherwise, else on CPU in float32.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from PIL import Image

from locdiff.data.config import EncoderConfig
from locdiff.embed.base import ImageEncoder, Preprocessor

log = logging.getLogger(__name__)


class ClipPreprocessor(Preprocessor):
    """The checkpoint's CLIPImageProcessor (resize, centre crop, normalise) -> (N, 3, H, W) float32."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        from transformers import CLIPImageProcessor

        kw = {"revision": cfg.revision} if cfg.revision else {}
        self.processor = CLIPImageProcessor.from_pretrained(cfg.model, **kw)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return np.asarray(self.processor(images=images, return_tensors="np")["pixel_values"], np.float32)


class ClipEncoder(ImageEncoder):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoConfig, CLIPVisionModelWithProjection
        from transformers.utils import logging as hf_logging

        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        kw = {"revision": cfg.revision} if cfg.revision else {}
        config = AutoConfig.from_pretrained(cfg.model, **kw)
        if getattr(config, "model_type", "") == "clip":
            # a full CLIP checkpoint: keep its vision tower and projection (of the top-level width)
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            config = vision
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the unused text tower is expected: no table of its weights
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(cfg.model, config=config, **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model = self.model.eval().to(self.device)
        self.preprocess = ClipPreprocessor(cfg)
        self.dim = int(self.model.config.projection_dim)
        precision = cfg.precision
        if precision == "auto":
            precision = "float32" if self.device.type != "cuda" else (
                "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        self.autocast_dtype = None if precision == "float32" else getattr(torch, precision)
        log.info("CLIP encoder %s (rev %s) on %s, %s, dim %d", cfg.model, cfg.revision, self.device,
                 precision, self.dim)

    @torch.inference_mode()
    def embed(self, inputs: np.ndarray) -> np.ndarray:
        if len(inputs) == 0:
            return np.zeros((0, self.dim), np.float32)
        pixels = torch.from_numpy(np.require(inputs, np.float32, ['C', 'W'])).to(self.device)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            emb = self.model(pixel_values=pixels).image_embeds
        emb = emb.float()
        if self.cfg.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.cpu().numpy()
