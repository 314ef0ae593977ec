import json
import os

import pytest

from ssd import atomic


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "m.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["m.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(path) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_dir(tmp_path):
    target = tmp_path / "shards"
    with atomic.atomic_dir(target) as d:
        (d / "a").write_text("1")
        assert not target.exists()
    assert (target / "a").read_text() == "1"
    with pytest.raises(ValueError):
        with atomic.atomic_dir(target) as d:
            (d / "b").write_text("2")
            raise ValueError
    assert sorted(os.listdir(tmp_path)) == ["shards"]
    assert os.listdir(target) == ["a"]
    with atomic.atomic_dir(target) as d:
        (d / "c").write_text("3")
    assert os.listdir(target) == ["c"]


def test_a_folder_in_the_output_s_place_is_named_before_anything_is_written(tmp_path):
    """The error named the temporary file (.tmp-out.json.xyz: Is a directory), after the writing."""
    (tmp_path / "out.json").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        with atomic.atomic_open(tmp_path / "out.json"):
            raise AssertionError("the block ran")
    assert e.value.filename == str(tmp_path / "out.json")
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_a_full_disk_names_the_output(tmp_path):
    """ENOSPC carries no file name, so a stage could not say which output failed (a traceback)."""
    import errno

    with pytest.raises(OSError) as e:
        with atomic.atomic_open(tmp_path / "m.onnx") as f:
            f.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
