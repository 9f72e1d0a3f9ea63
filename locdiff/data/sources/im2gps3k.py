"""Im2GPS3k (Hays & Efros; 2,997 Flickr test images): the GeoEstimation metadata CSV (IMG_ID, LAT, LON,
Places365 labels) and a zip of the images named by IMG_ID."""

from locdiff.data.sources.base import TabularSource


class Im2GPS3kSource(TabularSource):
    """configs/datasets/im2gps3k.yaml: CSV columns IMG_ID, LAT, LON; images `IMG_ID` in the archive."""


SOURCE = Im2GPS3kSource
