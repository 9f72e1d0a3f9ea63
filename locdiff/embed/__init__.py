"""Image encoders behind one interface (`ImageEncoder`), built from an EncoderConfig by `make_encoder`."""

from locdiff.embed.base import ImageEncoder, make_encoder

__all__ = ["ImageEncoder", "make_encoder"]
