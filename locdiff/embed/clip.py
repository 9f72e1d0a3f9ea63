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
from locdiff.embed.base import ImageEncoder

log = logging.getLogger(__name__)


class ClipEncoder(ImageEncoder):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection
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
            # safetensors only: a model folder or hub repo holding pickled weights (pytorch_model.bin) is refused
            self.model = CLIPVisionModelWithProjection.from_pretrained(cfg.model, config=config,
                                                                       use_safetensors=True, **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model = self.model.eval().to(self.device)
        self.processor = CLIPImageProcessor.from_pretrained(cfg.model, **kw)
        self.dim = int(self.model.config.projection_dim)
        precision = cfg.precision
        if precision == "auto":
            precision = "float32" if self.device.type != "cuda" else (
                "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        self.autocast_dtype = None if precision == "float32" else getattr(torch, precision)
        log.info("CLIP encoder %s (rev %s) on %s, %s, dim %d", cfg.model, cfg.revision, self.device,
                 precision, self.dim)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            emb = self.model(pixel_values=pixels).image_embeds
        emb = emb.float()
        if self.cfg.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.cpu().numpy()
