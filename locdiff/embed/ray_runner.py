"""Scale-out of the embedding stage with Ray Data: one actor per GPU (or a few CPU actors), each holding
the encoder once and turning whole image shards into feature shards, so resuming and the manifest work
exactly as in the local backend.

Ray is imported inside the function; on a CPU-only machine the actors ask for half a CPU each so that
Ray Data's own tasks still get scheduled (see STACK.md: 2 cores, 1-CPU workers hung Ray Data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from locdiff.data.config import EncoderConfig

log = logging.getLogger(__name__)


class _ShardEmbedder:
    """A Ray Data actor: loads the encoder once, then embeds one shard job per row."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from locdiff.embed import make_encoder

        self.encoder = make_encoder(EncoderConfig(**cfg))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        from locdiff.data.featurize import embed_shard

        jobs = [json.loads(j) for j in batch["job"]]
        return {"info": [json.dumps(embed_shard(job, self.encoder)) for job in jobs]}


def embed_with_ray(jobs: list[dict[str, Any]], cfg: EncoderConfig, *, num_actors: int | None = None,
                   address: str | None = None) -> list[dict[str, Any]]:
    """Run `embed_shard` for every job on a Ray cluster (started locally when none is running).

    Args:
        num_actors: actors in the pool; default one per GPU, or 1 without GPUs.
        address: Ray cluster address (default: RAY_ADDRESS or a new local cluster).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = num_actors or max(1, gpus)
    ds = ray.data.from_items([{"job": json.dumps(j)} for j in jobs])
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 0.5}
    out = ds.map_batches(_ShardEmbedder, fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg)},
                         batch_size=1, concurrency=n, **resources)
    infos = [json.loads(r["info"]) for r in out.take_all()]
    log.info("ray: embedded %d shards with %d actor(s)", len(infos), n)
    return infos
