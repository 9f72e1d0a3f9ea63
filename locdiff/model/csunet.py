"""CS-UNet: a conditional SIREN with a U-Net shape, the LocDiff denoiser (LOCDIFF.md 6).

    z_t (B, D) --in_proj (sine, omega_0)--> width[0]
      encoder: per level, `blocks_per_level` sine residual blocks at widths[0] > widths[1] > ...
      bottleneck: one block at widths[-1]
      decoder: per level (reversed), concat the encoder skip, blocks back up to widths[i]
    --LayerNorm, out_proj--> (B, D)    the z_0 estimate (x0-prediction)

Every block is FiLM-modulated by a conditioning vector c = MLP(image embedding) + MLP(sinusoid(t)) in the
pi-GAN way, h = sin(omega (W x + b) (1 + tanh gamma(c)) + beta(c)). The image-embedding branch can be replaced
by a learned null vector (classifier-free guidance).

With a prior head (network.head_width > 0, x0-prediction), the output is
    z0_hat = a_t z_t + (1 - a_t^2) mu(e) + U-Net(z_t, t, e),   a_t = sqrt(abar_t):
the posterior mean of z0 given z_t when z0 ~ N(mu(e), I), plus the U-Net's correction. mu(e) is a residual
MLP of the embedding: the embedding -> location map, the hard part of the problem, gets a clean path that
the FiLM-modulated sine blocks (whose input at t ~ T is pure noise) did not give it.
Embeddings are standardised inside the model with statistics stored as buffers, so a checkpoint is
self-contained.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from locdiff.model.config import NetworkConfig


def _siren_uniform_(weight: torch.Tensor, bound: float) -> None:
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def timestep_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of integer timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SineFiLMBlock(nn.Module):
    """Pre-norm residual block: x -> skip(x) + W2 dropout(sin(omega (W1 LN(x)) (1 + tanh gamma) + beta))."""

    def __init__(self, dim_in: int, dim_out: int, cond_dim: int, omega: float, dropout: float) -> None:
        super().__init__()
        self.omega = omega
        self.norm = nn.LayerNorm(dim_in)
        self.lin1 = nn.Linear(dim_in, dim_out)
        self.lin2 = nn.Linear(dim_out, dim_out)
        self.film = nn.Linear(cond_dim, 2 * dim_out)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out, bias=False)
        # SIREN hidden-layer init: omega W x has the arcsine-friendly spread sqrt(6/n)
        _siren_uniform_(self.lin1.weight, math.sqrt(6 / dim_in) / omega)
        _siren_uniform_(self.lin2.weight, math.sqrt(6 / dim_out) * 0.5)
        nn.init.zeros_(self.film.weight)  # start as an unmodulated SIREN block
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(cond).chunk(2, dim=-1)  # (B, dim_out) each
        # the modulated frequency 1 + tanh(gamma) stays in (0, 2): an unbounded 1 + gamma let the sine's
        # frequency (and with it every gradient through the block) grow without limit during training
        h = torch.sin(self.omega * self.lin1(self.norm(x)) * (1 + torch.tanh(gamma)) + beta)
        return self.skip(x) + self.lin2(self.drop(h))


class PriorHead(nn.Module):
    """mu(e): standardised embedding -> Linear -> depth x residual [LN, Linear, GELU, Dropout, Linear] -> LN ->
    Linear -> (B, D), the code's conditional mean. The last layer starts at zero (mu = 0: the prior mean of
    the codes), `null` is mu without a condition (classifier-free guidance).

    With components M > 1 the last layer gives M codes (started at small random values: identical ones
    would never separate) and `mix` their logits and log-variances (started at equal weights, variance 1);
    `mixture` returns them, `forward` their mean."""

    def __init__(self, embed_dim: int, dim: int, width: int, depth: int, dropout: float,
                 components: int = 1) -> None:
        super().__init__()
        self.components = components
        self.inp = nn.Linear(embed_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(width, width))
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim * components)
        nn.init.zeros_(self.out.bias)
        if components == 1:
            nn.init.zeros_(self.out.weight)
        else:
            nn.init.normal_(self.out.weight, std=0.5 / math.sqrt(width))
            self.mix = nn.Linear(width, 2 * components)  # logits, log-variances
            nn.init.zeros_(self.mix.weight)
            nn.init.zeros_(self.mix.bias)
        self.null = nn.Parameter(torch.zeros(dim))

    def _hidden(self, e: torch.Tensor) -> torch.Tensor:
        h = self.inp(e)
        for block in self.blocks:
            h = h + block(h)
        return self.norm(h)

    def mixture(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (B, M, D), log-weights (B, M), log-variances (B, M)) of the M components."""
        h = self._hidden(e)
        codes = self.out(h).reshape(h.shape[0], self.components, -1)
        if self.components == 1:
            zero = codes.new_zeros(h.shape[0], 1)
            return codes, zero, zero
        logits, logvar = self.mix(h).chunk(2, dim=-1)
        return codes, torch.log_softmax(logits.float(), -1), logvar.float().clamp(-12.0, 4.0)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        if self.components == 1:
            return self.out(self._hidden(e))
        codes, logw, _ = self.mixture(e)
        return (logw.exp()[..., None] * codes.float()).sum(1)


