"""LocDiff's model: CS-UNet denoiser, VP cosine schedule, DDIM sampler, training, prediction, LocDiff-H.

Submodules are imported on use; see config.py, csunet.py, schedule.py, ddim.py, sampler.py, objective.py,
predict.py, hybrid.py and locdiff_method.py (`LocDiffMethod`, the method behind `--method locdiff`).
"""
