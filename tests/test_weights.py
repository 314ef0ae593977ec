"""Foreign weights: VGG16 fc6/fc7 subsampling, load reports, and parity of converted checkpoints.

No weights can be downloaded here, so each source's state dict is made with its real key
names and shapes (from the installed torchvision models, or written out below for
ssd.pytorch) and random values, converted, and compared with the source's own computation:
torchvision's installed detectors, or an independent functional reference of ssd.pytorch's
SSD300 written from its documented architecture.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.testing import assert_close

from ssd.boxes import cxcywh_to_xyxy
from ssd.model_file import load_model_file, save_model_file
from ssd.models import build_model
from ssd.postprocess import PostprocessConfig, PostProcessor
from ssd.weights.convert import build_converted, convert
from ssd.weights.loading import load_matching
from ssd.weights.vgg16 import CAFFE_VGG, subsample_fc6, subsample_fc7


def randomised(state_dict: dict, seed: int) -> dict:
    """The same keys and shapes, random values of a trained network's scale (BN statistics included)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        shape, leaf = value.shape, key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            t = torch.rand(shape, generator=g) * 1.5 + 0.5
        elif leaf == "running_mean" or leaf == "bias":
            t = torch.randn(shape, generator=g) * 0.1
        elif value.dim() == 1:  # batch-norm and L2Norm scales
            t = (torch.rand(shape, generator=g) + 0.5) * (20.0 if "scale" in key or "L2Norm" in key else 1.0)
        else:
            fan_in = value[0].numel()
            t = torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)  # shrinks with depth: no saturated softmax
        out[key] = t
    return out


# ---------------------------------------------------------------------------------------------
# VGG16 -> SSD300 backbone


def test_fc6_fc7_subsampling_matches_an_independent_indexing():
    g = torch.Generator().manual_seed(0)
    fc6, b6 = torch.randn(4096, 512 * 7 * 7, generator=g), torch.randn(4096, generator=g)
    fc7, b7 = torch.randn(4096, 4096, generator=g), torch.randn(4096, generator=g)
    w6, c6 = subsample_fc6(fc6, b6)
    w7, c7 = subsample_fc7(fc7, b7)
    assert w6.shape == (1024, 512, 3, 3) and w7.shape == (1024, 1024, 1, 1)
    # fc6's input is the pool5 map flattened channel-major: column c*49 + row*7 + col.
    # conv6 output o is fc6 output 4*o; its tap (i, j) is row 3*i, column 3*j.
    for o, c, i, j in [(0, 0, 0, 0), (1023, 511, 2, 2), (17, 300, 1, 2), (512, 5, 2, 0)]:
        assert w6[o, c, i, j] == fc6[4 * o, c * 49 + (3 * i) * 7 + 3 * j]
    assert torch.equal(c6, b6[torch.arange(0, 4096, 4)])
    rows, cols = torch.arange(0, 4096, 4), torch.arange(0, 4096, 4)
    assert torch.equal(w7[:, :, 0, 0], fc7[rows][:, cols])
    assert torch.equal(c7, b7[rows])


def test_torchvision_vgg16_fills_conv6_and_conv7_and_says_so(caplog):
    sd = randomised(torchvision.models.vgg16().state_dict(), seed=1)
    with caplog.at_level(logging.INFO, logger="ssd.weights.loading"):
        model = build_model({"name": "ssd300_vgg16", "num_classes": 3}, backbone_state_dict=sd)
    features = model.backbone.features
    assert torch.equal(features[31].weight, subsample_fc6(sd["classifier.0.weight"], sd["classifier.0.bias"])[0])
    assert torch.equal(features[33].bias, sd["classifier.3.bias"][::4])
    assert torch.equal(features[28].weight, sd["features.28.weight"])
    (record,) = [r for r in caplog.records if r.name == "ssd.weights.loading"]
    assert record.levelno == logging.INFO, record.getMessage()  # only the L2Norm scale starts fresh, by design
    assert "loaded 30 of 31 tensors" in record.getMessage() and "l2norm" in record.getMessage()
    assert model.input_norm.channels == "rgb" and "input_norm" not in model.arch


