"""What `locdiff locate` says about a photo on stderr stays one line each and cannot be forged: a file name's
control characters are escaped and a long tag value is cut."""

from __future__ import annotations

import logging

from PIL import Image

from locdiff.cli import main
from locdiff.data.exif import GPS_IFD


def test_a_file_name_with_a_newline_cannot_forge_a_line(trained, tmp_path, capsys, caplog):
    folder = tmp_path / "nl"
    folder.mkdir()
    (folder / "a\nlocdiff locate: error: forged.jpg").write_bytes(b"x")
    caplog.set_level(logging.WARNING)
    assert main(["locate", "--run", str(trained["run_dir"]), str(folder), "--no-progress"]) == 2  # none readable
    err = capsys.readouterr().err
    assert not any(ln.startswith("locdiff locate: error: forged") for ln in err.splitlines()), err
    assert "a\\nlocdiff locate: error: forged.jpg" in err
    assert all("\n" not in m for m in caplog.messages) and any("a\\nlocdiff" in m for m in caplog.messages)


def test_a_long_malformed_gps_tag_is_cut_in_its_warning(trained, photos, tmp_path, caplog):
    bad = Image.Exif()
    bad[GPS_IFD] = {1: "X" * 3000, 2: (1.0, 2.0, 3.0), 3: "E", 4: (4.0, 5.0, 6.0)}
    path = tmp_path / "long-tag.jpg"
    Image.open(sorted(photos["test"].glob("*.jpg"))[0]).save(path, exif=bad)
    caplog.set_level(logging.WARNING)
    assert main(["locate", "--run", str(trained["run_dir"]), str(path), "--no-progress"]) == 0
    said = [m for m in caplog.messages if "GPS tag ignored" in m]
    assert len(said) == 1 and "XXXX" in said[0] and len(said[0]) < len(str(path)) + 400, said

