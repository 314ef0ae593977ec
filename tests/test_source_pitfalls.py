"""User data that the converters took wrongly: each case exited 0 with something else before.

Outputs that would have deleted the dataset, a dataset without one box, YOLO layouts and
quirks (no labels folder, one file name in two split folders, pose labels, two images of one id,
duplicate names, non-UTF-8 labels), COCO images the JSON leaves out or that lie outside the
dataset, paths that leave the dataset's root, Anti-UAV boxes of no size, a video cut short.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import source_examples as ex
from test_prepare import manifest, run_stage, samples

from ssd.data.sources import decode, yolo
from ssd.data.sources import report as reasons


def _yolo(tmp_path: Path, seed: int = 0) -> tuple[Path, list[ex.Truth]]:
    truth = ex.frames({"train": 4, "val": 3}, seed=seed)
    root = tmp_path / "yolo"
    ex.write_yolo(root, truth)
    return root, truth


def _yolo_run(tmp_path: Path, root: Path, *overrides: str, **kw) -> int:
    return run_stage(tmp_path, f"voc.root={root}", "voc.format=yolo", "ir.enabled=false", *overrides, **kw)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error: ")][-1]


# ---------------------------------------------------------------------------------------------
# Outputs replace their folder whole


def test_an_output_holding_the_dataset_or_another_output_is_refused(tmp_path, capsys):
    root, _ = _yolo(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    # out=tmp_path would replace the dataset (and notes.txt) with the shards, and exit 0
    assert run_stage(tmp_path, f"voc.root={root}", "voc.format=yolo", "ir.enabled=false", f"voc.out={tmp_path}") == 2
    assert f"prepare.voc.out: {tmp_path} holds prepare.voc.root" in _error(capsys)
    assert (root / "data.yaml").is_file() and (tmp_path / "notes.txt").read_text() == "mine"
    same = tmp_path / "shards"
    assert _yolo_run(tmp_path, root, f"voc.out={same}", f"ir.out={same}") == 2  # IR's manifest over VOC's shards
    assert f"prepare.voc.out: {same} holds prepare.ir.out" in _error(capsys)


def test_an_existing_folder_that_is_not_a_prepared_dataset_is_not_replaced(tmp_path, capsys):
    root, truth = _yolo(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert _yolo_run(tmp_path, root, f"voc.out={mine}") == 2
    assert f"prepare.voc.out: {mine} exists and is not a prepared dataset" in _error(capsys)
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert _yolo_run(tmp_path, root) == 0 and _yolo_run(tmp_path, root) == 0  # its own output: replaced
    assert sum(v["samples"] for v in manifest(tmp_path)["splits"].values()) == len(truth)


def test_deploy_and_sample_outputs_are_checked_the_same_way(tmp_path):
    from pipeline.stage import StageError, check_replaceable

    models = tmp_path / "models"
    models.mkdir()
    (models / "ssdlite_voc.pt").write_bytes(b"weights")
    onnx_only = lambda p: all(f.suffix == ".onnx" for f in p.iterdir())  # noqa: E731
    with pytest.raises(StageError, match=r"^deploy\.out_dir: .*models holds deploy\.models\[0\]\.file"):
        check_replaceable(models, "deploy.out_dir", onnx_only, "a folder of ONNX graphs",
                          {"deploy.models[0].file": models / "ssdlite_voc.pt"})
    with pytest.raises(StageError, match=r"models exists and is not a folder of ONNX graphs"):
        check_replaceable(models, "deploy.out_dir", onnx_only, "a folder of ONNX graphs", {})
    (models / "ssdlite_voc.pt").unlink()
    (models / "a.onnx").write_bytes(b"graph")
    check_replaceable(models, "deploy.out_dir", onnx_only, "a folder of ONNX graphs", {})  # its own output
    check_replaceable(tmp_path / "new", "deploy.out_dir", onnx_only, "a folder of ONNX graphs", {})

    from pipeline.sample import main

    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "photos.zip").write_bytes(b"zip")
    params = tmp_path / "params.yaml"
    params.write_text("sample: {}\n")
    code = main(["--params", str(params), "--set", f"voc.out_dir={tmp_path / 'voc'}",
                 "--set", f"ir.out_dir={tmp_path / 'ir'}"])
    assert code == 2 and (tmp_path / "voc" / "photos.zip").is_file()


# ---------------------------------------------------------------------------------------------
# A dataset without one box


def test_a_dataset_without_a_single_box_is_an_error(tmp_path, capsys):
    root, _ = _yolo(tmp_path)
    (root / "data.yaml").write_text("names: [Car, Person]\n")  # the labels' ids still fit: boxes kept
    assert _yolo_run(tmp_path, root) == 0
    for label in (root / "labels").rglob("*.txt"):
        label.write_text("")  # every label empty: background images only
    assert _yolo_run(tmp_path, root) == 2
    assert "voc samples but not one box" in _error(capsys)


# ---------------------------------------------------------------------------------------------
# YOLO


def test_yolo_without_its_labels_folder_is_an_error_not_background_images(tmp_path, capsys):
    root, _ = _yolo(tmp_path)
    (root / "labels").rename(root / "train_labels")
    assert _yolo_run(tmp_path, root, strict=True) == 2
    assert f"{root / 'labels' / 'train'}: directory not found (split 'train' is configured; yolo.labels_dir)" in \
        _error(capsys)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    assert _yolo_run(tmp_path, root) == 2
    assert "no label file (.txt) for the 4 images of split 'train'; check yolo.labels_dir" in _error(capsys)


def test_yolo_images_of_one_name_in_two_split_folders_are_both_kept(tmp_path):
    # train/000.jpg ... and val/000.jpg ...: as some exporters number each split's images
    truth = [dataclasses.replace(t, id=f"{i % 3:03d}") for i, t in enumerate(ex.frames({"train": 3, "val": 3}))]
    root = tmp_path / "yolo"
    ex.write_yolo(root, truth)
    assert _yolo_run(tmp_path, root) == 0
    m = manifest(tmp_path)
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 3, "val": 3}
    assert reasons.KEY_COLLISION not in m.get("skipped_counts", {})
    assert sorted(s["meta"]["id"] for s in samples(tmp_path) if s["split"] == "val") == ["000", "001", "002"]


def test_yolo_quirks(tmp_path, capsys):
    root, truth = _yolo(tmp_path)
    labelled = [t for t in truth if t.boxes and t.split == "train"]
    first = labelled[0]
    (root / "images" / "train" / f"{first.id}.png").write_bytes(first.image)  # a second image of one id
    (root / "labels" / "train" / f"{labelled[1].id}.txt").write_bytes("0 0.5 0.5 0.2 0.2\n".encode("utf-16"))
    assert _yolo_run(tmp_path, root) == 0
    m = manifest(tmp_path)
    assert m["skipped_counts"] == {reasons.DUPLICATE_IMAGE: 1, yolo.MALFORMED_LABEL: 1}
    (stored,) = [s for s in samples(tmp_path) if s["meta"]["id"] == first.id]
    assert "jpg" in stored and "png" not in stored  # the .jpg, the first in order of preference

    (root / "data.yaml").write_text("names: [car, car]\n")
    assert _yolo_run(tmp_path, root) == 2
    assert "names: 'car' is given twice (ids 0 and 1)" in _error(capsys)


def test_yolo_pose_labels_give_the_box_not_the_keypoints_hull():
    line = "0 .5 .5 .2 .2 .45 .45 2 .55 .55 2\n"  # a box, then two keypoints (x, y, visibility)
    (obj,) = yolo.parse_label(line, ["person"], pose=True)
    assert obj.corners == pytest.approx((0.4, 0.4, 0.6, 0.6))
    (polygon,) = yolo.parse_label("0 .1 .2 .5 .1 .3 .6\n", ["person"])  # without kpt_shape: a polygon
    assert polygon.corners == pytest.approx((0.1, 0.1, 0.5, 0.6))


# ---------------------------------------------------------------------------------------------
# COCO, paths, Anti-UAV, videos


def test_coco_images_outside_the_json_or_the_dataset_are_reported(tmp_path):
    truth = ex.frames({"train": 4, "val": 2})
    root = tmp_path / "coco"
    ex.write_coco(root, truth)
    (root / "images" / "train" / "unlisted.jpg").write_bytes(ex.jpeg(9))
    (tmp_path / "outside.jpg").write_bytes(ex.jpeg(8))
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["images"].append({"id": 77, "file_name": "../../../outside.jpg", "width": ex.W, "height": ex.H})
    path.write_text(json.dumps(data))
    assert run_stage(tmp_path, f"voc.root={root}", "voc.format=coco", "ir.enabled=false") == 0
    m = manifest(tmp_path)
    assert m["skipped_counts"] == {reasons.IMAGE_WITHOUT_ANNOTATION: 1, "malformed COCO entry": 1}
    assert sum(v["samples"] for v in m["splits"].values()) == len(truth)


@pytest.mark.parametrize("override, message", [
    ("voc.annotations_dir=/elsewhere/Annotations", "prepare.voc.annotations_dir: must be a path inside the dataset's root"),
    ("voc.images_dir=../JPEGImages", "prepare.voc.images_dir: must be a path inside the dataset's root"),
    ("voc.coco.images_dir=images/{name}", "prepare.voc.coco.images_dir: may hold one placeholder, {split}"),
])
def test_paths_that_leave_the_dataset_root_are_refused(tmp_path, capsys, override, message):
    assert run_stage(tmp_path, "voc.root=somewhere", "ir.enabled=false", override) == 2
    assert message in _error(capsys)


def test_antiuav_boxes_of_no_size_are_reported_not_dropped_silently(tmp_path):
    truth = ex.videos({"seq_a": ("train", 6), "seq_b": ("val", 5)}, first=1, classes=["uav"], most=1, flags=False)
    root = tmp_path / "antiuav"
    ex.write_antiuav(root, truth)
    label = root / "seq_a" / "IR_label.json"
    data = json.loads(label.read_text())
    data["exist"][0], data["gt_rect"][0] = 1, [5, 5, 0, 0]  # said to be there, with no size
    label.write_text(json.dumps(data))
    assert run_stage(tmp_path, f"ir.root={root}", "ir.source=antiuav", "ir.clip_length=4", "voc.enabled=false") == 0
    assert manifest(tmp_path, "ir")["skipped_counts"].get("zero-area box") == 1


def test_a_video_cut_short_is_skipped_not_matched_to_the_wrong_frames(tmp_path):
    whole = tmp_path / "whole.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(40):
        writer.write(np.full((48, 64, 3), i * 5, np.uint8))
    writer.release()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    assert len(decode.decode_video("file", str(whole), "w", 90, 10**8).frames) == 40
    result = decode.decode_video("file", str(cut), "c", 90, 10**8)
    assert result.error is not None and result.error[0] == reasons.UNREADABLE_VIDEO
    assert "of the 40 frames its container lists" in result.error[1]
    assert decode.cut_short(40, 39) is False and decode.cut_short(0, 3) is False  # a frame off; no count
