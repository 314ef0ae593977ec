"""ssd.metrics: VOC AP against an independent devkit reference, hand-computed cases, COCO AP50 nearby."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ssd.errors import InputError
from ssd.metrics import (
    DetectionAccumulator,
    coco_metrics,
    pr_curve_points,
    to_devkit,
    to_pixels,
    voc_ap,
    voc_evaluate,
    voc_iou,
)

# ---------------------------------------------------------------------------------------------
# The reference: the published devkit algorithm (VOCevaldet.m / py-faster-rcnn voc_eval.py),
# written out with plain Python loops, one class at a time.


def ref_voc_ap(rec: list[float], prec: list[float], use_07: bool) -> float:
    if use_07:
        ap = 0.0
        for k in range(11):
            t = k / 10
            p = max([p for r, p in zip(rec, prec) if r >= t], default=0.0)
            ap += p / 11
        return ap
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def ref_voc_eval(dets: list[dict], gts: list[dict], cls: int) -> tuple[list[float], list[float], int]:
    """Recall and precision per detection of class ``cls``, and the number of positives."""
    recs = {}
    npos = 0
    for img, g in enumerate(gts):
        boxes = [list(map(float, b)) for b, l in zip(g["boxes"], g["labels"]) if l == cls]
        diff = [bool(d) for d, l in zip(g["difficult"], g["labels"]) if l == cls]
        recs[img] = {"bbox": boxes, "difficult": diff, "det": [False] * len(boxes)}
        npos += sum(1 for d in diff if not d)
    flat = []
    for img, d in enumerate(dets):
        for b, s, l in zip(d["boxes"], d["scores"], d["labels"]):
            if l == cls:
                flat.append((img, float(s), list(map(float, b))))
    flat = sorted(flat, key=lambda x: -x[1])  # Python's sort is stable: ties keep dataset order
    tp, fp = [], []
    for img, _, bb in flat:
        r = recs[img]
        ovmax, jmax = -math.inf, -1
        for j, g in enumerate(r["bbox"]):
            iw = max(min(g[2], bb[2]) - max(g[0], bb[0]) + 1.0, 0.0)
            ih = max(min(g[3], bb[3]) - max(g[1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0) - inter
            if inter / uni > ovmax:
                ovmax, jmax = inter / uni, j
        if ovmax > 0.5:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp.append(1.0), fp.append(0.0)
                    r["det"][jmax] = True
                else:
                    tp.append(0.0), fp.append(1.0)
            else:
                tp.append(0.0), fp.append(0.0)
        else:
            tp.append(0.0), fp.append(1.0)
    ctp = cfp = 0.0
    rec, prec = [], []
    for a, b in zip(tp, fp):
        ctp, cfp = ctp + a, cfp + b
        rec.append(ctp / npos if npos else math.nan)
        prec.append(ctp / max(ctp + cfp, np.finfo(np.float64).eps))
    return rec, prec, npos


def random_dataset(seed: int, images: int = 25, classes: int = 3, difficult: float = 0.2, ties: bool = True):
    """Integer-pixel ground truth; detections: jittered copies (some twice), loose boxes, clutter."""
    rng = random.Random(seed)
    dets, gts = [], []
    for _ in range(images):
        g = {"boxes": [], "labels": [], "difficult": []}
        for _ in range(rng.randint(0, 6)):
            x, y = rng.randint(1, 300), rng.randint(1, 300)
            w, h = rng.randint(8, 120), rng.randint(8, 120)
            g["boxes"].append([x, y, x + w, y + h])
            g["labels"].append(rng.randint(1, classes))
            g["difficult"].append(rng.random() < difficult)
        d = {"boxes": [], "scores": [], "labels": []}
        for box, label in zip(g["boxes"], g["labels"]):
            for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):  # missed, found, found with duplicates
                j = [rng.gauss(0, 0.12 * (box[2] - box[0])) for _ in range(4)]
                d["boxes"].append([box[0] + j[0], box[1] + j[1], box[2] + j[2], box[3] + j[3]])
                d["labels"].append(label if rng.random() < 0.9 else rng.randint(1, classes))
                d["scores"].append(rng.random())
        for _ in range(rng.randint(0, 5)):  # clutter
            x, y = rng.uniform(1, 350), rng.uniform(1, 350)
            d["boxes"].append([x, y, x + rng.uniform(5, 90), y + rng.uniform(5, 90)])
            d["labels"].append(rng.randint(1, classes))
            d["scores"].append(rng.random())
        if ties:  # two decimals: plenty of exactly tied scores across and within images
            d["scores"] = [round(s, 2) for s in d["scores"]]
        dets.append(d)
        gts.append(g)
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
def test_voc_ap_equals_devkit_reference(seed):
    dets, gts = random_dataset(seed)
    ours = voc_evaluate(dets, gts, num_classes=3)
    aps07, aps10 = [], []
    for cls in (1, 2, 3):
        rec, prec, npos = ref_voc_eval(dets, gts, cls)
        mine = ours.classes[cls - 1]
        assert mine.num_positives == npos
        if npos == 0:
            assert math.isnan(mine.ap) and math.isnan(mine.ap07)
            continue
        np.testing.assert_allclose(mine.recall, rec, rtol=0, atol=1e-12)
        np.testing.assert_allclose(mine.precision, prec, rtol=0, atol=1e-12)
        assert mine.ap07 == pytest.approx(ref_voc_ap(rec, prec, True), abs=1e-12)
        assert mine.ap == pytest.approx(ref_voc_ap(rec, prec, False), abs=1e-12)
        aps07.append(ref_voc_ap(rec, prec, True))
        aps10.append(ref_voc_ap(rec, prec, False))
    assert ours.map07 == pytest.approx(sum(aps07) / len(aps07), abs=1e-12)
    assert ours.map2010 == pytest.approx(sum(aps10) / len(aps10), abs=1e-12)
    assert 0.0 < ours.map2010 < 1.0  # a non-trivial case


def test_voc_ap_reference_accepts_tensors_and_is_order_free_across_images():
    dets, gts = random_dataset(11)
    as_tensors = [{k: torch.tensor(v, dtype=torch.float64 if k != "labels" else torch.int64) for k, v in d.items()}
                  for d in dets]
    a = voc_evaluate(dets, gts, 3)
    b = voc_evaluate(as_tensors, gts, 3)
    assert a.map07 == b.map07 and a.map2010 == b.map2010


def test_ground_truth_as_detections_scores_one():
    _, gts = random_dataset(3, difficult=0.3)
    dets = [{"boxes": g["boxes"], "labels": g["labels"], "scores": [1.0] * len(g["labels"])} for g in gts]
    result = voc_evaluate(dets, gts, 3)
    for c in result.classes:
        if c.num_positives:
            assert c.ap07 == pytest.approx(1.0) and c.ap == pytest.approx(1.0)
            assert c.recall[-1] == pytest.approx(1.0)
    assert result.map07 == pytest.approx(1.0) and result.map2010 == pytest.approx(1.0)


def test_hand_computed_case():
    """One image, two boxes: TP (0.9), FP (0.8), TP (0.7)."""
    gts = [{"boxes": [[1, 1, 10, 10], [21, 21, 40, 40]], "labels": [1, 1], "difficult": [False, False]}]
    dets = [{"boxes": [[1, 1, 10, 10], [100, 100, 120, 120], [21, 21, 40, 40]], "scores": [0.9, 0.8, 0.7],
             "labels": [1, 1, 1]}]
    c = voc_evaluate(dets, gts, 1).classes[0]
    np.testing.assert_allclose(c.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(c.precision, [1.0, 0.5, 2 / 3])
    assert c.ap == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert c.ap07 == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


def test_iou_must_exceed_one_half_with_devkit_pixel_areas():
    # Devkit areas: [1, 1, 10, 10] is 10 x 10 = 100 pixels; [1, 1, 10, 5] is 10 x 5 = 50.
    assert voc_iou(np.array([[1, 1, 10, 5]]), np.array([[1, 1, 10, 10]]))[0, 0] == pytest.approx(0.5)
    gts = [{"boxes": [[1, 1, 10, 10]], "labels": [1], "difficult": [False]}]
    exactly_half = voc_evaluate([{"boxes": [[1, 1, 10, 5]], "scores": [0.9], "labels": [1]}], gts, 1)
    above = voc_evaluate([{"boxes": [[1, 1, 10, 6]], "scores": [0.9], "labels": [1]}], gts, 1)
    assert exactly_half.classes[0].ap == 0.0
    assert above.classes[0].ap == pytest.approx(1.0)


def test_difficult_boxes_are_neither_positive_nor_false_positive():
    gts = [{"boxes": [[1, 1, 10, 10], [51, 51, 60, 60]], "labels": [1, 1], "difficult": [False, True]}]
    dets = [{"boxes": [[51, 51, 60, 60], [1, 1, 10, 10], [51, 51, 60, 60]], "scores": [0.9, 0.8, 0.7],
             "labels": [1, 1, 1]}]
    c = voc_evaluate(dets, gts, 1).classes[0]
    assert c.num_positives == 1
    assert c.true_positive.tolist() == [False, True, False]
    # the two detections on the difficult box count for nothing, even the second one
    np.testing.assert_allclose(c.precision, [0.0, 1.0, 1.0])
    assert c.ap == pytest.approx(1.0) and c.ap07 == pytest.approx(1.0)


def test_duplicate_is_false_positive_without_falling_back_to_second_best_box():
    # Two overlapping boxes; both detections' best box is the first one.
    gts = [{"boxes": [[1, 1, 20, 20], [3, 1, 22, 20]], "labels": [1, 1], "difficult": [False, False]}]
    dets = [{"boxes": [[1, 1, 20, 20], [1, 1, 21, 20]], "scores": [0.9, 0.8], "labels": [1, 1]}]
    iou = voc_iou(np.array(dets[0]["boxes"]), np.array(gts[0]["boxes"]))
    assert iou[1, 0] > iou[1, 1] > 0.5
    c = voc_evaluate(dets, gts, 1).classes[0]
    assert c.true_positive.tolist() == [True, False]
    assert c.ap == pytest.approx(0.5)


def test_classes_without_ground_truth_are_left_out_of_the_mean():
    gts = [{"boxes": [[1, 1, 10, 10]], "labels": [1], "difficult": [False]},
           {"boxes": [[5, 5, 30, 30]], "labels": [3], "difficult": [False]}]
    dets = [{"boxes": [[1, 1, 10, 10], [1, 1, 10, 10]], "scores": [0.9, 0.5], "labels": [1, 2]},
            {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}]
    result = voc_evaluate(dets, gts, 3)
    ap = [c.ap for c in result.classes]
    assert ap[0] == pytest.approx(1.0) and math.isnan(ap[1]) and ap[2] == 0.0
    assert result.map2010 == pytest.approx(0.5)  # (1 + 0) / 2: class 2 has no positives
    assert result.classes[1].num_detections == 1


def test_empty_dataset_and_bad_labels():
    assert math.isnan(voc_evaluate([], [], 2).map07)
    with pytest.raises(ValueError, match="labels must be in 1..2"):
        voc_evaluate([{"boxes": [[1, 1, 5, 5]], "scores": [0.5], "labels": [3]}],
                     [{"boxes": np.zeros((0, 4)), "labels": [], "difficult": []}], 2)


def test_eleven_point_ap_counts_a_recall_of_exactly_three_tenths():
    # Ten positives, three found first: recall 0.3 exactly must reach the 0.3 point.
    rec = np.array([0.1, 0.2, 0.3])
    prec = np.array([1.0, 1.0, 1.0])
    assert voc_ap(rec, prec, True) == pytest.approx(4 / 11)
    assert voc_ap(rec, prec, False) == pytest.approx(0.3)


def test_pixel_conversions_recover_voc_xml_integers():
    # VOC xmin=48 ymin=240 xmax=195 ymax=371 is stored as edges [47, 239, 195, 371] (docs/data-format.md).
    w, h = 353, 500
    normalised = np.array([[47 / w, 239 / h, 195 / w, 371 / h]])
    np.testing.assert_allclose(to_devkit(to_pixels(normalised, w, h)), [[48, 240, 195, 371]], atol=1e-9)
    # In that convention the devkit IoU is the continuous IoU of the edge boxes.
    a, b = np.array([[10.0, 20.0, 50.0, 60.0]]), np.array([[30.0, 25.0, 70.0, 90.0]])
    inter = 20 * 35
    assert voc_iou(to_devkit(a), to_devkit(b))[0, 0] == pytest.approx(inter / (40 * 40 + 40 * 65 - inter))


def test_pr_curve_points_keep_true_positives_and_the_tail():
    gts = [{"boxes": [[1, 1, 10, 10], [21, 21, 40, 40]], "labels": [1, 1], "difficult": [False, False]}]
    dets = [{"boxes": [[1, 1, 10, 10], [100, 100, 120, 120], [21, 21, 40, 40], [200, 200, 210, 210]],
             "scores": [0.9, 0.8, 0.7, 0.6], "labels": [1, 1, 1, 1]}]
    r, p = pr_curve_points(voc_evaluate(dets, gts, 1).classes[0])
    np.testing.assert_allclose(r, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(p, [1.0, 2 / 3, 0.5])


def test_accumulator_is_independent_of_insertion_order_and_refuses_duplicates():
    dets, gts = random_dataset(5)
    norm = 400.0

    def build(order):
        acc = DetectionAccumulator()
        for i in order:
            d, g = dets[i], gts[i]
            det = {"boxes": torch.tensor(d["boxes"], dtype=torch.float64).reshape(-1, 4) / norm,
                   "scores": torch.tensor(d["scores"]), "labels": torch.tensor(d["labels"], dtype=torch.int64)}
            tgt = {"boxes": torch.tensor(g["boxes"], dtype=torch.float64).reshape(-1, 4) / norm,
                   "labels": torch.tensor(g["labels"], dtype=torch.int64),
                   "difficult": torch.tensor(g["difficult"], dtype=torch.bool)}
            acc.add(f"img{i:03d}", (400, 400), det, tgt)
        return acc

    forward = build(range(len(dets)))
    shuffled = list(range(len(dets)))
    random.Random(0).shuffle(shuffled)
    backward = build(shuffled)
    assert forward.voc(3).map07 == backward.voc(3).map07
    assert forward.voc(3).map2010 == backward.voc(3).map2010
    assert [r.image_id for r in backward.records] == sorted(r.image_id for r in backward.records)
    np.testing.assert_allclose(forward.records[0].gt_boxes, np.array(gts[0]["boxes"], dtype=float).reshape(-1, 4))
    merged = DetectionAccumulator(forward.records[::2] + forward.records[1::2])
    assert merged.voc(3).map2010 == forward.voc(3).map2010
    with pytest.raises(InputError, match="added twice"):  # a stage's one-line error (a key in two shards)
        merged.add_record(forward.records[0])


def random_detections(seed: int) -> DetectionAccumulator:
    """60 images of 1-8 integer boxes of 4 classes, with jittered, missing, doubled and stray detections."""
    rng = np.random.default_rng(0)
    acc = DetectionAccumulator()
    for i in range(60):
        g = rng.integers(1, 9)
        xy = rng.integers(0, 400, (g, 2))
        wh = rng.integers(20, 150, (g, 2))
        gt = np.concatenate([xy, xy + wh], 1).astype(float)
        labels = rng.integers(1, 5, g)
        boxes, scores, dl = [], [], []
        for box, label in zip(gt, labels):
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                boxes.append(box + np.round(rng.normal(0, 0.08, 4) * (box[2] - box[0])))
                scores.append(rng.uniform(0.3, 1.0))
                dl.append(label)
        for _ in range(rng.integers(0, 6)):
            x, y = rng.integers(0, 450, 2)
            boxes.append(np.array([x, y, x + rng.integers(10, 100), y + rng.integers(10, 100)], float))
            scores.append(rng.uniform(0.0, 0.8))
            dl.append(rng.integers(1, 5))
        size = (600, 600)
        det = {"boxes": np.array(boxes).reshape(-1, 4) / 600, "scores": np.array(scores), "labels": np.array(dl)}
        acc.add(f"im{i:03d}", size, det, {"boxes": gt / 600, "labels": labels})
    return acc


def test_ap50_close_to_torchmetrics_coco_ap50():
    """Same data through our VOC AP (VOC2010 area) and torchmetrics' COCO AP50.

    Known differences, all small on this data: COCO interpolates at 101 recall points (VOC:
    exact area under the envelope), matches at IoU >= 0.5 (VOC: > 0.5), lets a detection
    whose best box is taken match the next best free box (VOC: false positive) and keeps
    100 detections per image. Integer boxes, no difficult boxes, many objects, fewer than
    100 detections per image keep those differences small.
    """
    acc = random_detections(seed=0)
    voc = acc.voc(4)
    coco = coco_metrics(acc.records)
    print(f"VOC2010 mAP {voc.map2010:.4f}, VOC07 mAP {voc.map07:.4f}, COCO AP50 {coco['map_50']:.4f}")
    assert 0.4 < voc.map2010 < 0.95  # a discriminating case, neither trivial nor hopeless
    assert voc.map2010 == pytest.approx(coco["map_50"], abs=0.02)


def test_coco_metrics_equal_the_reference_evaluator():
    """torchmetrics' default thresholds are float32 (0.550000011920929): the metrics differed from
    pycocotools' / faster-coco-eval's own in the fifth decimal. Now exactly equal."""
    from faster_coco_eval import COCO, COCOeval_faster

    records = random_detections(seed=1).records
    for r in records[::7]:
        r.gt_difficult[:1] = True  # some crowd boxes too
    images, anns, dets = [], [], []
    for k, r in enumerate(records):
        images.append({"id": k, "width": r.width, "height": r.height})
        for (x1, y1, x2, y2), label, crowd in zip(r.gt_boxes, r.gt_labels, r.gt_difficult):
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": int(label), "iscrowd": int(crowd),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        for (x1, y1, x2, y2), label, score in zip(r.boxes, r.labels, r.scores):
            dets.append({"image_id": k, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(score)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(1, 5)]}
    gt.createIndex()
    evaluator = COCOeval_faster(gt, gt.loadRes(dets), "bbox", print_function=lambda *a: None)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    ours = coco_metrics(records)
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    reference = {n: float(v) for n, v in zip(names, evaluator.stats[:6])}
    for name in names:
        if reference[name] < 0:
            assert ours[name] is None, name
        else:
            assert ours[name] == pytest.approx(reference[name], abs=1e-7), name  # torchmetrics returns float32


def test_ground_truth_is_evaluated_at_its_stored_pixels():
    """The float32 normalised box [68, 29, 100, 61] came back as 60.9999979: its area of exactly
    32 x 32 fell out of COCO's medium range (which includes it), so map_medium had no object."""
    from ssd.data.samples import _target

    target = _target([[68.0, 29.0, 100.0, 61.0]], [0], [False], 353, 500, "x", None)
    acc = DetectionAccumulator()
    found = {"boxes": target["boxes"].clone(), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    record = acc.add("a", (353, 500), found, target)
    assert record.gt_boxes.tolist() == [[68.0, 29.0, 100.0, 61.0]]
    assert coco_metrics(acc.records)["map_medium"] == 1.0


def test_coco_metrics_of_perfect_detections_and_of_nothing():
    acc = DetectionAccumulator()
    gt = {"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.95]]), "labels": torch.tensor([1, 2])}
    acc.add("a", (200, 100), {**gt, "scores": torch.tensor([0.9, 0.8])}, gt)
    out = coco_metrics(acc.records)
    assert out["map"] == pytest.approx(1.0) and out["map_50"] == pytest.approx(1.0)
    assert out["map_large"] is None  # no object of 96 x 96 pixels or more: undefined, not -1
    assert coco_metrics([])["map"] is None