def test_vgg16_without_its_classifier_warns_that_conv6_and_conv7_start_fresh(caplog):
    sd = {k: v for k, v in torchvision.models.vgg16().state_dict().items() if k.startswith("features.")}
    with caplog.at_level(logging.INFO, logger="ssd.weights.loading"):
        build_model({"name": "ssd300_vgg16", "num_classes": 3}, backbone_state_dict=sd)
    (record,) = [r for r in caplog.records if r.name == "ssd.weights.loading"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "loaded 26 of 31 tensors" in message and "conv6 (features.31), conv7 (features.33) (not in the source)" in message


def test_ssd_pytorch_reduced_fc_loads_with_caffe_input_convention(tmp_path):
    own = build_model({"name": "ssd300_vgg16", "num_classes": 3}).backbone.state_dict()
    reduced = {k.removeprefix("features."): v for k, v in randomised(own, 2).items() if k.startswith("features.")}
    assert sorted({int(k.split(".")[0]) for k in reduced}) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33]
    model = build_model({"name": "ssd300_vgg16", "num_classes": 3}, backbone_state_dict=reduced).eval()
    assert model.input_norm == CAFFE_VGG and model.arch["input_norm"]["channels"] == "bgr"
    assert torch.equal(model.backbone.features[31].weight, reduced["31.weight"])
    # The backbone sees BGR 0..255 minus the Caffe mean, and that survives a model file.
    images = torch.rand(2, 3, 300, 300)
    caffe = images.flip(1) * 255 - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    assert_close(model.normalize(images), caffe, rtol=1e-5, atol=1e-4)
    save_model_file(tmp_path / "m.pt", model, ["a", "b"])
    loaded, info = load_model_file(tmp_path / "m.pt")
    assert info["input_norm"] == CAFFE_VGG.to_dict() and loaded.input_norm == CAFFE_VGG
    assert_close(loaded(images)[0], model(images)[0])


def test_backbone_weights_of_another_width_are_an_error():
    sd = torchvision.models.mobilenet_v2(width_mult=0.5).state_dict()
    with pytest.raises(ValueError, match=r"weight features\.0\.0\.weight: shape \(16, 3, 3, 3\) does not match"):
        build_model({"name": "ssdlite_mobilenet_v2", "num_classes": 3}, backbone_state_dict=sd)


# ---------------------------------------------------------------------------------------------
# Load reports


def test_load_report_counts_and_names_fresh_layers_with_reasons():
    target = build_model({"name": "ssdlite_mobilenet_v2", "num_classes": 4, "width_mult": 0.25, "image_size": 64})
    source = build_model({"name": "ssdlite_mobilenet_v2", "num_classes": 7, "width_mult": 0.25, "image_size": 64})
    state = source.state_dict()
    state.pop("extras.0.0.weight")
    state["not.a.layer"] = torch.zeros(1)
    report = load_matching(target, state, "coco.pt")
    heads = {f"head.{kind}.{k}.3" for kind in ("cls_layers",) for k in range(6)}
    assert set(report.fresh) == heads | {"extras.0.0"}
    assert report.fresh["extras.0.0"] == "not in the source"
    assert report.fresh["head.cls_layers.0.3"] == "another shape in the source"
    total = sum(1 for k in target.state_dict() if not k.endswith("num_batches_tracked") and k not in ("priors", "mean", "std"))
    assert report.total == total and len(report.loaded) == total - 12 - 1
    assert report.unused == ["not.a.layer"]
    assert torch.equal(target.head.box_layers[0][3].weight, source.head.box_layers[0][3].weight)
    assert "loaded" in report.summary() and "another shape in the source" in report.summary()


# ---------------------------------------------------------------------------------------------
# ssd.pytorch SSD300: an independent reference of its forward pass and priors

