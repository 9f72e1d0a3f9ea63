"""YFCC4k (Vo et al. 2017; 4,536 YFCC100M test images): YFCC100M metadata (`name`, `lat`, `lon`,
`PhotoURL`, ...); images from an archive named by `name`, or else downloaded from `PhotoURL`
(dead Flickr links are retried, then counted)."""

from locdiff.data.sources.base import TabularSource


class Yfcc4kSource(TabularSource):
    """configs/datasets/yfcc4k.yaml."""


SOURCE = Yfcc4kSource
