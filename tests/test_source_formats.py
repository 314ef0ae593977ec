"""Each dataset format converts its generated example through the prepare stage with params keys only,
and the shards read back equal to the source: counts, boxes (1e-6 px), labels, flags, frame order, videos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import source_examples as ex
from test_prepare import manifest, run_stage, samples

from ssd.data.sources import coco, yolo
from ssd.data.sources import report as reasons


def _flat(boxes) -> list[float]:
    return [v for b in boxes for v in b]


def _check_frames(tmp_path: Path, truth: list[ex.Truth], flags: bool = True) -> dict:
    """The frame shards hold every truth image once, in its split, with its boxes, labels and flags."""
    m = manifest(tmp_path)
    got = {s["meta"]["id"]: s for s in samples(tmp_path)}
    assert sorted(got) == sorted(t.id for t in truth)
    for t in truth:
        s = got[t.id]
        assert s["split"] == t.split and s["jpg"] == t.image
        meta = s["meta"]
        assert (meta["width"], meta["height"]) == (ex.W, ex.H)
        assert [m["classes"][i] for i in meta["labels"]] == [b.name for b in t.boxes]
        assert _flat(meta["boxes"]) == pytest.approx(_flat(b.corners for b in t.boxes), abs=1e-6)
        assert meta["difficult"] == [b.difficult and flags for b in t.boxes]
    for split in {t.split for t in truth}:
        assert m["splits"][split]["samples"] == sum(t.split == split for t in truth)
    return m


def test_coco_json_round_trip(tmp_path):
    truth = ex.frames({"train": 6, "val": 3})
    ex.write_coco(tmp_path / "coco", truth)
    assert run_stage(tmp_path, f"voc.root={tmp_path / 'coco'}", "voc.format=coco", "ir.enabled=false",
                     allow_empty=False) == 0
    m = _check_frames(tmp_path, truth)
    assert m["classes"] == ex.CLASSES  # the categories, in id order
    assert any(b.difficult for t in truth for b in t.boxes)  # iscrowd became difficult above
    assert m["skipped"] == []


def test_yolo_round_trip(tmp_path):
    truth = ex.frames({"train": 6, "val": 3}, seed=1)
    ex.write_yolo(tmp_path / "yolo", truth)
    assert run_stage(tmp_path, f"voc.root={tmp_path / 'yolo'}", "voc.format=yolo", "ir.enabled=false",
                     allow_empty=False) == 0
    m = _check_frames(tmp_path, truth, flags=False)  # YOLO has no difficult flag
    assert m["classes"] == ex.CLASSES  # data.yaml's names, in id order
    backgrounds = [t for t in truth if not t.boxes]
    assert m["fixed_counts"] == {yolo.BACKGROUND_IMAGE: len(backgrounds)} and m["skipped"] == []


def _check_clips(tmp_path: Path, truth: list[ex.Truth], length: int, images: bool = True) -> dict:
    """Every truth frame is in some clip of its own video and split, with its boxes, labels, flags and tracks."""
    m = manifest(tmp_path, "ir")
    by_video = {(t.video, t.number): t for t in truth}
    seen = set()
    for s in samples(tmp_path, "ir"):
        meta = s["meta"]
        ts = [by_video[meta["video"], n] for n in meta["frames"]]  # never across videos
        assert s["split"] == ts[0].split
        assert meta["frames"] == list(range(ts[0].number, ts[0].number + length))  # consecutive, in order
        for j, t in enumerate(ts):
            if images:
                assert s[f"{j:03d}.jpg"] == t.image
            assert _flat(meta["boxes"][j]) == pytest.approx(_flat(b.corners for b in t.boxes), abs=1e-6)
            assert [m["classes"][i] for i in meta["labels"][j]] == [b.name for b in t.boxes]
            assert meta["difficult"][j] == [b.difficult for b in t.boxes]
            assert meta["track_ids"][j] == [b.track for b in t.boxes]
            seen.add((t.video, t.number))
    assert seen == set(by_video)  # every frame in some clip (the tail clip overlaps)
    for split in {t.split for t in truth}:
        assert m["splits"][split]["video_names"] == sorted({t.video for t in truth if t.split == split})
    return m


def _run_ir(tmp_path: Path, root: Path, source: str, *overrides: str, length: int = 4) -> dict:
    assert run_stage(tmp_path, "voc.enabled=false", f"ir.root={root}", f"ir.source={source}",
                     f"ir.clip_length={length}", *overrides, allow_empty=False) == 0
    return manifest(tmp_path, "ir")


def test_coco_videos_round_trip(tmp_path):
    truth = ex.videos({"walk": ("train", 9), "road": ("train", 8), "sea": ("val", 8)})
    ex.write_coco(tmp_path / "vid", truth, with_videos=True)
    m = _run_ir(tmp_path, tmp_path / "vid", "coco")
    assert _check_clips(tmp_path, truth, 4) == m and m["has_track_ids"] and m["classes"] == ex.CLASSES


def test_imagenet_vid_round_trip(tmp_path):
    classes = ["airplane", "zebra"]
    truth = ex.videos({"ILSVRC2015_train_00000000": ("train", 9), "ILSVRC2015_train_00001000": ("train", 5),
                       "ILSVRC2015_val_00000000": ("val", 6)}, classes=classes, flags=False)
    ex.write_vid(tmp_path / "ILSVRC2015", truth, {"airplane": "n02691156", "zebra": "n02391049"})
    m = _run_ir(tmp_path, tmp_path / "ILSVRC2015", "vid")
    _check_clips(tmp_path, truth, 4)
    assert len(m["classes"]) == 30 and {"airplane", "zebra"} <= set(m["classes"])  # VID's 30, named
    assert m["skipped"] == []


def test_otb_round_trip_any_separator(tmp_path):
    truth = ex.videos({"Basketball": ("train", 7), "Car4": ("val", 6)}, first=1, classes=["target"], most=1, flags=False)
    for sep in (",", "\t", " "):
        root = tmp_path / f"otb{len(sep)}{sep == ','}"
        ex.write_otb(root, truth, sep)
        _run_ir(tmp_path, root, "otb")
        _check_clips(tmp_path, truth, 4)


def test_lasot_round_trip_hidden_frames_have_no_box(tmp_path):
    truth = ex.videos({"airplane-1": ("train", 8), "airplane-2": ("val", 5), "zebra-3": ("train", 6)}, first=1,
                      classes=["?"], most=1, flags=False)
    truth = [ex.Truth(t.id, t.split, t.image, tuple(ex.Box(t.video.rsplit("-", 1)[0], b.corners, False, b.track)
                      for b in t.boxes), t.video, t.number) for t in truth]  # the class is the category
    assert any(not t.boxes for t in truth)  # some frames are flagged occluded or out of view
    ex.write_lasot(tmp_path / "LaSOT", truth)
    m = _run_ir(tmp_path, tmp_path / "LaSOT", "lasot")
    _check_clips(tmp_path, truth, 4)
    assert m["classes"] == ["airplane", "zebra"]


@pytest.mark.parametrize("as_video", [False, True])
def test_antiuav_round_trip_frames_and_video(tmp_path, as_video):
    truth = ex.videos({"20190925_101846_1_1": ("train", 6), "20190925_111757_1_2": ("val", 5)}, first=1,
                      classes=["uav"], most=1, flags=False)
    ex.write_antiuav(tmp_path / "antiuav", truth, as_video)
    m = _run_ir(tmp_path, tmp_path / "antiuav", "antiuav")
    _check_clips(tmp_path, truth, 4, images=not as_video)  # a video's frames are decoded and re-encoded
    assert m["classes"] == ["uav"]


def test_coco_bad_entries_are_skipped_and_counted(tmp_path):
    truth = ex.frames({"train": 4, "val": 2})
    root = tmp_path / "coco"
    ex.write_coco(root, truth)
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["annotations"] += [
        {"id": 90, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]},  # no such image
        {"id": 91, "image_id": 2, "category_id": 1, "bbox": [1, "x", 5, 5]},  # not a number
        {"id": 92, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]},  # no such category
    ]
    data["images"].append({"id": 50, "file_name": "gone.jpg", "width": ex.W, "height": ex.H})  # no file
    path.write_text(json.dumps(data))
    assert run_stage(tmp_path, f"voc.root={root}", "voc.format=coco", "ir.enabled=false") == 0
    m = manifest(tmp_path)
    assert m["skipped_counts"] == {
        reasons.ANNOTATION_WITHOUT_IMAGE: 2, "non-numeric coordinate": 1, reasons.UNKNOWN_CLASS: 1,
    }
    assert sum(v["samples"] for v in m["splits"].values()) == len(truth)  # the good ones all converted
    assert run_stage(tmp_path, f"voc.root={root}", "voc.format=coco", "ir.enabled=false", strict=True) == 2


def test_yolo_bad_labels_are_skipped_and_counted(tmp_path, capsys):
    truth = ex.frames({"train": 4, "val": 2}, seed=2)
    root = tmp_path / "yolo"
    ex.write_yolo(root, truth)
    labelled = [t for t in truth if t.boxes and t.split == "train"]
    (root / "labels" / "train" / f"{labelled[0].id}.txt").write_text("0 0.5 0.5 0.2\n")  # 4 values
    (root / "labels" / "train" / f"{labelled[1].id}.txt").write_text("5 0.5 0.5 0.2 0.2\n")  # class 5 of 2
    (root / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    assert run_stage(tmp_path, f"voc.root={root}", "voc.format=yolo", "ir.enabled=false") == 0
    m = manifest(tmp_path)
    assert m["skipped_counts"] == {
        yolo.MALFORMED_LABEL: 1, reasons.UNKNOWN_CLASS: 1, reasons.ANNOTATION_WITHOUT_IMAGE: 1,
    }
    assert sum(v["samples"] for v in m["splits"].values()) == len(truth) - 1
    (root / "data.yaml").unlink()
    capsys.readouterr()
    assert run_stage(tmp_path, f"voc.root={root}", "voc.format=yolo", "ir.enabled=false") == 2
    err = capsys.readouterr().err
    assert "data.yaml: dataset YAML not found (it names the classes)" in err and "Traceback" not in err


def test_yolo_polygon_lines_give_their_bounding_box():
    (obj,) = yolo.parse_label("1 0.1 0.2 0.5 0.1 0.3 0.6\n", ["a", "b"])
    assert obj.name == "b" and obj.corners == pytest.approx((0.1, 0.1, 0.5, 0.6))


def test_coco_file_problems_are_one_line_errors(tmp_path, capsys):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text("{not json")
    assert run_stage(tmp_path, f"voc.root={root}", "voc.format=coco", "voc.coco.splits=[train]", "ir.enabled=false") == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "instances_train.json: not valid JSON" in line and "Traceback" not in err
    with pytest.raises(Exception, match="COCO annotation file not found"):
        coco.read(root, coco.CocoLayout(splits=("val",)), reasons.Report())


def test_tracking_sequences_bad_input_is_skipped_and_counted(tmp_path):
    truth = ex.videos({"Boy": ("train", 6), "Car4": ("train", 6), "Dog": ("val", 6)}, first=1, classes=["target"],
                      most=1, flags=False)
    root = tmp_path / "otb"
    ex.write_otb(root, truth)
    with open(root / "Car4" / "groundtruth_rect.txt", "a") as f:
        f.write("1,2,3,4\n")  # one box more than frames
    (root / "Lone" / "img").mkdir(parents=True)  # frames without a box list
    (root / "Lone" / "img" / "0001.jpg").write_bytes(ex.jpeg(99))
    m = _run_ir(tmp_path, root, "otb")
    assert m["skipped_counts"] == {reasons.BOX_LIST_LENGTH: 1, reasons.VIDEO_WITHOUT_ANNOTATION: 1}
    assert m["splits"]["train"]["video_names"] == ["Boy"]  # the good sequences still converted
    uav = ex.videos({"a": ("train", 5), "b": ("val", 5)}, first=1, classes=["uav"], most=1, flags=False)
    root = tmp_path / "antiuav"
    ex.write_antiuav(root, uav)
    (root / "b" / "IR_label.json").write_text('{"exist": [1, 0], "gt_rect": [[1, 2, 3, 4]]}')
    assert run_stage(tmp_path, "voc.enabled=false", f"ir.root={root}", "ir.source=antiuav", "ir.clip_length=4") == 0
    assert manifest(tmp_path, "ir")["skipped_counts"] == {"malformed Anti-UAV label file": 1}
    (root / "a" / "IR_label.json").write_text("[]")  # now nothing converts: exit 2, not an empty success
    assert run_stage(tmp_path, "voc.enabled=false", f"ir.root={root}", "ir.source=antiuav", "ir.clip_length=4") == 2


def test_video_and_box_list_of_other_stems_pair_only_through_the_option(tmp_path, capsys):
    from test_prepare import ir_video_run, make_ir_video

    root = tmp_path / "irv"
    make_ir_video(root, {"train": ["clipA"], "val": ["clipB"]})
    (root / "annotations" / "clipA.txt").rename(root / "annotations" / "clipA_gt.txt")
    assert ir_video_run(tmp_path) == 0  # not guessed: reported with what each side has
    m = manifest(tmp_path, "ir")
    assert {(Path(e["file"]).name, e["reason"]) for e in m["skipped"]} == {
        ("clipA.avi", reasons.VIDEO_WITHOUT_ANNOTATION), ("clipA_gt.txt", reasons.ANNOTATION_WITHOUT_VIDEO),
        ("splits.json", reasons.LISTED_VIDEO_MISSING)}
    assert m["splits"]["train"]["samples"] == 0
    assert ir_video_run(tmp_path, "ir.video.pairs={clipA: clipA_gt}") == 0
    m = manifest(tmp_path, "ir")
    assert m["skipped"] == [] and m["splits"]["train"]["video_names"] == ["clipA"]
    capsys.readouterr()
    assert ir_video_run(tmp_path, "ir.video.pairs={clipA: nothing}") == 2
    assert "pairs: no annotation 'nothing' for video 'clipA'" in capsys.readouterr().err
    # An annotation of the video's own name that the pair replaces is reported, not dropped silently.
    (root / "annotations" / "clipA.txt").write_text((root / "annotations" / "clipA_gt.txt").read_text())
    assert ir_video_run(tmp_path, "ir.video.pairs={clipA: clipA_gt}") == 0
    assert [(Path(e["file"]).name, e["reason"]) for e in manifest(tmp_path, "ir")["skipped"]] == [
        ("clipA.txt", reasons.DUPLICATE_ANNOTATION)]


def test_one_video_split_by_frame_range_only_when_asked(tmp_path, caplog):
    truth = ex.videos({"only": ("train", 20)}, first=1, classes=["uav"], most=1, flags=False)
    root = tmp_path / "antiuav"
    ex.write_antiuav(root, truth)
    (root / "splits.json").unlink()
    # By name, one video goes to one split: val gets nothing, which is exit 2 unless allowed.
    assert run_stage(tmp_path, "voc.enabled=false", f"ir.root={root}", "ir.source=antiuav", "ir.clip_length=4",
                     allow_empty=False) == 2
    m = _run_ir(tmp_path, root, "antiuav", "ir.antiuav.frame_split=0.25")
    assert "near-duplicates" in caplog.text  # the leakage warning
    frames = {split: sorted({n for s in samples(tmp_path, "ir") if s["split"] == split for n in s["meta"]["frames"]})
              for split in ("train", "val")}
    assert frames == {"train": list(range(1, 16)), "val": list(range(16, 21))}  # the last quarter, no overlap
    assert m["splits"]["train"]["video_names"] == m["splits"]["val"]["video_names"] == ["only"]
