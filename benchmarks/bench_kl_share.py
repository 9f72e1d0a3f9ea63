"""How much of the training gradient each term of LocDiff's objective carries (issue 19, item 2).

For a config (default base.yaml: kl + mse + the prior head's own loss) it measures, on a few training
batches, the norm of the parameter gradient of each weighted term (kl_weight * SHDD-KL, mse_weight * MSE,
prior_weight * the prior's loss) and its share of their sum, the cosine between the KL and MSE
gradients, and how concentrated the SHDD-KL target is (its mass within 500 km of the truth); at the
initial weights and after training the config for `--steps` steps on the data. A share of a few percent
says the term barely trains anything.

    python -m benchmarks.bench_kl_share [--config configs/model/base.yaml] [--data TRAIN.parquet] \
        [--steps 500] [--set key=value ...]

Without --data, a synthetic benchmark (`locdiff synth` world, 20,000 rows of 128-d) is generated in memory.
Output: benchmarks/results/kl_grad_share.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_model import recorded_args
from benchmarks.common import model_config, print_table, save
from locdiff import shdd
from locdiff.geo import haversine_km
from locdiff.io import read_embeddings
from locdiff.model.config import Config, load_config
from locdiff.model.locdiff_method import LocDiffMethod
from locdiff.model.objective import LocDiffTask, build_model, diffusion_loss
from locdiff.shdd.loss import default_tau
from locdiff.worlds.synth import SynthConfig, make_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _only(config: Config, objective: str) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, objective=objective))


def term_gradients(model: torch.nn.Module, config: Config, batch: dict, generator: torch.Generator
                   ) -> dict[str, float]:
    """Gradient norms of each weighted term of the objective on one batch, and the KL-MSE cosine."""
    task = LocDiffTask(config)
    d, tc = config.diffusion, config.train
    z0 = task.targets(batch)
    t = torch.randint(d.min_train_timestep, task.schedule.timesteps, (len(z0),), generator=generator)
    zt = task.schedule.add_noise(z0, torch.randn(z0.shape, generator=generator), t)
    out, mu = model(zt, t, batch["embedding"], None, return_prior=True)
    x0 = task.schedule.predict_x0(out.float(), zt, t, d.prediction)
    terms = {"kl": tc.kl_weight * diffusion_loss(x0, z0, _only(config, "kl"))[0],
             "mse": tc.mse_weight * diffusion_loss(x0, z0, _only(config, "mse"))[0]}
    if model.head is not None and tc.prior_weight > 0:
        terms["prior"] = tc.prior_weight * diffusion_loss(mu.float(), z0, _only(config, tc.objective))[0]
    params = list(model.parameters())
    grads = {}
    for name, loss in terms.items():
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                 for x, p in zip(g, params, strict=True)])
    row = {f"grad_{k}": float(v.norm()) for k, v in grads.items()}
    row["cos_kl_mse"] = float(torch.nn.functional.cosine_similarity(grads["kl"], grads["mse"], dim=0))
    return row


def target_mass_within(config: Config, lat: np.ndarray, lon: np.ndarray, radius_km: float = 500.0) -> float:
    """Mean share of the SHDD-KL target distribution (on its grid) within radius_km of the truth."""
    degree = config.shdd.degree
    n = config.shdd.kl_grid_size or 8 * shdd.num_coefficients(degree)
    glat, glon = shdd.fibonacci_lattice(n)
    basis = shdd.spherical_harmonics(glat, glon, degree).double()  # (G, D)
    code = shdd.encode(torch.as_tensor(lat), torch.as_tensor(lon), degree).double()  # (N, D)
    tau = config.shdd.kl_tau or default_tau(degree)
    p = torch.softmax(code @ basis.T / tau, dim=1).numpy()  # equal-area lattice: equal cell weights
    near = np.asarray(haversine_km(lat[:, None], lon[:, None], glat.numpy()[None], glon.numpy()[None])) <= radius_km
    return float((p * near).sum(1).mean())


def measure(model: torch.nn.Module, config: Config, table, batches: int, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    for p in model.parameters():  # the trained predictor comes back frozen (the EMA weights)
        p.requires_grad_(True)
    rows = []
    for _ in range(batches):
        i = rng.choice(len(table), config.train.batch_size, replace=False)
        batch = {"embedding": torch.as_tensor(np.asarray(table.embedding[i])),
                 "lat": torch.as_tensor(table.lat[i]), "lon": torch.as_tensor(table.lon[i])}
        rows.append(term_gradients(model, config, batch, g))
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    total = sum(v for k, v in out.items() if k.startswith("grad_"))
    out.update({f"share_{k[5:]}": v / total for k, v in list(out.items()) if k.startswith("grad_")})
    out["kl_over_mse"] = out["grad_kl"] / out["grad_mse"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/model/base.yaml"), type=model_config,
                    help="model config name or YAML path (default base)")
    ap.add_argument("--data", help="a labelled embeddings table (default: a synthetic one in memory)")
    ap.add_argument("--steps", type=int, default=500, help="training steps before the second measurement")
    ap.add_argument("--batches", type=int, default=8, help="batches averaged per measurement")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    config = load_config(args.config, [*args.set, f"train.steps={args.steps}", "train.val_share=0",
                                       "hybrid.tune_on_val=false"])
    table = read_embeddings(args.data) if args.data else \
        make_benchmark(SynthConfig(n_train=20_000, n_test=1, n_unseen=1, dim=128, seed=0))["train"]
    model = build_model(config, table.dim)
    emb = np.asarray(table.embedding, np.float64)
    model.set_embedding_stats(torch.as_tensor(emb.mean(0)), torch.as_tensor(emb.std(0)))
    rows = [{"weights": "initial", **measure(model, config, table, args.batches, seed=1)}]
    method = LocDiffMethod(config)
    with tempfile.TemporaryDirectory() as tmp:
        method.fit(table, None, tmp, progress=False)
    rows.append({"weights": f"after {args.steps} steps", **measure(method.model, config, table, args.batches, seed=1)})
    mass = target_mass_within(config, np.asarray(table.lat[:256]), np.asarray(table.lon[:256]))
    print_table(rows, "gradient norm of each weighted term, and its share")
    print(f"SHDD-KL target: {100 * mass:.1f} % of its mass within 500 km of the truth "
          f"(tau {config.shdd.kl_tau or default_tau(config.shdd.degree):.2f}, degree {config.shdd.degree}; "
          f"uniform would be {100 * (1 - math.cos(500 / 6371.0088)) / 2:.2f} %)")
    # no machine-local path in the JSON: the config relative to the repository, the data by its file name
    save("kl_grad_share", {"config": recorded_args(args)["config"], "overrides": args.set,
                           "data": Path(args.data).name if args.data else "synth 20,000 x 128",
                           "rows": rows, "kl_target_mass_within_500km": mass})


if __name__ == "__main__":
    main()
