"""The detect tool on generated videos: outputs, detections equal to the model's, LSTM state, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.detect import main
from ssd.data.transforms import eval_transform
from ssd.loss import MultiBoxLoss
from ssd.model_file import load_model_file, save_model_file
from ssd.models import lstm_ssd_mobilenet_v2, ssdlite_mobilenet_v2
from ssd.models.lstm_ssd import load_matching_weights
from ssd.postprocess import PostprocessConfig, PostProcessor

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FRAMES, SIDE = 96, 80, 12, 30
CLASSES = ["box"]
THRESHOLD = 0.2


def render(x: int, y: int) -> np.ndarray:
    """A grey BGR frame with a red square at (x, y)."""
    frame = np.full((HEIGHT, WIDTH, 3), 100, np.uint8)
    frame[y : y + SIDE, x : x + SIDE] = (40, 40, 230)
    return frame


def moving_square(i: int) -> np.ndarray:
    return render(4 + 5 * i, 10 + 2 * i)


def to_input(bgr: list[np.ndarray], size: int) -> torch.Tensor:
    """The evaluation transform's input: ``float [T, 3, size, size]`` in [0, 1]."""
    rgb = torch.from_numpy(np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in bgr])).permute(0, 3, 1, 2)
    return eval_transform(size).clip(rgb, [{}] * len(bgr))[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An mp4 of the moving square, the same frames as a folder of PNGs, and the model files."""
    root = tmp_path_factory.mktemp("detect")
    video = root / "square.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(FRAMES):
        writer.write(moving_square(i))
    writer.release()
    folder = root / "frames"
    folder.mkdir()
    for i in range(FRAMES):  # unpadded numbers: name order (10, 11, 2, ...) is not frame order
        cv2.imwrite(str(folder / f"frame_{i}.png"), moving_square(i))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread than on contended ones
    try:
        model = train_tiny_model()
    finally:
        torch.set_num_threads(threads)
    save_model_file(root / "ssdlite.pt", model, CLASSES)
    torch.manual_seed(1)
    lstm = lstm_ssd_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25, image_size=64)
    load_matching_weights(lstm, model.state_dict())  # the trained detector; the cell stays random
    save_model_file(root / "lstm.pt", lstm, CLASSES)
    return {"root": root, "video": video, "folder": folder, "ssdlite": root / "ssdlite.pt", "lstm": root / "lstm.pt"}


def train_tiny_model(steps: int = 80) -> torch.nn.Module:
    """SSDLite (width 0.25, 64 px) trained briefly to find the square anywhere in the frame."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = ssdlite_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25, image_size=64)
    model.head.init_background_prior(1 / (len(CLASSES) + 1))  # uniform start: the model the drawing checks were set on
    criterion = MultiBoxLoss(model.priors)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        xs = rng.integers(0, WIDTH - SIDE, 8)
        ys = rng.integers(0, HEIGHT - SIDE, 8)
        images = to_input([render(int(x), int(y)) for x, y in zip(xs, ys)], model.image_size)
        targets = [
            {"boxes": torch.tensor([[x / WIDTH, y / HEIGHT, (x + SIDE) / WIDTH, (y + SIDE) / HEIGHT]],
                                   dtype=torch.float32), "labels": torch.tensor([1])}
            for x, y in zip(xs, ys)
        ]
        loss = criterion(*model(images), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def expected_detections(model_file: Path, frames: list[np.ndarray], threshold: float) -> list[dict]:
    """The model and PostProcessor on ``frames`` one at a time (LSTM-SSD: state carried), in pixels."""
    model, _ = load_model_file(model_file)
    post = PostProcessor(model.priors, PostprocessConfig(score_threshold=threshold))
    scale = torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT], dtype=torch.float32)
    images = to_input(frames, model.image_size)
    out, state = [], None
    with torch.no_grad():
        for image in images:
            if getattr(model, "is_temporal", False):
                logits, deltas, state = model(image[None], state=state)
            else:
                logits, deltas = model(image[None])
            found = post(logits, deltas)[0]
            out.append({"boxes": found["boxes"] * scale, "scores": found["scores"], "labels": found["labels"]})
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_detections(records: list[dict], expected: list[dict], first: int = 1) -> None:
    """``first``: the first frame's number (a video's frames are numbered from 1, as in the shards)."""
    assert [r["frame"] for r in records] == list(range(first, first + len(expected)))
    for record, exp in zip(records, expected):
        assert record["labels"] == exp["labels"].tolist()
        assert record["class_names"] == [CLASSES[k - 1] for k in record["labels"]]
        # The file rounds boxes to 0.01 px and scores to 1e-5.
        torch.testing.assert_close(torch.tensor(record["scores"]).reshape(-1), exp["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(record["boxes"]).reshape(-1, 4), exp["boxes"], atol=0.01, rtol=0)
    assert sum(len(r["labels"]) for r in records) > 0, "no detections: the comparison would prove nothing"


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_video_subprocess(files, tmp_path):
    out = tmp_path / "out" / "annotated.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.detect", str(files["ssdlite"]), str(files["video"]), "--out", str(out),
         "--score-threshold", str(THRESHOLD), "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    jsonl = out.with_suffix(".jsonl")  # the default next to the video
    written = read_video(out)
    assert len(written) == FRAMES
    assert {f.shape for f in written} == {(HEIGHT, WIDTH, 3)}
    # The speed tag: black in the top-left corner, where the input is grey.
    assert written[0][1, 1].max() < 50

    source = read_video(files["video"])
    assert len(source) == FRAMES
    expected = expected_detections(files["ssdlite"], source, THRESHOLD)
    assert_same_detections(read_jsonl(jsonl), expected)
    assert no_temporaries(out.parent)


def test_boxes_drawn(files, tmp_path):
    """The outline of the best detection is drawn in the prediction colour (magenta)."""
    out = tmp_path / "annotated.avi"
    assert main([str(files["ssdlite"]), str(files["folder"]), "--out", str(out), "--fourcc", "MJPG",
                 "--score-threshold", str(THRESHOLD), "--device", "cpu"]) == 0
    records = read_jsonl(out.with_suffix(".jsonl"))
    frame_index, record = next((i, r) for i, r in enumerate(records) if r["boxes"])
    x1, y1, x2, y2 = (int(np.floor(v + 0.5)) for v in record["boxes"][0])
    frame = cv2.cvtColor(read_video(out)[frame_index], cv2.COLOR_BGR2RGB).astype(int)
    # Middle of the bottom edge (the name tag sits on the top edge): JPEG-coded, so roughly.
    r, g, b = frame[min(y2, HEIGHT) - 1, (x1 + x2) // 2]
    assert r > 150 and b > 150 and g < 110, (r, g, b)


def test_folder_of_frames(files, tmp_path):
    out = tmp_path / "annotated.mp4"
    jsonl = tmp_path / "detections" / "frames.jsonl"
    assert main([str(files["ssdlite"]), str(files["folder"]), "--out", str(out), "--jsonl", str(jsonl),
                 "--score-threshold", str(THRESHOLD), "--device", "cpu", "--fps", "5"]) == 0
    records = read_jsonl(jsonl)
    assert [r["file"] for r in records] == [f"frame_{i}.png" for i in range(FRAMES)]  # by number
    capture = cv2.VideoCapture(str(out))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    capture.release()
    assert len(read_video(out)) == FRAMES
    # PNGs are lossless: the model sees exactly the rendered frames.
    expected = expected_detections(files["ssdlite"], [moving_square(i) for i in range(FRAMES)], THRESHOLD)
    assert_same_detections(records, expected, first=0)  # the numbers in the file names, as prepare reads them


def test_frame_numbers_are_those_of_the_shards(files, tmp_path):
    """The same video converted by prepare and run through detect: the same frame numbers."""
    import yaml

    from pipeline import prepare
    from ssd.data.shards import iter_samples

    data = tmp_path / "ir"
    (data / "videos").mkdir(parents=True)
    (data / "annotations").mkdir()
    shutil.copy(files["video"], data / "videos" / "square.mp4")
    (data / "annotations" / "square.txt").write_text("10 10 8 8\n" * FRAMES)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {
        "workers": 1, "allow_empty_splits": True, "voc": {"enabled": False, "out": str(tmp_path / "voc")},
        "ir": {"source": "video", "root": str(data), "out": str(tmp_path / "shards"), "clip_length": FRAMES,
               "video": {"val_fraction": 0.0}},
    }}))
    assert prepare.main(["--params", str(params)]) == 0
    [clip] = [json.loads(s["json"]) for s in iter_samples(tmp_path / "shards")]

    out = tmp_path / "square-out.mp4"
    assert main([str(files["ssdlite"]), str(data / "videos" / "square.mp4"), "--out", str(out), "--device", "cpu"]) == 0
    assert [r["frame"] for r in read_jsonl(out.with_suffix(".jsonl"))] == clip["frames"] == list(range(1, FRAMES + 1))