#: ssd.pytorch's VGG16 'D' list ('C': the ceil-mode pool3); then pool5 3x3/1, conv6 dilated, conv7.
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]
MBOX = [4, 6, 6, 6, 4, 4]
SOURCE_CHANNELS = [512, 1024, 512, 256, 256, 256]
EXTRAS = [(1024, 256, 1), (256, 512, 3), (512, 128, 1), (128, 256, 3), (256, 128, 1), (128, 256, 3), (256, 128, 1), (128, 256, 3)]


def ssd_pytorch_state_dict(num_classes: int, seed: int) -> dict:
    shapes = {}
    i, cin = 0, 3
    for v in VGG_CFG:
        if v in ("M", "C"):
            i += 1
            continue
        shapes[f"vgg.{i}.weight"], shapes[f"vgg.{i}.bias"] = (v, cin, 3, 3), (v,)
        cin, i = v, i + 2
    shapes.update({"vgg.31.weight": (1024, 512, 3, 3), "vgg.31.bias": (1024,),
                   "vgg.33.weight": (1024, 1024, 1, 1), "vgg.33.bias": (1024,), "L2Norm.weight": (512,)})
    for k, (cin, cout, ks) in enumerate(EXTRAS):
        shapes[f"extras.{k}.weight"], shapes[f"extras.{k}.bias"] = (cout, cin, ks, ks), (cout,)
    for k, (c, a) in enumerate(zip(SOURCE_CHANNELS, MBOX)):
        shapes[f"loc.{k}.weight"], shapes[f"loc.{k}.bias"] = (a * 4, c, 3, 3), (a * 4,)
        shapes[f"conf.{k}.weight"], shapes[f"conf.{k}.bias"] = (a * num_classes, c, 3, 3), (a * num_classes,)
    return randomised({k: torch.empty(s) for k, s in shapes.items()}, seed)


