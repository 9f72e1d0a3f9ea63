"""A plan's records on disk (`RecordSpill`, `StringTable`): the round trip is exact, ranges and filters keep
the order, scratch files go when closed and when a killed run left them; and MP-16's img2dataset path builds
its URL list and its index on disk."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import types
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from locdiff.data.config import load_dataset_config
from locdiff.data.ingest import ingest
from locdiff.data.shards import stage_dir
from locdiff.data.sources.records import Record, SortedStrings, StringTable, scratch_path, spill_of

from .fixtures import child_peak_bytes, read_samples, sha


def records(n: int) -> list[Record]:
    out = []
    for i in range(n):
        lat, lon = (None, None) if i % 5 == 0 else (i * 0.123456789012345 - 40, -179.99999999999997 + i)
        meta = {} if i % 3 else {"author": f"a{i}", "note": "ünïcode, \"quoted\"\nline"}
        out.append(Record(i, f"id-{i:05d}", lat, lon, f"imgs/{i}.jpg", meta, None if i % 2 else f"{i:064x}"))
    return out


def test_a_spill_gives_back_exactly_what_was_written(tmp_path):
    want = records(10_000)
    with spill_of(iter(want), str(tmp_path)) as spill:
        assert len(spill) == len(want)
        assert list(spill) == want  # floats bit for bit, None, meta, checksums
        assert spill[0:0] == [] and spill[9_990:20_000] == want[9_990:]
        assert spill[4097:4100] == want[4097:4100] and spill[-1] == want[-1] and spill[123] == want[123]
        assert [len(c) for c in spill.chunks(4_000)] == [4_000, 4_000, 2_000]
        assert [r for c in spill.chunks(333) for r in c] == want
        with pytest.raises(IndexError):
            spill[10_000]
        with pytest.raises(ValueError, match="index 5, expected 10000"):
            spill.extend([want[5]])
        odd = spill.filtered(lambda r: r.index % 2 == 1)
        assert [r.id for r in odd] == [r.id for r in want[1::2]]
        assert [r.index for r in odd] == list(range(5_000))  # numbered again
        path, odd_path = spill.path, odd.path
        assert os.path.exists(path) and os.path.exists(odd_path)
        odd.close()
        assert not os.path.exists(odd_path)
    assert not os.path.exists(path)


def test_a_spill_nobody_closed_is_removed_when_collected(tmp_path):
    spill = spill_of(iter(records(3)), str(tmp_path))
    path = spill.path
    del spill
    assert not os.path.exists(path)


def test_scratch_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"plan.sqlite.tmp-{dead}-abcdef12"
    alive = tmp_path / f"plan.sqlite.tmp-{os.getpid()}-abcdef12"  # a run still going: kept
    other = tmp_path / f"urls.sqlite.tmp-{dead}-abcdef12"  # another stem: left to its own kind
    for p in (stale, alive, other):
        p.write_bytes(b"x")
    path = scratch_path("plan.sqlite", str(tmp_path))
    assert not stale.exists() and alive.exists() and other.exists()
    assert os.path.basename(path).startswith(f"plan.sqlite.tmp-{os.getpid()}-")


def test_a_string_table_keeps_the_last_value_of_a_key(tmp_path):
    table = StringTable("urls.sqlite", str(tmp_path))
    table.put_many([("a", "1"), ("b", "2")])
    table.put_many([("a", "3")])
    assert (table.get("a"), table.get("b"), table.get("c"), table.get("c", "")) == ("3", "2", None, "")
    path = table.path
    table.close()
    assert not os.path.exists(path)


# -- MP-16 through img2dataset -----------------------------------------------------------------------------
def fake_img2dataset(calls: list[dict]) -> types.ModuleType:
    """A stand-in for the optional `img2dataset` package (not installed in the test environment): `download`
    fetches every URL of the parquet list over HTTP and writes what img2dataset's webdataset writer writes
    (NNNNN.tar of KEY.jpg, NNNNN.parquet with key/status/error_message and the saved columns,
    NNNNN_stats.json)."""

    def download(*, url_list, url_col, save_additional_columns, output_folder, number_sample_per_shard,
                 **kw):
        calls.append({"url_list": url_list, **kw})
        table = pq.read_table(url_list)
        urls, extra = table.column(url_col).to_pylist(), {c: table.column(c).to_pylist()
                                                          for c in save_additional_columns}
        os.makedirs(output_folder, exist_ok=True)
        for s, start in enumerate(range(0, len(urls), number_sample_per_shard)):
            rows, failed = [], 0
            with tarfile.open(os.path.join(output_folder, f"{s:05d}.tar"), "w") as tar:
                for i in range(start, min(len(urls), start + number_sample_per_shard)):
                    key, status, error = f"{s:05d}{i - start:04d}", "success", None
                    try:
                        data = urllib.request.urlopen(urls[i], timeout=2).read()
                        info = tarfile.TarInfo(f"{key}.jpg")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    except (urllib.error.URLError, OSError) as err:
                        status, error, failed = "failed_to_download", str(err), failed + 1
                    rows.append({"key": key, "url": urls[i], "status": status, "error_message": error,
                                 **{c: v[i] for c, v in extra.items()}})
            pq.write_table(pa.Table.from_pylist(rows), os.path.join(output_folder, f"{s:05d}.parquet"))
            with open(os.path.join(output_folder, f"{s:05d}_stats.json"), "w") as f:
                json.dump({"failed_to_download": failed}, f)

    module = types.ModuleType("img2dataset")
    module.download = download
    return module


def mp16_config(**kw):
    return load_dataset_config("mp16", shard_size=4, max_side=128, retries=0, backoff=0.01, timeout=2,
                               downloader="img2dataset", **kw)


def test_mp16_through_img2dataset_indexes_its_output_on_disk(sources, tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "img2dataset", fake_img2dataset(calls))
    url, exp = sources["mp16"]["http"]
    root = tmp_path / "root"
    m = ingest("mp16", str(root), source=url, config=mp16_config(allow_private_addresses=True), progress=False)
    assert m["count"] == len(exp.good) == 8
    assert m["skipped"] == exp.skipped == {"missing_file": 1, "unreachable": 1}, m["skipped"]
    listed = pq.read_table(calls[0]["url_list"]).to_pylist()
    assert len(listed) == 10 and all(r["url"].startswith("http://127.0.0.1") for r in listed)
    assert not [n for n in os.listdir(root / "mp16" / "_img2dataset") if ".tmp-" in n]
    d = stage_dir(str(root), "mp16", "images")
    got = {s["json"]["id"]: s for s in read_samples([f"{d}/{s['shard']}" for s in m["shards"]])}
    assert set(got) == set(exp.good)
    for rid, (lat, lon, digest) in exp.good.items():  # each record got its own photo from the index
        assert (got[rid]["json"]["lat"], got[rid]["json"]["lon"]) == (lat, lon)
        assert digest is None or sha(got[rid]["jpg"]) == digest


def test_mp16_through_img2dataset_refuses_private_hosts_before_the_download(sources, tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "img2dataset", fake_img2dataset(calls))
    folder = sources["mp16"]["http_dir"]  # the CSVs read from disk; their image URLs name 127.0.0.1
    m = ingest("mp16", str(tmp_path), source=str(folder), config=mp16_config(allow_private_addresses=False),
               progress=False)
    # every URL names 127.0.0.1: none reaches the downloader, each is counted as refused
    assert m["count"] == 0 and m["skipped"] == {"refused_address": 10}, m["skipped"]
    assert pq.read_table(calls[0]["url_list"]).num_rows == 0


def test_sorted_strings_sort_as_sorted_does_and_can_be_read_twice(tmp_path):
    import random  # noqa: PLC0415

    rng = random.Random(0)
    names = [f"{rng.choice(['a', 'B', 'é', '日本', 'z', '_'])}/{rng.randrange(10**6)}.jpg" for _ in range(9_000)]
    names += ["\udcff-not-utf8.jpg", "ab.jpg", "a.jpg", "a/b.jpg"]  # a name the OS could not decode
    table = SortedStrings(iter(names), str(tmp_path))
    want = sorted(n for n in names if "\udcff" not in n)
    got = list(table)
    assert len(table) == len(names) and [n for n in got if "\udcff" not in n] == want
    assert "\udcff-not-utf8.jpg" in got and list(table) == got
    table.close()
    assert not os.path.exists(table.path)


LISTING_CHILD = r"""
import sys
from locdiff.data.config import load_dataset_config
from locdiff.data.sources import make_source
plan = make_source(load_dataset_config("folder", coordinates="optional"), sys.argv[1]).plan()
assert len(plan.records) == int(sys.argv[2]), len(plan.records)
print([ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1])
"""


@pytest.mark.slow
def test_listing_a_large_folder_holds_nothing_that_grows_with_its_photos(tmp_path):
    """A folder without a CSV four times as large must not raise the planning peak by more than 100 bytes a
    photo (its sorted listing, joined for its checksum, and the records were held: about 370 bytes a photo
    measured; now the listing is sorted in an SQLite scratch file)."""
    n, peaks = 30_000, []
    for count in (n, 4 * n):
        folder = tmp_path / str(count)
        for i in range(count):
            sub = folder / f"{i % 100:02d}" / f"{(i // 100) % 50:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"photo_{i:08d}_some_longer_camera_name.jpg").touch()
        peaks.append(child_peak_bytes(LISTING_CHILD, str(folder), str(count)))
    per_photo = (peaks[1] - peaks[0]) / (3 * n)
    print(f"peaks {peaks[0] / 2**20:.0f} MB, {peaks[1] / 2**20:.0f} MB; {per_photo:.0f} bytes a photo")
    assert per_photo < 100, (peaks, per_photo)
