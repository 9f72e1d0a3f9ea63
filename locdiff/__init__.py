"""LocDiff: image geolocalization by latent diffusion in the space of SHDD location codes.

    from locdiff import Geolocator
    g = Geolocator.load("models:/locdiff@champion")   # or a run folder
    g.locate(["photo.jpg"], top_k=5)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Geolocator", "Location", "Mode", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import locdiff` stays light (no torch until it is used)
    if name in ("Geolocator", "Location", "Mode"):
        from locdiff.inference import geolocator

        return getattr(geolocator, name)
    raise AttributeError(f"module 'locdiff' has no attribute {name!r}")
