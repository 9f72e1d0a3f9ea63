"""What `locdiff locate` says about a photo on stderr stays one line each and cannot be forged: a file name's
control characters are escaped, a long tag value is cut, and a library's warning (Pillow on a corrupt EXIF
block) is one log line instead of two raw stderr lines."""

from __future__ import annotations

import logging
import shutil
import struct

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


def test_a_corrupt_exif_block_is_one_log_line_not_a_raw_warning(trained, photos, tmp_path, recwarn, caplog):
    src = sorted(photos["test"].glob("*.jpg"))[0]
    ifd = b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 1) + struct.pack("<HHII", 0x8825, 4, 1, 5000) + b"\0" * 4
    path = tmp_path / "bad-exif.jpg"
    Image.open(src).save(path, exif=b"Exif\x00\x00" + ifd)
    shutil.copy(src, tmp_path / "good.jpg")
    caplog.set_level(logging.WARNING)
    assert main(["locate", "--run", str(trained["run_dir"]), str(tmp_path), "--no-progress"]) == 0
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]
    # the GPS pointer leads past the block: the photo's own line says so (Pillow only warned, unnamed, before)
    assert [m for m in caplog.messages if "Corrupt EXIF data" in m] == [
        m for m in caplog.messages if m.startswith(f"{path}: GPS tag ignored (unreadable GPS block (Corrupt EXIF data")
        and "\n" not in m], caplog.messages
    assert len([m for m in caplog.messages if "Corrupt EXIF data" in m]) == 1 and "good.jpg" not in str(caplog.messages)
