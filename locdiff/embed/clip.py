"""CLIP image encoder through transformers (default: openai/clip-vit-large-patch14, 768-d).

Only the vision tower and its projection are loaded (`CLIPVisionModelWithProjection` reads a full CLIP
checkpoint). Runs on CUDA when available, with autocast in float16 (bfloat16 where supported) unless the
config says otherwise, else on CPU in float32.

The pixels: `ClipPreprocessor` computes what transformers' CLIPImageProcessor computes with its PIL
backend (resize the shortest edge with PIL, centre crop, rescale, normalise) for the checkpoint's
preprocessor_config.json, value for value, in PIL + numpy: it imports neither torch nor transformers, so
the Ray runner's decode workers start light, and it gives the same pixels whether or not torchvision is
installed. A config outside that plain pipeline goes through CLIPImageProcessor itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from locdiff.data.config import EncoderConfig
from locdiff.embed.base import ImageEncoder, Preprocessor
from locdiff.errors import UserError, one_line

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CONFIG_KEYS = {"crop_size", "do_center_crop", "do_convert_rgb", "do_normalize", "do_rescale", "do_resize",
                "image_mean", "image_std", "resample", "rescale_factor", "size", "image_processor_type",
                "feature_extractor_type", "processor_class"}
_CONFIG_TYPES = {None, "CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
                 "CLIPFeatureExtractor"}


@dataclass(frozen=True)
class ClipPixels:
    """CLIPImageProcessor's PIL pipeline as plain settings: resize so that the shortest edge is
    `shortest_edge` (PIL `resample`), centre crop to `crop` (height, width), multiply by `scale` (in
    float64, then float32; None: no rescale), then (x - mean) / std in float32 (None: no normalise)."""

    shortest_edge: int
    crop: tuple[int, int]
    resample: int
    scale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClipPixels | None:
        """The settings of a preprocessor_config.json (CLIPImageProcessor's defaults for absent keys),
        or None when that config asks for more than this pipeline does (then use transformers)."""
        kind = config.get("image_processor_type", config.get("feature_extractor_type"))
        if set(config) - _CONFIG_KEYS or kind not in _CONFIG_TYPES:
            return None
        if not config.get("do_resize", True) or not config.get("do_center_crop", True):
            return None
        size = config.get("size", 224)
        size = {"shortest_edge": size} if isinstance(size, int) else size
        crop = config.get("crop_size", 224)
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        if not isinstance(size, dict) or set(size) != {"shortest_edge"} or not isinstance(crop, dict) \
                or set(crop) != {"height", "width"}:
            return None
        edge, ch, cw = int(size["shortest_edge"]), int(crop["height"]), int(crop["width"])
        if ch > edge or cw > edge:  # the crop would be padded: leave that to transformers
            return None
        mean = std = None
        if config.get("do_normalize", True):
            mean = tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN))
            std = tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD))
            if len(mean) != 3 or len(std) != 3:
                return None
        scale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
        return cls(edge, (ch, cw), int(config.get("resample", Image.Resampling.BICUBIC)), scale, mean, std)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize (transformers' get_resize_output_image_size)."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """(N,) RGB images -> (N, 3, H, W) float32."""
        ch, cw = self.crop
        out = np.empty((len(images), 3, ch, cw), np.float32)
        mean = None if self.mean is None else np.array(self.mean, np.float32)
        std = None if self.std is None else np.array(self.std, np.float32)
        for i, im in enumerate(images):
            w, h = self.resized_size(*im.size)
            im = im.resize((w, h), resample=self.resample)
            top, left = (h - ch) // 2, (w - cw) // 2
            x = np.asarray(im.crop((left, top, left + cw, top + ch)))
            x = (x.astype(np.float64) * self.scale).astype(np.float32) if self.scale is not None \
                else x.astype(np.float32)
            if mean is not None:
                x = (x - mean) / std
            out[i] = x.transpose(2, 0, 1)
        return out


def _processor_config(cfg: EncoderConfig) -> dict[str, Any] | None:
    """The checkpoint's preprocessor_config.json (local folder, or the hub at cfg.revision), or None."""
    try:
        if Path(cfg.model).is_dir():
            path = Path(cfg.model) / "preprocessor_config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(cfg.model, "preprocessor_config.json", revision=cfg.revision))
        config = json.loads(path.read_text())
    except (OSError, ValueError, ImportError) as err:
        log.debug("%s: no readable preprocessor_config.json (%s); using CLIPImageProcessor", cfg.model, err)
        return None
    return config if isinstance(config, dict) else None


class ClipPreprocessor(Preprocessor):
    """The checkpoint's CLIP preprocessing (resize, centre crop, rescale, normalise) -> (N, 3, H, W)
    float32: `ClipPixels` when the config is the plain pipeline, else transformers' CLIPImageProcessor."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        config = _processor_config(cfg)
        self.pixels = ClipPixels.from_config(config) if config is not None else None
        self._hf: Any = None
        if self.pixels is None:
            self._transformers_processor()

    def _transformers_processor(self) -> Any:
        if self._hf is None:
            try:  # transformers >= 5: the PIL backend by name (CLIPImageProcessor may pick torchvision)
                from transformers import CLIPImageProcessorPil as Processor
            except ImportError:
                from transformers import CLIPImageProcessor as Processor

            kw = {"revision": self.cfg.revision} if self.cfg.revision else {}
            self._hf = Processor.from_pretrained(self.cfg.model, **kw)
        return self._hf

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        if self.pixels is not None and all(im.mode == "RGB" for im in images):
            return self.pixels(images)
        processor = self._transformers_processor()
        return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)


class ClipEncoder(ImageEncoder):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoConfig, CLIPVisionModelWithProjection
        from transformers.utils import logging as hf_logging

        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        kw = {"revision": cfg.revision} if cfg.revision else {}
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        try:
            config = AutoConfig.from_pretrained(cfg.model, **kw)
            if getattr(config, "model_type", "") == "clip":
                # a full CLIP checkpoint: keep its vision tower and projection (of the top-level width)
                vision = config.vision_config
                vision.projection_dim = config.projection_dim
                config = vision
            hf_logging.set_verbosity_error()  # the unused text tower is expected: no table of its weights
            hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr: the log line below says it
            # safetensors only: a model folder or hub repo holding pickled weights (pytorch_model.bin) is refused
            self.model = CLIPVisionModelWithProjection.from_pretrained(cfg.model, config=config,
                                                                       use_safetensors=True, **kw)
        except OSError as err:  # offline, no such model or revision, no safetensors: say which encoder
            at = f" at revision {cfg.revision}" if cfg.revision else ""
            raise UserError(f"encoder {cfg.name!r}: cannot load {cfg.model}{at}: {one_line(str(err))}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.model = self.model.eval().to(self.device)
        self.preprocess = ClipPreprocessor(cfg)
        self.dim = int(self.model.config.projection_dim)
        if cfg.dim is not None and cfg.dim != self.dim:
            raise UserError(f"encoder {cfg.name!r}: the config says dim {cfg.dim}, and {cfg.model} makes "
                            f"{self.dim}-d embeddings; correct the config's dim")
        precision = cfg.precision
        if precision == "auto":
            precision = "float32" if self.device.type != "cuda" else (
                "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        self.autocast_dtype = None if precision == "float32" else getattr(torch, precision)
        log.info("CLIP encoder %s (rev %s) on %s, %s, dim %d", cfg.model, cfg.revision, self.device,
                 precision, self.dim)

    def cpu_threads(self) -> int:

        return torch.get_num_threads() if self.device.type == "cpu" else 0

    def embed(self, inputs: np.ndarray) -> np.ndarray:

        if len(inputs) == 0:
            return np.zeros((0, self.dim), np.float32)
        pixels = torch.from_numpy(np.require(inputs, np.float32, ["C", "W"])).to(self.device)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            emb = self.model(pixel_values=pixels).image_embeds
        emb = emb.float()
        if self.cfg.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.cpu().numpy()
