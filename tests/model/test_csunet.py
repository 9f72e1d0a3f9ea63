import torch

from locdiff.engine import unwrap
from locdiff.model.config import NetworkConfig
from locdiff.model.csunet import CSUNet, timestep_embedding
from locdiff.model.schedule import NoiseSchedule

ABAR = NoiseSchedule(1000).alphas_cumprod


def _net(seed=0, dropout=0.0, blocks=2, head=16):
    torch.manual_seed(seed)
    cfg = NetworkConfig(widths=[32, 16, 8], blocks_per_level=blocks, dropout=dropout, cond_dim=16, time_dim=8,
                        head_width=head, head_depth=1, head_dropout=dropout)
    return CSUNet(dim=25, embed_dim=6, config=cfg, alphas_cumprod=ABAR)


def test_shapes_and_levels():
    net = _net()
    z, t, e = torch.randn(5, 25), torch.randint(0, 1000, (5,)), torch.randn(5, 6)
    out = net(z, t, e)
    assert out.shape == (5, 25) and out.dtype == torch.float32
    assert len(net.down) == 3 and all(len(level) == 2 for level in net.down)
    assert timestep_embedding(t, 7).shape == (5, 7)


def test_seeded_determinism():
    z, t, e = torch.randn(4, 25), torch.randint(0, 1000, (4,)), torch.randn(4, 6)
    a, b, c = _net(0), _net(0), _net(1)
    assert torch.equal(a(z, t, e), b(z, t, e))
    # film layers start at zero; perturb so that conditioning and weights matter
    assert not torch.equal(a.in_proj.weight, c.in_proj.weight)


def test_conditioning_timestep_and_null_condition_matter():
    net = _net()
    for p in net.parameters():  # move off the zero FiLM init
        p.data.add_(0.05 * torch.randn_like(p))
    z, e = torch.randn(3, 25), torch.randn(3, 6)
    t = torch.full((3,), 10)
    base = net(z, t, e)
    assert not torch.allclose(base, net(z, t, e + 1.0))
    assert not torch.allclose(base, net(z, torch.full((3,), 900), e))
    dropped = net(z, t, e, torch.tensor([True, False, True]))
    assert torch.allclose(dropped[1], base[1])
    assert not torch.allclose(dropped[0], base[0])
    # the null condition ignores the embedding
    d2 = net(z, t, e + 5.0, torch.ones(3, dtype=torch.bool))
    assert torch.allclose(net(z, t, e, torch.ones(3, dtype=torch.bool)), d2)


def test_dropout_only_in_training_mode():
    net = _net(dropout=0.5)
    z, t, e = torch.randn(4, 25), torch.randint(0, 1000, (4,)), torch.randn(4, 6)
    net.eval()
    assert torch.equal(net(z, t, e), net(z, t, e))
    net.train()
    torch.manual_seed(0)
    x = net(z, t, e)
    assert not torch.equal(x, net(z, t, e))


def test_embedding_noise_is_gaussian_in_standard_deviations_and_only_in_training():
    torch.manual_seed(0)
    cfg = NetworkConfig(widths=[8], cond_dim=8, time_dim=4, head_width=8, head_depth=1, embedding_noise=0.5)
    net = CSUNet(dim=4, embed_dim=6, config=cfg, alphas_cumprod=ABAR)
    net.set_embedding_stats(torch.full((6,), 2.0), torch.full((6,), 4.0))
    e = torch.full((20_000, 6), 6.0)  # standardised: (6 - 2) / 4 = 1 in every feature
    net.eval()
    assert torch.equal(net.standardise(e), torch.ones(20_000, 6))
    net.train()
    noise = net.standardise(e) - 1.0
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01  # 120,000 draws
    assert not torch.equal(net.standardise(e), net.standardise(e))  # drawn afresh per call


def test_unwrap():
    net = _net()
    assert unwrap(torch.nn.DataParallel(net)) is net
    assert unwrap(net) is net


