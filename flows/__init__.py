"""Prefect 3 flows: thin wrappers over `locdiff.orchestration.stages` (ingest, embed, train, evaluate, and the
`train-locdiff` pipeline behind the deployment of the same name)."""
