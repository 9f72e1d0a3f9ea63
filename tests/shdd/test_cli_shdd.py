import json

from locdiff.cli import main


def test_encode(capsys):
    assert main(["shdd", "encode", "--lat", "48.85", "--lon", "2.35", "--degree", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dim"] == 289 and len(out["code"]) == 289


def test_roundtrip(capsys):
    assert main(["shdd", "roundtrip", "--degree", "8", "--n", "500"]) == 0
    out = capsys.readouterr().out
    assert "max" in out and "points/s" in out


def test_plot(tmp_path):
    out = tmp_path / "kernel.png"
    assert main(["shdd", "plot", "--lat", "48.85", "--lon", "2.35", "--degree", "8", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_exit_code(capsys):
    assert main(["shdd", "encode", "--lat", "123", "--lon", "0", "--degree", "4"]) == 2
    assert "lat" in capsys.readouterr().err


def test_roundtrip_too_large_to_hold_is_refused_before_any_work(capsys):
    """300 points at degree 512 are 79 M coefficients held at once: one line naming --n, nothing allocated."""
    assert main(["shdd", "roundtrip", "--degree", "512", "--n", "300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["locdiff shdd roundtrip: error: --n 300 points x 263,169 coefficients (--degree 512) is above the "
                   "67,108,864 numbers a round trip holds at once; give a smaller --n"]


def test_a_map_of_one_code_is_built_a_block_of_points_at_a_time(monkeypatch):
    """`density` of one code at many points (what `shdd plot` draws) equals the whole basis times the code
    (float64), with blocks of 7 points; the blocks bound its memory (degree 64 on the plot's grid needed about
    18 GB)."""
    import torch

    from locdiff.shdd import codec
    from locdiff.shdd.basis import spherical_harmonics

    c = codec.SHDD(12).encode(torch.tensor(48.85, dtype=torch.float64), torch.tensor(2.35, dtype=torch.float64))
    la, lo = torch.meshgrid(torch.linspace(-90, 90, 19, dtype=torch.float64),
                            torch.linspace(-180, 180, 37, dtype=torch.float64), indexing="ij")
    reference = (spherical_harmonics(la, lo, 12) * c).sum(-1)
    monkeypatch.setattr(codec, "DENSITY_BLOCK_BYTES", 7 * c.numel() * 8)
    got = codec.density(c, la, lo)
    assert got.shape == (19, 37)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-12)
    one = codec.density(c, torch.tensor(48.85, dtype=torch.float64), torch.tensor(2.35, dtype=torch.float64))
    assert one.shape == ()