def ssd_pytorch_forward(sd: dict, x: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD300 as ssd.pytorch documents it, on its own input (RGB 0..255 minus (123, 117, 104))."""
    sources, i = [], 0
    for v in VGG_CFG:
        if v in ("M", "C"):
            x = F.max_pool2d(x, 2, 2, ceil_mode=v == "C")
            i += 1
            continue
        x = F.relu(F.conv2d(x, sd[f"vgg.{i}.weight"], sd[f"vgg.{i}.bias"], padding=1))
        i += 2
        if i == 23:  # after conv4_3's ReLU: L2-normalised source
            norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
            sources.append(x / norm * sd["L2Norm.weight"].view(1, -1, 1, 1))
    x = F.max_pool2d(x, 3, 1, 1)
    x = F.relu(F.conv2d(x, sd["vgg.31.weight"], sd["vgg.31.bias"], padding=6, dilation=6))
    x = F.relu(F.conv2d(x, sd["vgg.33.weight"], sd["vgg.33.bias"]))
    sources.append(x)
    for k in range(8):  # odd extras halve (1, 3) or shrink (5, 7) the map and are sources
        stride, pad = (2, 1) if k in (1, 3) else (1, 0)
        x = F.relu(F.conv2d(x, sd[f"extras.{k}.weight"], sd[f"extras.{k}.bias"], stride=stride, padding=pad))
        if k % 2:
            sources.append(x)
    return reference_heads(sd, sources, num_classes)


def reference_heads(sd: dict, sources: list, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both projects' heads: a 3x3 convolution per source (``conf.k``, ``loc.k``), flattened row, column, prior."""
    b = sources[0].shape[0]

    def flat(kind: str) -> torch.Tensor:
        return torch.cat([F.conv2d(s, sd[f"{kind}.{k}.weight"], sd[f"{kind}.{k}.bias"], padding=1)
                          .permute(0, 2, 3, 1).reshape(b, -1) for k, s in enumerate(sources)], dim=1)

    return flat("conf").view(b, -1, num_classes), flat("loc").view(b, -1, 4)


def ssd_pytorch_priors() -> torch.Tensor:
    """ssd.pytorch's VOC PriorBox, written out: row, column, then min, sqrt(min*max), ratio pairs."""
    maps, steps = [38, 19, 10, 5, 3, 1], [8, 16, 32, 64, 100, 300]
    mins, maxs = [30, 60, 111, 162, 213, 264], [60, 111, 162, 213, 264, 315]
    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    out = []
    for k, f in enumerate(maps):
        fk = 300 / steps[k]
        for i in range(f):
            for j in range(f):
                cx, cy = (j + 0.5) / fk, (i + 0.5) / fk
                s = mins[k] / 300
                s2 = math.sqrt(s * maxs[k] / 300)
                out += [[cx, cy, s, s], [cx, cy, s2, s2]]
                for r in ratios[k]:
                    out += [[cx, cy, s * math.sqrt(r), s / math.sqrt(r)], [cx, cy, s / math.sqrt(r), s * math.sqrt(r)]]
    return torch.tensor(out).clamp(0, 1)


def test_ssd_pytorch_checkpoint_matches_its_reference_forward_and_priors():
    sd = ssd_pytorch_state_dict(num_classes=21, seed=3)
    converted = convert(sd)
    assert converted.source == "ssd.pytorch SSD300" and converted.class_names[0] == "aeroplane"
    model = build_converted(converted)
    assert_close(model.priors, ssd_pytorch_priors(), rtol=0, atol=1e-6)
    images = torch.rand(2, 3, 300, 300)
    theirs = images * 255 - torch.tensor([123.0, 117.0, 104.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref_conf, ref_loc = ssd_pytorch_forward(sd, theirs, 21)
        conf, loc = model(images)
    for ours, ref in ((conf, ref_conf), (loc, ref_loc)):
        assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------
# torchvision's COCO detectors


#: builder, source name, and a gain on the class layers' weights: SSDLite's batch norms keep its
#: random logits near 0, all 90 classes near 1/91, so spread them for scores above the threshold.
TORCHVISION = {
    "ssd300": (torchvision.models.detection.ssd300_vgg16, "torchvision ssd300_vgg16", 1.0),
    "ssdlite320": (torchvision.models.detection.ssdlite320_mobilenet_v3_large,
                   "torchvision ssdlite320_mobilenet_v3_large", 10.0),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_detector_detections_match_after_conversion(name):
    builder, source, gain = TORCHVISION[name]
    theirs = builder(weights=None, weights_backbone=None, num_classes=91).eval()
    sd = randomised(theirs.state_dict(), seed=4)
    sd = {k: v * gain if k.startswith("head.classification_head") and k.endswith("weight") and v.dim() == 4
          and v.shape[1] != 1 else v for k, v in sd.items()}
    theirs.load_state_dict(sd)
    theirs.score_thresh = 0.05
    converted = convert(sd)
    assert converted.source == source and len(converted.class_names) == 90
    model = build_converted(converted)
    size = model.image_size
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 240, 360, generator=g), torch.rand(3, 333, 250, generator=g)]
    post = PostProcessor(model.priors, PostprocessConfig(score_threshold=0.05, top_k=theirs.topk_candidates,
                                                         nms_threshold=theirs.nms_thresh,
                                                         max_detections=theirs.detections_per_img))
    with torch.no_grad():
        expected = theirs(images)
        # torchvision resizes bilinearly to the fixed input size; the same resize for ours.
        batch = torch.cat([F.interpolate(im[None], size=(size, size), mode="bilinear", align_corners=False)
                           for im in images])
        detections = post(*model(batch))
    for image, exp, det in zip(images, expected, detections):
        h, w = image.shape[1:]
        assert len(exp["boxes"]) > 20 and len(det["boxes"]) == len(exp["boxes"])
        assert unmatched(exp, {**det, "boxes": det["boxes"] * torch.tensor([w, h, w, h])}) == []


def unmatched(expected: dict, got: dict, box_tol: float = 1e-3, score_tol: float = 1e-5) -> list[int]:
    """Expected detections with no detection of the same label, score within ``score_tol`` and box
    within ``box_tol`` px among ``got`` (each used once). Order is not compared: two scores a float
    rounding apart may come out in either order."""
    free = torch.ones(len(got["labels"]), dtype=torch.bool)
    missing = []
    for i in range(len(expected["labels"])):
        ok = (free & (got["labels"] == expected["labels"][i])
              & ((got["scores"] - expected["scores"][i]).abs() <= score_tol)
              & ((got["boxes"] - expected["boxes"][i]).abs().amax(dim=1) <= box_tol))
        if ok.any():
            free[ok.nonzero()[0]] = False
        else:
            missing.append(i)
    return missing


def test_torchvision_priors_are_its_default_boxes():
    theirs = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
    model = build_converted(convert(theirs.state_dict()))
    maps = [torch.zeros(1, 1, f, f) for f in (38, 19, 10, 5, 3, 1)]
    image_list = torchvision.models.detection.image_list.ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)])
    anchors = theirs.anchor_generator(image_list, maps)[0]
    assert_close(cxcywh_to_xyxy(model.priors) * 300, anchors, rtol=0, atol=1e-4)
    assert float(model.priors[:, 0].max()) > 1.0  # centres past the edge stay, as torchvision's do