def test_prior_head_is_the_gaussian_posterior_mean_at_init():
    """With the U-Net's output near zero, z0_hat = a_t z_t + (1 - a_t^2) mu(e): at t = 0 the input itself
    (scaled), at t = T - 1 the head's mu(e) alone."""
    net = _net(head=16)
    with torch.no_grad():
        net.out_proj.weight.zero_()
        net.head.out.bias.copy_(torch.arange(25.0))
    z, e = torch.randn(2, 25), torch.randn(2, 6)
    a0 = float(ABAR[0].sqrt())
    torch.testing.assert_close(net(z, torch.zeros(2, dtype=torch.long), e), a0 * z + (1 - a0 ** 2) * torch.arange(25.0))
    last = net(z, torch.full((2,), 999), e)
    torch.testing.assert_close(last, torch.arange(25.0).expand(2, 25), atol=1e-3, rtol=0)
    plain = _net(head=0)
    assert plain.head is None and plain(z, torch.zeros(2, dtype=torch.long), e).shape == (2, 25)


def test_mixture_skeleton_is_the_posterior_mean_of_its_mixture():
    """mixture_posterior_mean against Bayes' rule written out with torch.distributions (float64), and with one
    unit-variance component it is the single-Gaussian skeleton a z + (1 - a^2) c."""
    from locdiff.model.csunet import mixture_posterior_mean

    g = torch.Generator().manual_seed(0)
    b, m, d = 5, 3, 7
    z, codes = torch.randn(b, d, generator=g), 2 * torch.randn(b, m, d, generator=g)
    a = torch.rand(b, 1, generator=g) * 0.9 + 0.05
    logw = torch.log_softmax(torch.randn(b, m, generator=g), -1)
    logvar = torch.randn(b, m, generator=g) - 1
    z64, c64, a64, s2 = z.double(), codes.double(), a.double(), logvar.double().exp()
    ref = torch.zeros(b, d, dtype=torch.float64)
    for i in range(b):
        logp = []
        for j in range(m):
            var = a64[i, 0] ** 2 * s2[i, j] + 1 - a64[i, 0] ** 2
            dist = torch.distributions.Normal(a64[i, 0] * c64[i, j], var.sqrt())
            logp.append(logw[i, j].double() + dist.log_prob(z64[i]).sum())
        r = torch.softmax(torch.stack(logp), 0)
        for j in range(m):  # E[z0 | z_t, component j]: the Gaussian conditional of z0 ~ N(c, s2)
            var = a64[i, 0] ** 2 * s2[i, j] + 1 - a64[i, 0] ** 2
            ref[i] += r[j] * (c64[i, j] + a64[i, 0] * s2[i, j] / var * (z64[i] - a64[i, 0] * c64[i, j]))
    torch.testing.assert_close(mixture_posterior_mean(z, a, codes, logw, logvar).double(), ref, rtol=1e-4, atol=1e-4)
    one = mixture_posterior_mean(z, a, codes[:, :1], torch.zeros(b, 1), torch.zeros(b, 1))
    torch.testing.assert_close(one, a * z + (1 - a * a) * codes[:, 0])


def test_noisy_code_and_z0_sum_stay_float32_under_bf16_autocast():
    """Under bfloat16 autocast (README "Numerics") the hidden blocks run in bf16, but the noisy code, the first
    sine layer and z0 = a_t z_t + (1 - a_t^2) mu + U-Net stay float32: with the U-Net's and the head's outputs
    zeroed, z0 is exactly a_t z_t computed in float32."""
    net = _net().eval()
    torch.nn.init.zeros_(net.out_proj.weight)
    abar = NoiseSchedule(1000).alphas_cumprod.sqrt().float()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, net.dim, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    emb = torch.randn(16, net.embed_dim, generator=g)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        x0 = net(z, t, emb)
        first = torch.sin(net.omega_0 * net.in_proj(z))  # what the network would compute without the guard
    assert x0.dtype == torch.float32 and first.dtype == torch.bfloat16
    assert torch.equal(x0, abar[t][:, None] * z)