def test_lstm_state_carried(files, tmp_path):
    out = tmp_path / "lstm.mp4"
    threshold = 0.05
    assert main([str(files["lstm"]), str(files["video"]), "--out", str(out),
                 "--score-threshold", str(threshold), "--device", "cpu"]) == 0
    records = read_jsonl(out.with_suffix(".jsonl"))
    source = read_video(files["video"])
    assert_same_detections(records, expected_detections(files["lstm"], source, threshold))

    # A fresh state on every frame gives other scores: the state was really carried.
    model, _ = load_model_file(files["lstm"])
    post = PostProcessor(model.priors, PostprocessConfig(score_threshold=threshold))
    with torch.no_grad():
        fresh = [post(*model(image[None])[:2])[0]["scores"].tolist() for image in to_input(source, 64)]
    carried = [r["scores"] for r in records]
    assert fresh[0] == pytest.approx(carried[0], abs=1e-4)  # the first frame starts from zeros anyway
    assert any(f != pytest.approx(c, abs=1e-3) for f, c in zip(fresh[1:], carried[1:]))


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_video(files, tmp_path, capfd):
    missing = tmp_path / "nope.mp4"
    assert main([str(files["ssdlite"]), str(missing), "--out", str(tmp_path / "o.mp4")]) == 2
    assert str(missing) in one_error_line(capfd)
    assert not (tmp_path / "o.mp4").exists()


