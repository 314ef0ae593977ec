"""Tests for ssd.data.shards: shard rollover, byte-identical tars, temporary names, reading back."""

from __future__ import annotations

import json
import tarfile

import pytest

from ssd.data.shards import ShardWriter, iter_samples, list_shards, read_manifest


def _samples(n: int, size: int = 100) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"img_{i:03d}", {"jpg": bytes([i % 256]) * size, "json": json.dumps({"id": i}).encode()}) for i in range(n)
    ]


def _write(directory, split, samples, **kw) -> list[str]:
    with ShardWriter(directory, split, **kw) as w:
        for key, members in samples:
            w.write(key, members)
    return w.shards


def test_round_trip_and_rollover_by_count(tmp_path):
    samples = _samples(7)
    assert _write(tmp_path, "train", samples, max_samples=3) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    back = list(iter_samples(tmp_path))
    assert [s["__key__"] for s in back] == [k for k, _ in samples]
    assert [s["__shard__"] for s in back] == ["train-000000.tar"] * 3 + ["train-000001.tar"] * 3 + ["train-000002.tar"]
    for s, (_, members) in zip(back, samples):
        assert {k: v for k, v in s.items() if not k.startswith("__")} == members


def test_rollover_by_bytes(tmp_path):
    # Each sample: 2 members of 1000 and ~10 bytes -> 512 + 1024 + 512 + 512 = 2560 bytes in the tar.
    shards = _write(tmp_path, "val", _samples(5, size=1000), max_bytes=6000)
    assert shards == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert [len(list(iter_samples(tmp_path / s))) for s in shards] == [2, 2, 1]


def test_oversized_sample_gets_its_own_shard(tmp_path):
    shards = _write(tmp_path, "train", _samples(3, size=5000), max_bytes=1000)
    assert len(shards) == 3


def test_byte_identical_and_fixed_mtime(tmp_path):
    a = _write(tmp_path / "a", "train", _samples(5), max_samples=2)
    b = _write(tmp_path / "b", "train", _samples(5), max_samples=2)
    assert a == b
    for name in a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / a[0]) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
        assert [m.name for m in tar.getmembers()] == ["img_000.jpg", "img_000.json", "img_001.jpg", "img_001.json"]


def test_clip_members_keep_their_numbers(tmp_path):
    members = {"000.jpg": b"a", "001.jpg": b"b", "002.jpg": b"c", "json": b"{}"}
    _write(tmp_path, "train", [("vid_000001", members)])
    (sample,) = iter_samples(tmp_path)
    assert sample["__key__"] == "vid_000001"
    assert {k: v for k, v in sample.items() if not k.startswith("__")} == members


def test_webdataset_reads_what_we_write(tmp_path):
    wds = pytest.importorskip("webdataset")
    _write(tmp_path, "train", _samples(4), max_samples=3)
    urls = [str(p) for p in list_shards(tmp_path)]
    got = [(s["__key__"], s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert got == [(k, m["jpg"]) for k, m in _samples(4)]


def test_exception_leaves_no_shard_and_no_temp_file(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", max_samples=2) as w:
            for key, members in _samples(3):
                w.write(key, members)
            raise RuntimeError("killed")
    # The first shard was complete and stays; the unfinished second one leaves nothing.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def test_unfinished_shard_has_a_temporary_name(tmp_path):
    w = ShardWriter(tmp_path, "train")
    w.write("a", {"jpg": b"x"})
    names = [p.name for p in tmp_path.iterdir()]
    assert len(names) == 1 and names[0].startswith(".tmp-train-000000.tar.")
    assert list_shards(tmp_path) == []
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["train-000000.tar"]


@pytest.mark.parametrize("key", ["a.b", "a/b", "", ".hidden"])
def test_bad_keys_rejected(tmp_path, key):
    with ShardWriter(tmp_path, "train") as w:
        with pytest.raises(ValueError, match="key"):
            w.write(key, {"jpg": b"x"})


def test_duplicate_key_and_bad_members_rejected(tmp_path):
    with ShardWriter(tmp_path, "train") as w:
        w.write("a", {"jpg": b"x"})
        with pytest.raises(ValueError, match="twice"):
            w.write("a", {"jpg": b"y"})
        with pytest.raises(ValueError, match="member"):
            w.write("b", {"../jpg": b"y"})
        with pytest.raises(ValueError, match="bytes"):
            w.write("c", {"json": "not bytes"})
        with pytest.raises(ValueError, match="no members"):
            w.write("d", {})


def test_list_shards_sorting_and_filter(tmp_path):
    _write(tmp_path, "val", _samples(2), max_samples=1)
    _write(tmp_path, "train", _samples(3), max_samples=1)
    (tmp_path / ".tmp-train-000009.tar.abc").write_bytes(b"partial")
    (tmp_path / "manifest.json").write_text('{"kind": "frames"}')
    assert [p.name for p in list_shards(tmp_path)] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["val-000000.tar", "val-000001.tar"]
    assert read_manifest(tmp_path) == {"kind": "frames"}


def test_empty_writer_writes_nothing(tmp_path):
    assert _write(tmp_path, "train", []) == []
    assert list(tmp_path.iterdir()) == []
