"""The predict command: photos of any names and sizes, one image, a video; bad files skipped and counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.detect import preprocess
from ssd.model_file import load_model_file, save_model_file
from ssd.models import ssdlite_mobilenet_v2
from ssd.postprocess import PostprocessConfig, PostProcessor
from test_weights import unmatched

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red", "blue"]
THRESHOLD = 0.3  # a random 3-way softmax scores about 1/3: plenty of detections to compare


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    image[h // 4: h // 2, w // 3: w // 2] = (30, 30, 220)
    return image


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64)
    model.head.init_background_prior(1 / 3)  # uniform: the random model's scores near 1/3, not at the prior
    save_model_file(root / "model.pt", model, CLASSES)
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    for name, (h, w) in {"cat.jpg": (171, 214), "IMG 0001.png": (189, 210), "holiday.JPEG": (90, 300),
                         "z.bmp": (64, 64)}.items():
        cv2.imwrite(str(photos / name), photo(rng, h, w))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not an image, not taken")
    return root


def expected(model_file: Path, image: Path) -> dict:
    """Detections of the model on one image, computed here as the evaluation would."""
    model, _ = load_model_file(model_file)
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    post = PostProcessor(model.priors, PostprocessConfig(score_threshold=THRESHOLD))
    with torch.no_grad():
        det = post(*model(preprocess(rgb, model.image_size, torch.device("cpu"))))[0]
    h, w = rgb.shape[:2]
    return {"boxes": det["boxes"] * torch.tensor([w, h, w, h]), "scores": det["scores"], "labels": det["labels"]}


def records_of(records: list[dict], file_name: str) -> dict:
    mine = [r for r in records if r["file_name"] == file_name]
    xywh = torch.tensor([r["bbox"] for r in mine]).reshape(-1, 4)
    return {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "scores": torch.tensor([r["score"] for r in mine]), "labels": torch.tensor([r["category_id"] for r in mine])}


def test_a_folder_of_photos_of_any_names_and_sizes(project):
    result = run("model.pt", "photos", "--out", "annotated", "--score-threshold", str(THRESHOLD),
                 "--batch-size", "3", "--device", "cpu", cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped photos/broken.jpg: not a readable image" in result.stderr
    assert "skipped 1 unreadable files" in result.stderr
    written = sorted(p.name for p in (project / "annotated").iterdir())
    assert written == sorted(["cat.jpg", "IMG 0001.png", "holiday.JPEG", "z.bmp", "detections.json"])
    for name in ("cat.jpg", "IMG 0001.png", "holiday.JPEG", "z.bmp"):
        source = cv2.imread(str(project / "photos" / name))
        assert cv2.imread(str(project / "annotated" / name)).shape == source.shape
    records = json.loads((project / "annotated" / "detections.json").read_text())
    # Ids follow the input order (the folder's, by name), the unreadable file's included.
    ids = {r["image_id"]: r["file_name"] for r in records}
    assert ids == {1: "photos/IMG 0001.png", 3: "photos/cat.jpg", 4: "photos/holiday.JPEG", 5: "photos/z.bmp"}
    for name in ("cat.jpg", "IMG 0001.png", "holiday.JPEG", "z.bmp"):
        got, exp = records_of(records, f"photos/{name}"), expected(project / "model.pt", project / "photos" / name)
        # Batched and single-image forwards round differently: near-equal scores may swap places.
        assert len(exp["labels"]) > 0 and len(got["labels"]) == len(exp["labels"])
        assert unmatched(exp, got, box_tol=0.02, score_tol=2e-5) == []  # x, y, w, h rounded to 0.01
    assert {r["category_name"] for r in records} <= set(CLASSES)


def test_one_image_and_a_glob(project):
    result = run("model.pt", "photos/cat.jpg", "--out", "cat_out.jpg", "--score-threshold", str(THRESHOLD), cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert cv2.imread(str(project / "cat_out.jpg")).shape == (171, 214, 3)
    records = json.loads((project / "cat_out.json").read_text())
    assert {r["image_id"] for r in records} == {1} and records[0]["file_name"] == "photos/cat.jpg"

    result = run("model.pt", "photos/*.png", "photos/*.bmp", "--out", "globbed", cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (project / "globbed").iterdir()) == ["IMG 0001.png", "detections.json", "z.bmp"]


def test_a_video(project):
    video = project / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 80))
    rng = np.random.default_rng(1)
    for _ in range(5):
        writer.write(photo(rng, 80, 96))
    writer.release()
    result = run("model.pt", "clip.mp4", "--out", "out/clip.mp4", "--score-threshold", str(THRESHOLD), cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((project / "out" / "clip.json").read_text())
    frames = [json.loads(line) for line in (project / "out" / "clip.jsonl").read_text().splitlines()]
    assert [f["frame"] for f in frames] == [1, 2, 3, 4, 5]
    assert len(records) == sum(len(f["labels"]) for f in frames) > 0
    assert {r["image_id"] for r in records} <= {1, 2, 3, 4, 5} and records[0]["file_name"] == "clip.mp4"
    cap = cv2.VideoCapture(str(project / "out" / "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5


def test_a_video_s_outputs_must_be_three_files(project):
    """--json naming the annotated video replaced it with JSON; naming the .jsonl replaced the
    per-frame detections; both exited 0."""
    writer = cv2.VideoWriter(str(project / "clip2.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 80))
    writer.write(photo(np.random.default_rng(2), 80, 96))
    writer.release()
    for json_name, message in (("v/r.mp4", "error: --json v/r.mp4: the same file as --out"),
                               ("v/r.jsonl", "error: --json v/r.jsonl: the same file as the per-frame file")):
        result = run("model.pt", "clip2.mp4", "--out", "v/r.mp4", "--json", json_name, cwd=project)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == message
        assert not (project / "v").exists()


@pytest.mark.parametrize("args, message", [
    (["photos", "--out", "x.mp4"], "--out x.mp4: images in, annotated images out; give a folder"),
    (["photos", "--out", "x.jpg"], "--out x.jpg: one image name for 5 images; give a folder"),
    (["photos/cat.jpg", "--out", "x.txt"], "--out x.txt: not a folder, image or video name"),
    (["photos", "--out", "photos"], "--out photos: is the folder of the input photos/IMG 0001.png"),
    (["photos/broken.jpg", "--out", "b.jpg"], "none of the 1 images could be read"),
    (["nothing/*.jpg", "--out", "o"], "nothing/*.jpg: no image matches the pattern"),
    (["missing.jpg", "--out", "o"], "missing.jpg: no such image, video or folder"),
    (["photos/cat.jpg", "--out", "o", "--batch-size", "0"], "--batch-size 0: expected at least 1"),
])
def test_bad_requests_are_one_line_errors_and_write_nothing(project, args, message):
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    result = run("model.pt", *args, cwd=project)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr[-500:]
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before


def test_exif_orientation_is_ignored_as_in_training(project, tmp_path):
    """A phone photo's orientation tag: boxes and the drawn copy stay in the stored pixels, as the
    annotations and the training data are (docs/data-format.md), and the detections are those of
    the stored pixels."""
    from test_detect import jpeg_with_orientation

    stored = photo(np.random.default_rng(5), 120, 200)
    tagged = tmp_path / "phone.jpg"
    tagged.write_bytes(jpeg_with_orientation(stored, 6))  # shown upright as 120 wide, 200 high
    plain = tmp_path / "plain.png"
    cv2.imwrite(str(plain), cv2.imread(str(tagged), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION))
    out = tmp_path / "out"
    result = run(str(project / "model.pt"), str(tagged), str(plain), "--out", str(out),
                 "--score-threshold", str(THRESHOLD), "--device", "cpu", cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert cv2.imread(str(out / "phone.jpg"), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION).shape == (120, 200, 3)
    records = json.loads((out / "detections.json").read_text())
    got, same = records_of(records, str(tagged)), records_of(records, str(plain))
    assert len(got["labels"]) > 0 and unmatched(same, got, box_tol=0.02, score_tol=1e-6) == []


def test_jfif_photos_are_read_and_other_files_are_said_not_taken(project, tmp_path):
    """A .jfif photo (a JPEG) given by name was a cv2.error traceback after the images before it had
    been written; in a folder it, and a .heic, were dropped without a word."""
    folder = tmp_path / "phone"
    folder.mkdir()
    rgb = photo(np.random.default_rng(1), 120, 160)
    cv2.imwrite(str(folder / "a.jpg"), rgb)
    (folder / "b.jfif").write_bytes((folder / "a.jpg").read_bytes())
    (folder / "c.heic").write_bytes(b"not decodable here")
    result = run("model.pt", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu", cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{folder}: 1 files are not taken" in result.stderr and ".heic" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jpg", "b.jfif", "detections.json"]
    assert cv2.imread(str(tmp_path / "out" / "b.jfif")).shape == (120, 160, 3)
    (folder / "d.heic").write_bytes((folder / "a.jpg").read_bytes())  # readable, but not writable by that name
    result = run("model.pt", str(folder / "a.jpg"), str(folder / "d.heic"), "--out", str(tmp_path / "out2"),
                 "--device", "cpu", cwd=project)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {folder / 'd.heic'}: OpenCV can't write a .heic image for its annotated copy; convert it to .jpg "
        "or .png first")
    assert not (tmp_path / "out2").exists()


def test_an_output_through_a_symlink_loop_is_one_line(project, tmp_path):
    """pathlib (Python 3.11) raises a plain RuntimeError for a loop of symbolic links: a traceback."""
    for name in ("a", "it's"):  # Python quotes a path with ' in double quotes
        (tmp_path / name).symlink_to(tmp_path / f"{name}2")
        (tmp_path / f"{name}2").symlink_to(tmp_path / name)
        result = run("model.pt", "photos/cat.jpg", "--out", str(tmp_path / name), cwd=project)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / name}"), result.stderr[-500:]
        assert "a loop of symbolic links" in result.stderr and "Traceback" not in result.stderr
