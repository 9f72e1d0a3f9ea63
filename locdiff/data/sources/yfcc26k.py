"""YFCC26k / YFCC25600 (Müller-Budack et al. 2018; 25,600 YFCC100M test images): the GeoEstimation
metadata CSV (IMG_ID such as `45/77/3228511372.jpg`, LAT, LON) plus the images, either as an archive
with those relative paths or downloaded from the published URL list (IMG_ID -> url)."""

from locdiff.data.sources.base import TabularSource


class Yfcc26kSource(TabularSource):
    """configs/datasets/yfcc26k.yaml."""


SOURCE = Yfcc26kSource
