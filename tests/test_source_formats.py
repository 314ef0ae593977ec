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


def test_coco_videos_round_trip(tmp_path):
    truth = ex.videos({"walk": ("train", 9), "road": ("train", 8), "sea": ("val", 8)})
    ex.write_coco(tmp_path / "vid", truth, with_videos=True)
    assert run_stage(tmp_path, "voc.enabled=false", f"ir.root={tmp_path / 'vid'}", "ir.source=coco",
                     "ir.clip_length=4", allow_empty=False) == 0
    m = manifest(tmp_path, "ir")
    assert m["has_track_ids"] and m["classes"] == ex.CLASSES
    by_id = {t.id: t for t in truth}
    seen = set()
    for s in samples(tmp_path, "ir"):
        meta = s["meta"]
        ts = [by_id[i] for i in meta["ids"]]
        assert {t.video for t in ts} == {meta["video"]} and s["split"] == ts[0].split  # never across videos
        assert meta["frames"] == [t.number for t in ts] == list(range(ts[0].number, ts[0].number + 4))
        for j, t in enumerate(ts):
            assert s[f"{j:03d}.jpg"] == t.image
            assert _flat(meta["boxes"][j]) == pytest.approx(_flat(b.corners for b in t.boxes), abs=1e-6)
            assert [m["classes"][i] for i in meta["labels"][j]] == [b.name for b in t.boxes]
            assert meta["difficult"][j] == [b.difficult for b in t.boxes]
            assert meta["track_ids"][j] == [b.track for b in t.boxes]
            seen.add(t.id)
    assert seen == set(by_id)  # every frame in some clip (the tail clip overlaps)
    assert m["splits"]["train"]["video_names"] == ["road", "walk"] and m["splits"]["val"]["video_names"] == ["sea"]


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
    assert "data.yaml: dataset YAML not found" in err and "Traceback" not in err


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
