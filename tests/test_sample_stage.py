"""The ``sample`` stage end to end, on tiny configurations in a temporary directory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import pytest
import yaml

import pipeline.sample as sample_stage
import pipeline.sample_files as sample_files
from procs import RUN_OPENCV_POOL
from ssd.data.synthetic import IR_CLASSES, VOC_CLASSES

REPO = Path(__file__).resolve().parents[1]
FRAMES = 12  # more than 9, so that string order and frame order differ


def _write_params(tmp_path: Path, name: str = "params.yaml", **section) -> Path:
    cfg = {
        "seed": 5,
        "workers": 2,
        "voc": {"out_dir": str(tmp_path / "out" / "voc"), "train_images": 16, "val_images": 4},
        "ir": {
            "out_dir": str(tmp_path / "out" / "ir"),
            "videos": 3,
            "frames": FRAMES,
            "width": 96,
            "height": 72,
        },
    }
    for key, value in section.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"sample": cfg, "other_stage": {"anything": 1}}))
    return path


def _run_stage(params: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "pipeline.sample", "--params", str(params), *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _voc_boxes(xml_path: Path) -> tuple[tuple[int, int], list[tuple]]:
    root = ET.parse(xml_path).getroot()
    size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
    objects = []
    for o in root.iter("object"):
        b = o.find("bndbox")
        corners = tuple(int(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        track = o.findtext("track_id")
        objects.append((o.findtext("name"), corners, int(o.findtext("difficult")), track and int(track)))
    return size, objects


def _frame_number(frame_id: str) -> int:
    return int(frame_id.rsplit("_", 1)[1])


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """The stage run once as a subprocess with two workers; returns the output root."""
    tmp = tmp_path_factory.mktemp("sample")
    result = _run_stage(_write_params(tmp), tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "out"


def test_voc_layout(generated: Path):
    voc = generated / "voc"
    train = (voc / "ImageSets/Main/train.txt").read_text().split()
    val = (voc / "ImageSets/Main/val.txt").read_text().split()
    assert len(train) == 16 and len(val) == 4 and not set(train) & set(val)
    assert (voc / "classes.txt").read_text().split() == list(VOC_CLASSES)
    assert sorted(p.stem for p in (voc / "JPEGImages").iterdir()) == sorted(train + val)
    n_objects = 0
    for image_id in train + val:
        image = cv2.imread(str(voc / "JPEGImages" / f"{image_id}.jpg"), cv2.IMREAD_UNCHANGED)
        (w, h), objects = _voc_boxes(voc / "Annotations" / f"{image_id}.xml")
        assert image.shape == (h, w, 3)
        for name, (x1, y1, x2, y2), difficult, _ in objects:
            assert name in VOC_CLASSES and difficult in (0, 1)
            assert 1 <= x1 <= x2 <= w and 1 <= y1 <= y2 <= h
        n_objects += len(objects)
    assert n_objects > 20


def test_ir_frames_layout(generated: Path):
    frames = generated / "ir/frames"
    train = (frames / "ImageSets/Main/train.txt").read_text().split()
    val = (frames / "ImageSets/Main/val.txt").read_text().split()
    videos = {split: {i.rsplit("_", 1)[0] for i in ids} for split, ids in (("train", train), ("val", val))}
    assert videos["train"] and videos["val"] and not videos["train"] & videos["val"]
    assert len(videos["train"] | videos["val"]) == 3
    for name in videos["train"] | videos["val"]:
        ids = [i for i in train + val if i.rsplit("_", 1)[0] == name]
        # Listed in frame order, numbered from 1, not zero-padded: string order differs.
        assert [_frame_number(i) for i in ids] == list(range(1, FRAMES + 1))
        assert sorted(ids) != ids and sorted(ids, key=_frame_number) == ids
    for frame_id in train[:FRAMES]:
        image = cv2.imread(str(frames / "JPEGImages" / f"{frame_id}.jpg"), cv2.IMREAD_UNCHANGED)
        assert image.shape == (72, 96), "grey JPEG"
        (w, h), objects = _voc_boxes(frames / "Annotations" / f"{frame_id}.xml")
        assert (w, h) == (96, 72)
        assert all(name in IR_CLASSES and track is not None for name, _, _, track in objects)
    degraded = (frames / "degraded.txt").read_text().splitlines()
    assert len(degraded) == 3 * round(0.33 * FRAMES)
    assert all(line.split()[0] in set(train + val) for line in degraded)


def test_ir_video_layout_matches_the_frames(generated: Path):
    video = generated / "ir/video"
    frames = generated / "ir/frames"
    splits = json.loads((video / "splits.json").read_text())
    meta = json.loads((video / "meta.json").read_text())
    assert meta["classes"] == list(IR_CLASSES)
    assert sorted(splits["train"] + splits["val"]) == sorted(meta["videos"])
    assert (generated / "ir/README.txt").read_text().strip()
    formats = set()
    for name, info in meta["videos"].items():
        frame_ids = (frames / "ImageSets/Main" / f"{info['split']}.txt").read_text().split()
        assert f"{name}_1" in frame_ids and name in splits[info["split"]]

        cap = cv2.VideoCapture(str(video / info["file"]))
        decoded = 0
        while True:
            ok, image = cap.read()
            if not ok:
                break
            assert image.shape[:2] == (72, 96)
            decoded += 1
        cap.release()
        assert decoded == info["frames"] == FRAMES

        # The boxes of the frames layout, per frame: {track: (x, y, w, h)} with VOC corners converted.
        expected = []
        for t in range(1, FRAMES + 1):
            _, objects = _voc_boxes(frames / "Annotations" / f"{name}_{t}.xml")
            expected.append(
                {tr: (x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1) for _, (x1, y1, x2, y2), _, tr in objects}
            )

        lines = (video / info["annotations"]).read_text().splitlines()
        formats.add(info["format"])
        if info["format"] == "xywh":
            assert len(info["tracks"]) == 1 and len(lines) == FRAMES
            for t, line in enumerate(lines):
                box = tuple(float(v) for v in line.split())
                assert box == expected[t].get(1, (0, 0, 0, 0))
        else:
            assert info["annotations"].endswith(f"{name}/gt.txt") and len(info["tracks"]) > 1
            got = [{} for _ in range(FRAMES)]
            for line in lines:
                frame, track, x, y, w, h, conf, cls, vis = line.split(",")
                assert conf == "1" and 0.0 <= float(vis) <= 1.0
                assert IR_CLASSES[int(cls) - 1] == info["tracks"][track]
                got[int(frame) - 1][int(track)] = (float(x), float(y), float(w), float(h))
            assert got == expected
    assert formats == {"xywh", "mot"}


def test_no_temporary_directories_are_left(generated: Path):
    assert sorted(p.name for p in generated.iterdir()) == ["ir", "voc"]


def test_output_is_byte_identical_for_any_worker_count(generated: Path, tmp_path: Path):
    params = _write_params(tmp_path, workers=1)
    assert sample_stage.main(["--params", str(params)]) == 0
    assert _tree(tmp_path / "out/voc") == _tree(generated / "voc")
    assert _tree(tmp_path / "out/ir") == _tree(generated / "ir")


def test_another_seed_gives_other_data(generated: Path, tmp_path: Path):
    params = _write_params(tmp_path, seed=6, workers=1)
    assert sample_stage.main(["--params", str(params)]) == 0
    a, b = _tree(tmp_path / "out/voc"), _tree(generated / "voc")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.startswith("Annotations/"))


def test_a_failed_run_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch):
    real = sample_files.write_voc_image

    def failing(job, index, split):
        if index == 10:
            raise RuntimeError("killed midway")
        return real(job, index, split)

    monkeypatch.setattr(sample_files, "write_voc_image", failing)
    with pytest.raises(RuntimeError, match="killed midway"):
        sample_stage.main(["--params", str(_write_params(tmp_path, workers=1))])
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_rerun_keeps_the_previous_output(tmp_path: Path, monkeypatch):
    params = _write_params(tmp_path, workers=1, ir={"videos": 2})
    assert sample_stage.main(["--params", str(params)]) == 0
    before = {d: _tree(tmp_path / "out" / d) for d in ("voc", "ir")}

    def failing(job, index, split):
        raise RuntimeError("killed midway")

    monkeypatch.setattr(sample_files, "write_ir_video", failing)
    with pytest.raises(RuntimeError):
        sample_stage.main(["--params", str(params), "--set", "seed=9"])
    assert {d: _tree(tmp_path / "out" / d) for d in ("voc", "ir")} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ir", "voc"]


def test_unknown_key_is_a_one_line_error(tmp_path: Path):
    params = _write_params(tmp_path, voc={"train_imgs": 3})
    result = _run_stage(params, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sample.voc.train_imgs" in lines[0] and "train_images" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("ir.degraded_fraction=1.5", "sample.ir.degraded_fraction"),
        ("voc.min_side=300", "min_side"),
        ("workers=two", "sample.workers"),
        ("ir.out_dir=" + "{voc}", "separate"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, capsys, override: str, message: str):
    params = _write_params(tmp_path)
    override = override.replace("{voc}", str(tmp_path / "out" / "voc" / "ir"))
    assert sample_stage.main(["--params", str(params), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


AFTER_OPENCV_THREADS = RUN_OPENCV_POOL + """
import sys
import pipeline.sample as stage
print(stage.main(["--params", sys.argv[1]]), cv2.getNumThreads())
"""


def test_the_worker_pool_starts_after_opencv_threads_ran_in_the_parent(tmp_path: Path):
    """The stage run in a process whose OpenCV pool had run (a notebook, a test, a caller's own
    pipeline): its forked workers set OpenCV's threads and waited for ever, unless the pool is
    stopped for the fork (ssd.data.workers). OpenCV's setting is the caller's again after."""
    params = _write_params(tmp_path, workers=2)
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", AFTER_OPENCV_THREADS, str(params)], cwd=tests.parent,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{tests.parent}:{tests}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "2"]
    assert len(list((tmp_path / "out" / "voc" / "JPEGImages").iterdir())) == 20
