import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import nms

from ssd.boxes import clip_boxes, decode
from ssd.postprocess import PostprocessConfig, PostProcessor
from ssd.postprocess import class_probabilities as pp_probabilities
from ssd.priors import PriorConfig, generate_priors
from pipeline.bench.postprocess import make_inputs, same_detections, torchvision_postprocess
from ssd.boxes import cxcywh_to_xyxy

PRIORS = generate_priors(
    PriorConfig(min_sizes=(30, 60, 120), max_sizes=(60, 120, 200), aspect_ratios=((2,), (2, 3), (2,))), 200, [10, 5, 2]
)


def reference(logits, deltas, priors, cfg):
    """Plain per-image, per-class SSD post-processing (ssd.pytorch's Detect, written out)."""
    out = []
    for b in range(logits.shape[0]):
        scores = torch.softmax(logits[b], dim=-1)
        boxes = clip_boxes(decode(deltas[b], priors))
        all_boxes, all_scores, all_labels = [], [], []
        for c in range(1, logits.shape[-1]):
            s = scores[:, c]
            keep = s > cfg.score_threshold
            s, bx = s[keep], boxes[keep]
            s, idx = s.sort(descending=True)
            s, bx = s[: cfg.top_k], bx[idx[: cfg.top_k]]
            kept = nms(bx, s, cfg.nms_threshold)
            all_boxes.append(bx[kept])
            all_scores.append(s[kept])
            all_labels.append(torch.full((len(kept),), c, dtype=torch.int64))
        bx, s, lab = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        order = s.argsort(descending=True)[: cfg.max_detections]
        out.append({"boxes": bx[order], "scores": s[order], "labels": lab[order]})
    return out


def random_outputs(batch, num_classes, seed, flat):
    g = torch.Generator().manual_seed(seed)
    p = PRIORS.shape[0]
    logits = torch.randn(batch, p, num_classes, generator=g) * (0.3 if flat else 2.0)
    if not flat:
        logits[..., 0] += 4.0
    deltas = torch.randn(batch, p, 4, generator=g) * 0.5
    return logits, deltas


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize(
    "cfg",
    [
        PostprocessConfig(),
        PostprocessConfig(score_threshold=0.05, top_k=50, nms_threshold=0.3, max_detections=30),
        PostprocessConfig(top_k=1000, max_detections=5),
        PostprocessConfig(max_detections=1000),  # the survivor window must grow
        PostprocessConfig(score_threshold=0.3),  # peaked: the general path; flat: 60 candidates, the short one
    ],
)
def test_same_detections_as_per_class_reference(cfg, flat):
    logits, deltas = random_outputs(3, 6, seed=7, flat=flat)
    ours = PostProcessor(PRIORS, cfg)(logits, deltas)
    ref = reference(logits, deltas, PRIORS, cfg)
    for a, r in zip(ours, ref):
        assert a["labels"].tolist() == r["labels"].tolist()
        assert_close(a["scores"], r["scores"])
        assert_close(a["boxes"], r["boxes"])
    assert any(len(a["labels"]) for a in ours)


def test_few_candidates_take_the_short_path(monkeypatch):
    """A deployed detector's threshold leaves few candidates: no top-k, no survivor window, one NMS call;
    the detections are the reference's, for one image and for a batch."""
    import ssd.postprocess as pp

    def general(*args, **kwargs):
        raise AssertionError("the general path ran")

    monkeypatch.setattr(pp, "_by_image_and_score", general)
    cfg = PostprocessConfig(score_threshold=0.5)
    logits, deltas = random_outputs(3, 6, seed=7, flat=False)
    for n in (1, 3):
        ours = PostProcessor(PRIORS, cfg)(logits[:n], deltas[:n])
        for a, r in zip(ours, reference(logits[:n], deltas[:n], PRIORS, cfg), strict=True):
            assert a["labels"].tolist() == r["labels"].tolist()
            assert_close(a["boxes"], r["boxes"])
            assert_close(a["scores"], r["scores"])
        assert sum(len(a["labels"]) for a in ours) > 10


def test_class_probabilities_equal_softmax():
    logits = torch.randn(2, 300, 7) * 5
    assert_close(pp_probabilities(logits), torch.softmax(logits, dim=-1)[..., 1:], atol=1e-6, rtol=1e-5)
    assert_close(pp_probabilities(torch.full((1, 2, 3), 1000.0)), torch.full((1, 2, 2), 1 / 3))  # no overflow


def test_no_candidates_gives_empty_detections():
    logits = torch.zeros(2, PRIORS.shape[0], 4)
    logits[..., 0] = 20.0
    dets = PostProcessor(PRIORS)(logits, torch.zeros(2, PRIORS.shape[0], 4))
    assert [d["boxes"].shape for d in dets] == [(0, 4), (0, 4)]


