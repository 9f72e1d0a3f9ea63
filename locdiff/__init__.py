"""LocDiff: image geolocalization by latent diffusion in the space of SHDD location codes."""

__version__ = "0.1.0"
