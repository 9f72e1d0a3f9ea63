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
