"""Photo in, location out: `Geolocator` (geolocator.py), the MLflow model around it (pyfunc.py), where a
model is found (model_uri.py) and the batch location of a whole folder, URL list or S3 prefix (batch.py,
the `locate-photos` flow)."""

from __future__ import annotations

from locdiff.inference.geolocator import Geolocator, Location, Mode

__all__ = ["Geolocator", "Location", "Mode"]
