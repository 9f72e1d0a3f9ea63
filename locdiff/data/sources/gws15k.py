"""GWS15k (Clark et al. 2023; 15k Google Street View images): not public. Ingested from a folder (or
archive, or s3:// prefix) the user has, holding a CSV of id, lat, lon and the images."""

from locdiff.data.sources.folder import FolderSource


class Gws15kSource(FolderSource):
    """configs/datasets/gws15k.yaml (requires --source)."""


SOURCE = Gws15kSource