def test_images_are_independent():
    logits, deltas = random_outputs(3, 5, seed=9, flat=False)
    batch = PostProcessor(PRIORS)(logits, deltas)
    single = PostProcessor(PRIORS)(logits[1:2], deltas[1:2])[0]
    assert_close(batch[1]["boxes"], single["boxes"])
    assert batch[1]["labels"].tolist() == single["labels"].tolist()


@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_same_as_torchvision_ssd_postprocess(kind):
    logits, deltas = make_inputs(kind, 2, PRIORS.shape[0], 8, seed=1)
    cfg = PostprocessConfig()
    ours = PostProcessor(PRIORS, cfg)(logits, deltas)
    theirs = torchvision_postprocess(cfg)(logits, deltas, cxcywh_to_xyxy(PRIORS))
    assert same_detections(ours, theirs)


def test_survivor_window_grows_until_exact(monkeypatch):
    import ssd.postprocess as pp

    calls = []
    real = pp.nms

    def counting(boxes, scores, thr):
        calls.append(len(boxes))
        return real(boxes, scores, thr)

    monkeypatch.setattr(pp, "nms", counting)
    cfg = PostprocessConfig(nms_threshold=0.1, max_detections=60)
    logits, deltas = random_outputs(2, 4, seed=11, flat=True)
    ours = PostProcessor(PRIORS, cfg)(logits, deltas)
    assert len(calls) > 1, "the test should exercise a second NMS round"
    for a, r in zip(ours, reference(logits, deltas, PRIORS, cfg)):
        assert a["labels"].tolist() == r["labels"].tolist()
        assert_close(a["boxes"], r["boxes"])


@pytest.mark.parametrize("n, groups", [(300, 5), (3000, 40)])
def test_grouped_nms_equals_torchvisions_batched_nms(n, groups):
    # Below NMS_CHUNK boxes one shifted call, above several chunks of whole groups: the same verdicts.
    from torchvision.ops import batched_nms

    from ssd.postprocess import grouped_nms

    g = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=g) * 0.8
    wh = torch.rand(n, 2, generator=g) * 0.2 + 0.01
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randperm(n, generator=g).float() / n  # no ties
    idx = torch.randint(0, groups, (n,), generator=g)
    keep = grouped_nms(boxes, scores, idx, 0.45)
    expected = batched_nms(boxes.double(), scores.double(), idx, 0.45)
    assert torch.equal(keep, expected)
    assert torch.all(scores[keep][1:] <= scores[keep][:-1])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_one_cpu_image_with_few_candidates_takes_the_numpy_path_with_the_torch_paths_result(seed, threshold,
                                                                                             monkeypatch):
    import ssd.postprocess as pp

    cfg = PostprocessConfig(score_threshold=threshold, nms_threshold=0.3)
    logits, deltas = random_outputs(1, 6, seed=seed, flat=False)
    logits[..., 0] += 2.5  # 35-48 candidates at 0.3, 1-7 at 0.7
    deltas = deltas * 0.2  # boxes of a class near each other: NMS has work to do
    scores = pp.class_probabilities(logits)
    torch_path = pp.select_detections(scores, clip_boxes(decode(deltas, PRIORS)), cfg)[0]
    taken = []
    real = pp.single_image_cpu
    monkeypatch.setattr(pp, "single_image_cpu", lambda *a: taken.append(1) or real(*a))
    ours = PostProcessor(PRIORS, cfg)(logits, deltas)[0]
    assert taken and 0 < (scores > threshold).sum() <= pp.LEAN_CANDIDATES
    assert ours["labels"].tolist() == torch_path["labels"].tolist()
    assert torch.equal(ours["scores"], torch_path["scores"])  # the same probabilities, not recomputed
    assert_close(ours["boxes"], torch_path["boxes"], atol=1e-6, rtol=0)
    assert (ours["boxes"].dtype, ours["scores"].dtype, ours["labels"].dtype) == (torch.float32, torch.float32,
                                                                                 torch.int64)
    ref = reference(logits, deltas, PRIORS, cfg)[0]
    assert ours["labels"].tolist() == ref["labels"].tolist()


def test_more_candidates_than_the_numpy_path_takes_go_to_the_torch_path():
    import ssd.postprocess as pp

    logits, deltas = random_outputs(1, 6, seed=3, flat=True)
    cfg = PostprocessConfig(score_threshold=0.1)
    scores = pp.class_probabilities(logits)
    assert (scores > 0.1).sum() > pp.LEAN_CANDIDATES
    assert pp.single_image_cpu(scores, deltas, PRIORS, cfg) is None
    ours = PostProcessor(PRIORS, cfg)(logits, deltas)[0]
    ref = reference(logits, deltas, PRIORS, cfg)[0]
    assert ours["labels"].tolist() == ref["labels"].tolist()