def test_unreadable_video(files, tmp_path, capfd):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 20)
    assert main([str(files["ssdlite"]), str(bad), "--out", str(tmp_path / "o.mp4")]) == 2
    line = one_error_line(capfd)
    assert str(bad) in line and "readable video" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4"]


def test_empty_folder(files, tmp_path, capfd):
    empty = tmp_path / "frames"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a frame")
    assert main([str(files["ssdlite"]), str(empty), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "no frames" in one_error_line(capfd)


def test_unreadable_frame(files, tmp_path, capfd):
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "f1.png"), moving_square(0))
    (folder / "f2.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main([str(files["ssdlite"]), str(folder), "--out", str(out / "o.mp4"), "--device", "cpu"]) == 2
    line = capfd.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith("error: ") and "f2.png" in line
    assert list(out.iterdir()) == []  # neither output, nor a temporary


def test_codec_missing(files, tmp_path, capfd):
    out = tmp_path / "o.mp4"
    assert main([str(files["ssdlite"]), str(files["video"]), "--out", str(out), "--fourcc", "ZZZZ",
                 "--device", "cpu"]) == 2
    line = one_error_line(capfd)  # OpenCV's and FFmpeg's own complaints are swallowed
    assert "'ZZZZ'" in line and "--fourcc mp4v" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_model(files, tmp_path, capfd):
    assert main([str(tmp_path / "none.pt"), str(files["video"]), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "model file not found" in one_error_line(capfd)


def jpeg_with_orientation(bgr: np.ndarray, orientation: int) -> bytes:
    """The JPEG of ``bgr`` (pixels as stored) with an EXIF orientation tag, as phone cameras write them."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_a_corrupt_jpeg_frame_is_an_error_not_garbage_detections(files, tmp_path, capfd):
    folder = tmp_path / "frames"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 60, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    for i in range(3):  # noisy: the compressed pixels, not the header, are most of the file
        cv2.imwrite(str(folder / f"f{i}.jpg"), moving_square(i) // 2 + noise)
    whole = (folder / "f1.jpg").read_bytes()
    (folder / "f1.jpg").write_bytes(whole[: len(whole) // 2])  # libjpeg fills the rest with grey, and says so
    assert cv2.imread(str(folder / "f1.jpg")) is not None  # OpenCV alone returns a whole image
    out = tmp_path / "out"
    assert main([str(files["ssdlite"]), str(folder), "--out", str(out / "o.mp4"), "--device", "cpu"]) == 2
    line = capfd.readouterr().err.strip().splitlines()[-1]
    # (OpenCV's imdecode refuses some truncated JPEGs that its imread returns half grey.)
    assert line.startswith("error: ") and "f1.jpg" in line, line
    assert "corrupt image data" in line or "not a readable image" in line, line
    assert list(out.iterdir()) == []


def test_frames_of_two_videos_with_the_same_numbers_are_refused(files, tmp_path, capfd):
    """A VOC JPEGImages folder holds every video's frame 1, 2, ...: interleaved, they'd carry one
    video's LSTM state into the other's frames."""
    folder = tmp_path / "JPEGImages"
    folder.mkdir()
    for video in ("day", "night"):
        for i in range(1, 3):
            cv2.imwrite(str(folder / f"{video}_{i}.png"), moving_square(i))
    out = tmp_path / "o.mp4"
    assert main([str(files["lstm"]), str(folder), "--out", str(out), "--device", "cpu"]) == 2
    line = one_error_line(capfd)
    assert "day_1.png" in line and "night_1.png" in line and "frame number 1" in line, line
    assert not out.exists()


def test_frames_of_every_image_format_play_and_timestamps_are_refused(files, tmp_path, capfd):
    """A .tif or .webp frame among the .png ones was dropped without a word (the state jumped over
    it); timestamp names (12-00-59, 12-01-00) played 12-01-00 first, by their last number."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, suffix in enumerate([".png", ".tif", ".webp", ".png"]):
        cv2.imwrite(str(folder / f"frame_{i}{suffix}"), moving_square(i))
    jsonl = tmp_path / "mixed.jsonl"
    assert main([str(files["ssdlite"]), str(folder), "--out", str(tmp_path / "m.mp4"), "--jsonl", str(jsonl),
                 "--device", "cpu"]) == 0
    assert [r["file"] for r in read_jsonl(jsonl)] == ["frame_0.png", "frame_1.tif", "frame_2.webp", "frame_3.png"]
    capfd.readouterr()
    stamped = tmp_path / "stamped"
    stamped.mkdir()
    for i, stamp in enumerate(["12-00-58", "12-00-59", "12-01-00"]):
        cv2.imwrite(str(stamped / f"cam_{stamp}.png"), moving_square(i))
    out = tmp_path / "s.mp4"
    assert main([str(files["lstm"]), str(stamped), "--out", str(out), "--device", "cpu"]) == 2
    line = one_error_line(capfd)
    assert "cam_12-01-00.png comes before cam_12-00-58.png" in line and "one running number" in line, line
    assert not out.exists()


def test_exif_orientation_is_ignored_as_in_training(files, tmp_path):
    """Annotations and training use the stored pixels (docs/data-format.md); so does detect."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):  # 96x80 frames; orientation 6 would show them as 80x96
        (folder / f"f{i}.jpg").write_bytes(jpeg_with_orientation(moving_square(i), 6 if i == 1 else 1))
    jsonl = tmp_path / "o.jsonl"
    assert main([str(files["ssdlite"]), str(folder), "--out", str(tmp_path / "o.mp4"), "--jsonl", str(jsonl),
                 "--score-threshold", str(THRESHOLD), "--device", "cpu"]) == 0
    stored = [cv2.imread(str(folder / f"f{i}.jpg"), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) for i in range(3)]
    assert_same_detections(read_jsonl(jsonl), expected_detections(files["ssdlite"], stored, THRESHOLD), first=0)


def test_a_truncated_video_is_an_error_not_a_shorter_output(files, tmp_path, capfd):
    """A copy cut short: OpenCV reads the frames that are there and then reports the end of the
    video; the container still lists them all. The run wrote the part and exited 0."""
    whole = tmp_path / "whole.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 10, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(48):
        writer.write(moving_square(i % FRAMES))
    writer.release()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "out"
    assert main([str(files["ssdlite"]), str(whole), "--out", str(out / "whole.mp4"), "--device", "cpu"]) == 0
    assert len(read_jsonl(out / "whole.jsonl")) == 48
    assert main([str(files["ssdlite"]), str(cut), "--out", str(out / "cut.mp4"), "--device", "cpu"]) == 2
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {cut}: the video ended after ") and "of the 48 frames" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["whole.jsonl", "whole.mp4"]
