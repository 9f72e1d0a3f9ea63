"""The data layer: sources -> validated WebDataset shards -> embeddings and SHDD targets, on a local
folder or S3. Entry points: `locdiff.data.ingest.ingest`, `locdiff.data.featurize.embed`,
`locdiff.data.features.load_features` and `export_features`; training and prediction data is read through
`locdiff.data.datasource.open_source`. The package imports none of its modules: `from locdiff.data import
storage` loads the storage module alone."""
