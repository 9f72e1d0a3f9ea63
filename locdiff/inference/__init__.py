"""Photo in, location out: `Geolocator` (geolocator.py), the MLflow model around it (pyfunc.py) and the
batch location of a whole folder, URL list or S3 prefix (batch.py, the `locate-photos` flow)."""

from __future__ import annotations

from typing import Any

__all__ = ["Geolocator", "Location", "Mode"]


def __getattr__(name: str) -> Any:  # lazy: importing locdiff.inference loads no torch
    if name in __all__:
        from locdiff.inference import geolocator

        return getattr(geolocator, name)
    raise AttributeError(f"module 'locdiff.inference' has no attribute {name!r}")