def mixture_posterior_mean(z: torch.Tensor, a: torch.Tensor, codes: torch.Tensor, logw: torch.Tensor,
                           logvar: torch.Tensor) -> torch.Tensor:
    """E[z0 | z_t] for z0 ~ sum_i w_i N(c_i, s_i^2 I) and z_t = a z0 + sqrt(1 - a^2) eps, in float32.

    Args:
        z: (B, D) z_t. a: (B, 1) sqrt(abar_t). codes: (B, M, D). logw, logvar: (B, M).
    With M = 1 and s^2 = 1 it is a z + (1 - a^2) c, the single-Gaussian skeleton."""
    z, a, codes = z.float(), a.float(), codes.float()
    s2 = logvar.exp()  # (B, M)
    v = a * a * s2 + (1 - a * a)  # (B, M) variance of z_t around a c_i, per coordinate
    diff = z[:, None] - a[:, :, None] * codes  # (B, M, D)
    d = codes.shape[-1]
    logr = logw - 0.5 * diff.pow(2).sum(-1) / v - 0.5 * d * torch.log(v)
    r = torch.softmax(logr, dim=1)  # (B, M) responsibilities
    means = codes + (a * s2 / v)[..., None] * diff
    return (r[..., None] * means).sum(1)


class CSUNet(nn.Module):
    """The conditional sine U-Net denoiser.

    Args:
        dim: D, the SHDD code dimension (input and output).
        embed_dim: d, the image-embedding dimension.
        config: widths, blocks_per_level, omega_0, omega_hidden, dropout, cond_dim, time_dim.
    """

    def __init__(self, dim: int, embed_dim: int, config: NetworkConfig,
                 alphas_cumprod: torch.Tensor | None = None) -> None:
        super().__init__()
        if not config.widths or any(w < 1 for w in config.widths):
            raise ValueError(
                f"network.widths must be a non-empty list of positive integers; got {config.widths}"
            )
        if config.blocks_per_level < 1:
            raise ValueError(f"network.blocks_per_level must be >= 1; got {config.blocks_per_level}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"network.dropout must be in [0, 1); got {config.dropout}")
        self.dim, self.embed_dim, self.config = dim, embed_dim, config
        c, w0 = config.cond_dim, config.widths[0]
        self.register_buffer("emb_mean", torch.zeros(embed_dim))
        self.register_buffer("emb_std", torch.ones(embed_dim))
        self.cond_mlp = nn.Sequential(nn.Linear(embed_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.head: PriorHead | None = None
        if config.head_width > 0:
            if alphas_cumprod is None:
                raise ValueError("the prior head needs the noise schedule (alphas_cumprod)")
            self.head = PriorHead(embed_dim, dim, config.head_width, config.head_depth, config.head_dropout,
                                  config.head_components)
            self.register_buffer("sqrt_abar", alphas_cumprod.sqrt().float())
        self.null_cond = nn.Parameter(torch.zeros(c))  # replaces the image branch when it is dropped
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.cond_act = nn.SiLU()
        # first layer sin(omega_0 W z): z is a D-dimensional unit-variance code, not SIREN's 2-3 coordinates,
        # so W gets SIREN's hidden-layer init (omega_0 W z spreads like U(-sqrt 6, sqrt 6)/sqrt 3 whatever
        # omega_0): with the coordinate init U(-1/n, 1/n) the features had a spread of ~0.02 at omega_0 = 1
        # (the next LayerNorm amplified their gradients ~50x: norms of 1e2..1e7 measured, clipped away)
        # and at omega_0 = 30 every gradient of W was scaled by 30
        self.in_proj = nn.Linear(dim, w0)
        _siren_uniform_(self.in_proj.weight, math.sqrt(6 / dim) / config.omega_0)
        nn.init.zeros_(self.in_proj.bias)
        self.omega_0 = config.omega_0
        om, p, n = config.omega_hidden, config.dropout, config.blocks_per_level
        self.down = nn.ModuleList()
        prev = w0
        for w in config.widths:
            self.down.append(
                nn.ModuleList(SineFiLMBlock(prev if i == 0 else w, w, c, om, p) for i in range(n))
            )
            prev = w
        self.mid = SineFiLMBlock(prev, prev, c, om, p)
        self.up = nn.ModuleList()
        for w in reversed(config.widths):
            self.up.append(
                nn.ModuleList(SineFiLMBlock(prev + w if i == 0 else w, w, c, om, p) for i in range(n))
            )
            prev = w
        self.out_norm = nn.LayerNorm(prev)
        self.out_proj = nn.Linear(prev, dim)
        nn.init.uniform_(self.out_proj.weight, -1e-3, 1e-3)
        nn.init.zeros_(self.out_proj.bias)

    @torch.no_grad()
    def set_embedding_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardisation of the image embeddings, from the training set."""
        self.emb_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.emb_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def standardise(self, emb: torch.Tensor) -> torch.Tensor:
        """(emb - mean) / std, plus N(0, embedding_noise^2) in training mode (NetworkConfig.embedding_noise)."""
        e = (emb.float() - self.emb_mean) / self.emb_std
        if self.training and self.config.embedding_noise > 0:
            e = e + self.config.embedding_noise * torch.randn_like(e)
        return e

    def condition(
        self, t: torch.Tensor, emb: torch.Tensor, drop_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """c = MLP(standardised embedding, or the null vector where drop_cond) + MLP(sinusoid(t))."""
        e = self.cond_mlp(self.standardise(emb))  # (B, c)
        if drop_cond is not None:
            e = torch.where(drop_cond[:, None], self.null_cond.to(e.dtype).expand_as(e), e)
        return self.cond_act(e + self.time_mlp(timestep_embedding(t, self.config.time_dim)))

    def forward(
        self, z: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, drop_cond: torch.Tensor | None = None,
        return_prior: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """z_0 estimate.

        Args:
            z: (B, D) noisy code z_t. t: (B,) integer timesteps. emb: (B, d) image embeddings.
            drop_cond: (B,) bool, True -> unconditional (null condition); None -> all conditional.
            return_prior: also return the prior head's mu(e) (training gives it a loss of its own).
        Returns:
            (B, D), or ((B, D), (B, D)) with return_prior.
        """
        c = self.condition(t, emb, drop_cond)
        # Precision (README "Numerics"): under bfloat16 autocast the hidden blocks' matrix products run in
        # bf16, while the noisy code z, the first sine layer (omega_0 times a bf16 product would carry a
        # phase error of ~omega_0 / 256) and the z0 combination below stay in float32.
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = torch.sin(self.omega_0 * self.in_proj(z.float()))  # (B, w0)
        skips = []
        for level in self.down:
            for block in level:
                h = block(h, c)
            skips.append(h)
        h = self.mid(h, c)
        for level, skip in zip(self.up, reversed(skips), strict=True):
            h = torch.cat([h, skip], dim=-1)
            for block in level:
                h = block(h, c)
        out = self.out_proj(self.out_norm(h)).float()
        if self.head is None:
            return (out, out.new_zeros(out.shape)) if return_prior else out
        a = self.sqrt_abar[t].float()[:, None]  # (B, 1)
        if self.head.components > 1:
            return self._mixture_x0(z, a, emb, drop_cond, out, return_prior)
        # the Gaussian-optimal z0 estimate for a unit-variance prior around mu(e), plus the U-Net's residual;
        # in float32: a bf16 z would round the noisy code the estimate is built on
        mu = self.head(self.standardise(emb)).float()  # (B, D)
        if drop_cond is not None:
            mu = torch.where(drop_cond[:, None], self.head.null.float().expand_as(mu), mu)
        x0 = a * z.float() + (1 - a * a) * mu + out
        return (x0, mu) if return_prior else x0

    def _mixture_x0(self, z: torch.Tensor, a: torch.Tensor, emb: torch.Tensor, drop_cond: torch.Tensor | None,
                    out: torch.Tensor, return_prior: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """network.head_components > 1: the posterior mean of the head's mixture plus the U-Net's residual (in
        float32, like the single Gaussian's); a dropped condition is one unit-variance component at the null code."""
        codes, logw, logvar = self.head.mixture(self.standardise(emb))
        codes, logw, logvar = codes.float(), logw.float(), logvar.float()
        if drop_cond is not None:
            keep = ~drop_cond[:, None]
            codes = torch.where(keep[..., None], codes, self.head.null.float())
            logw = torch.where(keep, logw, torch.full_like(logw, -math.log(logw.shape[1])))
            logvar = torch.where(keep, logvar, torch.zeros_like(logvar))
        x0 = mixture_posterior_mean(z.float(), a, codes, logw, logvar) + out
        if not return_prior:
            return x0
        return x0, (logw.exp()[..., None] * codes).sum(1)


def csunet_flops(model: nn.Module) -> int:
    """Forward FLOPs of one sample through the network: 2 per multiply-add of every linear layer (each is
    applied once per sample; sines, norms and activations are left out, well under 1% at these widths)."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