# ---------------------------------------------------------------------------------------------
# Errors


def test_conversion_errors_name_the_keys_and_the_formats():
    with pytest.raises(ValueError, match=r"no known format has keys like conv1\.weight.*ssd\.pytorch: ssd\.pytorch SSD300"):
        convert({"conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown format .yolo.; known formats: ssd\.pytorch, ssds\.pytorch, torchvision-ssd300"):
        convert({"a": torch.zeros(1)}, "yolo")
    sd = ssd_pytorch_state_dict(21, 0)
    sd["extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 keys are not part of an ssd\.pytorch SSD300: extra_head\.weight"):
        convert(sd)
    sd = ssd_pytorch_state_dict(21, 0)
    del sd["vgg.33.bias"]
    with pytest.raises(ValueError, match=r"ssd\.pytorch SSD300: 1 tensors missing: backbone\.features\.33\.bias"):
        build_converted(convert(sd))
    sd = {f"module.{k}": v for k, v in ssd_pytorch_state_dict(21, 0).items()}  # DataParallel prefix
    assert convert(sd).arch["num_classes"] == 21


# ---------------------------------------------------------------------------------------------
# ssds.pytorch SSDLite-MobileNetV2 (v0.3.1): an independent reference of its forward pass and priors

SSDS_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
SSDS_EXTRAS = [(320, 512), (512, 256), (256, 256), (256, 128)]
SSDS_SOURCES, SSDS_MBOX = [96, 320, 512, 256, 256, 128], [6, 6, 6, 6, 4, 4]


def ssds_state_dict(num_classes: int, seed: int) -> dict:
    shapes: dict[str, tuple] = {}

    def conv_bn(prefix: str, conv: int, shape: tuple) -> None:
        shapes[f"{prefix}.{conv}.weight"] = shape
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{conv + 1}.{leaf}"] = (shape[0],)

    conv_bn("base.0.conv", 0, (32, 3, 3, 3))
    cin, n = 32, 1
    for t, c, reps, _ in SSDS_STAGES:
        for _ in range(reps):
            mid = cin * t
            conv_bn(f"base.{n}.conv", 0, (mid, cin, 1, 1))
            conv_bn(f"base.{n}.conv", 3, (mid, 1, 3, 3))
            conv_bn(f"base.{n}.conv", 6, (c, mid, 1, 1))
            cin, n = c, n + 1
    shapes["norm.weight"] = (96,)
    for k, (cin, cout) in enumerate(SSDS_EXTRAS):
        conv_bn(f"extras.{k}", 0, (cout, cin, 1, 1))
        conv_bn(f"extras.{k}", 3, (cout, 1, 3, 3))
        conv_bn(f"extras.{k}", 6, (cout, cout, 1, 1))
    for k, (c, a) in enumerate(zip(SSDS_SOURCES, SSDS_MBOX)):
        shapes[f"loc.{k}.weight"], shapes[f"loc.{k}.bias"] = (a * 4, c, 3, 3), (a * 4,)
        shapes[f"conf.{k}.weight"], shapes[f"conf.{k}.bias"] = (a * num_classes, c, 3, 3), (a * num_classes,)
    return randomised({k: torch.empty(s) for k, s in shapes.items()}, seed)


def ssds_forward(sd: dict, x: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ssds.pytorch's SSDLite-MobileNetV2, on its own input (BGR 0..255 minus (103.94, 116.78, 123.68))."""

    def cbn(x, prefix, conv, stride=1, groups=1, act=F.relu6):
        w = sd[f"{prefix}.{conv}.weight"]
        x = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)
        bn = f"{prefix}.{conv + 1}"
        x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                         training=False, eps=1e-5)
        return act(x) if act else x

    x = cbn(x, "base.0.conv", 0, stride=2, act=F.relu)
    sources, n, cin = [], 1, 32
    for t, c, reps, s in SSDS_STAGES:
        for i in range(reps):
            stride = s if i == 0 else 1
            p = f"base.{n}.conv"
            h = cbn(x, p, 0)
            h = cbn(h, p, 3, stride=stride, groups=h.shape[1])
            h = cbn(h, p, 6, act=None)
            x = x + h if stride == 1 and cin == c else h
            if n == 13:
                sources.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) * sd["norm.weight"].view(1, -1, 1, 1))
            cin, n = c, n + 1
    sources.append(x)
    for k in range(4):
        x = cbn(x, f"extras.{k}", 0)
        x = cbn(x, f"extras.{k}", 3, stride=2, groups=x.shape[1])
        x = F.relu(cbn(x, f"extras.{k}", 6, act=None))
        sources.append(x)
    return reference_heads(sd, sources, num_classes)


