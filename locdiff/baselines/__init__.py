"""Baselines run by the same `locdiff train/predict` pipeline as LocDiff (see locdiff.methods.METHODS):

- `knn`: top-1 (or top-k) cosine retrieval over the training embeddings (GeoCLIP/Img2Loc style).
- `geocell`: classification over adaptive cells built from the training locations (PlaNet/PIGEON style).
- `regress`: an MLP to the unit vector.
- `flow`: conditional flow matching on the unit vector in R^3, sampled with an ODE solver (PLONK style).

Options come from the run config's `baselines.<name>` mapping; unknown keys are rejected.
"""

__all__ = ["knn", "geocell", "regress", "flow"]