def ssds_priors() -> torch.Tensor:
    """ssds.pytorch's PriorBox for this model: ratio 1 gives the min square and the sqrt(s_k * s_k+1) one."""
    maps, steps = [19, 10, 5, 3, 2, 1], [16, 32, 64, 100, 150, 300]
    sizes = [45, 90, 135, 180, 225, 270, 315]
    ratios = [[1, 2, 3]] * 4 + [[1, 2]] * 2
    out = []
    for k, f in enumerate(maps):
        for i in range(f):
            for j in range(f):
                cx, cy = j * steps[k] / 300 + steps[k] / 600, i * steps[k] / 300 + steps[k] / 600
                s = sizes[k] / 300
                for r in ratios[k]:
                    if r == 1:
                        s2 = math.sqrt(s * sizes[k + 1] / 300)
                        out += [[cx, cy, s, s], [cx, cy, s2, s2]]
                    else:
                        out += [[cx, cy, s * math.sqrt(r), s / math.sqrt(r)], [cx, cy, s / math.sqrt(r), s * math.sqrt(r)]]
    return torch.tensor(out).clamp(0, 1)


def test_ssds_pytorch_checkpoint_matches_its_reference_forward_and_priors():
    sd = ssds_state_dict(num_classes=21, seed=6)
    converted = convert(sd)
    assert converted.source == "ssds.pytorch SSDLite-MobileNetV2" and converted.class_names[-1] == "tvmonitor"
    model = build_converted(converted)
    assert_close(model.priors, ssds_priors(), rtol=0, atol=1e-6)
    images = torch.rand(2, 3, 300, 300)
    theirs = images.flip(1) * 255 - torch.tensor([103.94, 116.78, 123.68]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref_conf, ref_loc = ssds_forward(sd, theirs, 21)
        conf, loc = model(images)
    for ours, ref in ((conf, ref_conf), (loc, ref_loc)):
        assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
