"""The deployed detector: batch norm folded, simplified and int8 ONNX graphs, run by ONNX Runtime in
the evaluation with the PyTorch model's pre- and post-processing; the deploy stage that writes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from torch import nn
from torchvision.ops import box_iou

from pipeline.datasets import read_manifest
from shardgen import CLASSES, write_clip_dataset, write_frame_dataset
from ssd.data.calibration import calibration_frames, pick
from ssd.data.loader import eval_loader
from ssd.errors import InputError
from ssd.export import deployable_onnx, onnx_bytes, save_onnx
from ssd.fold import fold_batchnorm
from ssd.model_file import load_model_file, save_model_file
from ssd.models import lstm_ssd_mobilenet_v2, ssdlite_mobilenet_v2
from ssd.onnx_detector import load_detection_graph, load_detector, load_onnx_detector
from ssd.postprocess import PostprocessConfig, PostProcessor
from ssd.pruning import PruneConfig, prune_model
from ssd.quantize import leading_nodes, quantize_int8
from test_evaluate import train_on
from test_export import randomise

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-4, rtol=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    return write_frame_dataset(tmp_path_factory.mktemp("data") / "voc", {"train": [12], "val": [6, 4]})


@pytest.fixture(scope="module")
def trained(frames, tmp_path_factory) -> Path:
    """A tiny SSDLite fitted to the sample's validation images: detections worth comparing."""
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_model_file(path, train_on(read_manifest(frames).shard_paths("val"), steps=80), CLASSES)
    return path


def lstm_model() -> nn.Module:
    torch.manual_seed(0)
    return randomise(lstm_ssd_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25, image_size=48), 1)


def calibration(shards: Path, image_size: int, count: int = 12):
    kind = "frames" if read_manifest(shards).kind == "frames" else "frames_from_clips"
    return calibration_frames(read_manifest(shards).shard_paths("train"), image_size=image_size, kind=kind,
                              count=count, run_length=4)


# ---------------------------------------------------------------------------------------------
# Batch norm folding


@pytest.mark.parametrize("kind", ["ssdlite", "pruned", "lstm"])
def test_folded_model_equals_unfolded(kind):
    torch.manual_seed(0)
    if kind == "lstm":
        model = lstm_model()
    else:
        model = randomise(ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), 0)
        if kind == "pruned":
            prune_model(model, PruneConfig(ratio=0.5))  # in place
            model = randomise(model, 2)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    result = fold_batchnorm(model)
    assert (result.folded, result.kept) == (norms, 0) and norms > 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == norms  # the original is untouched
    images = torch.rand(3, 4, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if kind == "lstm":  # streamed: the state of each frame feeds the next
            state = folded_state = None
            for frame in images:
                logits, deltas, state = model(frame, state=state)
                f_logits, f_deltas, folded_state = result.model(frame, state=folded_state)
                torch.testing.assert_close(f_logits, logits, **TOL)
                torch.testing.assert_close(f_deltas, deltas, **TOL)
        else:
            for expected, got in zip(model(images[0]), result.model(images[0])):
                assert expected.abs().max() > 0.5  # outputs of order 1: the tolerance means something
                torch.testing.assert_close(got, expected, **TOL)


def test_a_batch_norm_after_something_else_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    randomise(model, 0)
    result = fold_batchnorm(model)
    assert (result.folded, result.kept) == (1, 1)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(result.model(x), model(x), **TOL)


# ---------------------------------------------------------------------------------------------
# The deployable graph and its int8 twin


def test_deployable_graph_is_folded_simplified_and_equal(tmp_path):
    model = randomise(ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), 0)
    plain = onnx.load_from_string(onnx_bytes(model))
    deployed = onnx.load_from_string(deployable_onnx(model, metadata={"class_names": ["a", "b"]}))
    ops = [n.op_type for n in deployed.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Constant") <= 2
    assert len(deployed.graph.node) < 0.6 * len(plain.graph.node)  # 469 -> 234 nodes
    meta = {p.key: p.value for p in deployed.metadata_props}
    assert json.loads(meta["model_arch"]) == model.arch and meta["folded_batchnorm"] == "true"
    assert not [k for k in meta if k.startswith("onnxsim")]
    assert {v.type.tensor_type.shape.dim[0].dim_param for v in [*deployed.graph.input, *deployed.graph.output]} == {"batch"}
    save_onnx(tmp_path / "m.onnx", deployed.SerializeToString())
    detector, info = load_onnx_detector(tmp_path / "m.onnx")
    assert info["class_names"] == ["a", "b"]
    torch.testing.assert_close(detector.priors, model.priors)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        for got, expected in zip(detector(images), model(images)):
            torch.testing.assert_close(got, expected, **TOL)


def matched_share(reference: list[dict], other: list[dict]) -> float:
    """Share of ``reference``'s detections with a detection of ``other`` of the same class at IoU >= 0.5."""
    hits = total = 0
    for r, o in zip(reference, other):
        total += len(r["labels"])
        if len(r["labels"]) and len(o["labels"]):
            same = r["labels"][:, None] == o["labels"][None, :]
            hits += int(((box_iou(r["boxes"], o["boxes"]) >= 0.5) & same).any(dim=1).sum())
    return hits / max(total, 1)


def test_int8_detections_overlap_the_float_ones(frames, trained, tmp_path):
    """The int8 graph finds what the float one finds. Quantized as the deploy stage does it (the
    first three convolutions in float), a float detection (score >= 0.3) counts as found if an int8
    one of the same class overlaps it at IoU >= 0.5 with a score of at least half the threshold:
    int8 lowers the scores of this tiny, overconfident model (0.99 -> 0.5), so one threshold for
    both would count scores crossing it, not boxes lost. Measured on this test's model trained
    from six seeds: 73-93% of the 14-15 float detections; 60% is asked. The figure depends on the
    machine's float rounding: this test's old form (whole graph int8, one threshold) gave 93% on
    one host and 73% on another for the same seed. (On the sample's SSDLite the int8 graph's
    VOC07 mAP is the float one's to 0.1 point: docs/deployment.md.)"""
    model, info = load_model_file(trained)
    data = deployable_onnx(model, metadata={"class_names": info["class_names"]})
    quantized, report = quantize_int8(data, calibration(frames, 64), exclude=leading_nodes(data, 3))
    assert report["calibration_frames"] == 12 and "Conv" in report["quantized_ops"]
    graph = onnx.load_from_string(quantized).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*graph.input, *graph.output])
    save_onnx(tmp_path / "f.onnx", data)
    save_onnx(tmp_path / "q.onnx", quantized)
    fp32, q8 = load_onnx_detector(tmp_path / "f.onnx")[0], load_onnx_detector(tmp_path / "q.onnx")[0]
    post = PostProcessor(model.priors, PostprocessConfig(score_threshold=0.3))
    post_int8 = PostProcessor(model.priors, PostprocessConfig(score_threshold=0.15))
    batch = next(iter(eval_loader(read_manifest(frames).shard_paths("val"), image_size=64, rank=0, world_size=1,
                                  batch_size=10, num_workers=0)))
    ref, got = post(*fp32(batch.images)), post_int8(*q8(batch.images))
    share = matched_share(ref, got)
    print(f"int8 matches {share:.0%} of {sum(len(r['labels']) for r in ref)} float detections")
    assert sum(len(r["labels"]) for r in ref) >= 10
    assert share >= 0.6


def test_lstm_int8_streams_with_its_state(tmp_path):
    shards = write_clip_dataset(tmp_path / "ir", {"train": [8, 8, 8]}, clip_length=4, size=48)
    model = lstm_model()
    data = deployable_onnx(model)
    quantized, report = quantize_int8(data, calibration(shards, 48))
    assert report["calibration_frames"] == 12
    save_onnx(tmp_path / "f.onnx", data)
    save_onnx(tmp_path / "q.onnx", quantized)
    graph = onnx.load_from_string(quantized).graph
    n = len(model.init_state(1))
    assert [v.name for v in graph.input] == ["images", *[f"state_{i}" for i in range(n)]]
    assert [v.name for v in graph.output][2:] == [f"new_state_{i}" for i in range(n)]
    fp32, q8 = load_onnx_detector(tmp_path / "f.onnx")[0], load_onnx_detector(tmp_path / "q.onnx")[0]
    assert q8.is_temporal and len(q8.init_state(2)) == n
    frames = torch.rand(6, 2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    state = q_state = None
    for frame in frames:
        logits, _, state = fp32(frame, state)
        q_logits, _, q_state = q8(frame, q_state)
    spread = float(logits.std())
    assert float((q_logits - logits).abs().mean()) < 0.2 * spread  # measured: about 0.05 of the spread
    fresh = q8(frames[-1])[0]  # the same frame from a zero state
    assert float((fresh - q_logits).abs().max()) > 0.05  # the state streamed through the int8 graph matters


def test_lstm_int8_cell_state_keeps_its_own_range(tmp_path):
    """The cell state ``c`` is a graph output and the input of ``relu6(c)``. ONNX Runtime's
    quantizer gives the input of a Clip the Clip's range when nothing else reads it, and it does
    not count graph outputs as readers: the int8 graph's ``c`` came out clipped at 6 (the float
    graph's reached 108 on a 48-frame sample video), so every frame after carried another state."""
    shards = write_clip_dataset(tmp_path / "ir", {"train": [8, 8, 8]}, clip_length=4, size=48)
    model = lstm_model()
    [cell] = model.temporal.values()
    hidden = cell.hidden_channels
    with torch.no_grad():  # gates i, f, o open, g = relu6(10) = 6: c grows by 6 every frame
        cell.gates[-1].weight.zero_()
        cell.gates[-1].bias.copy_(torch.tensor([8.0, 8.0, 10.0, 8.0]).repeat_interleave(hidden))
    data = deployable_onnx(model)
    quantized, _ = quantize_int8(data, calibration(shards, 48))
    save_onnx(tmp_path / "f.onnx", data)
    save_onnx(tmp_path / "q.onnx", quantized)
    fp32, q8 = load_onnx_detector(tmp_path / "f.onnx")[0], load_onnx_detector(tmp_path / "q.onnx")[0]
    frames = torch.rand(4, 1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    state = q_state = None
    for frame in frames:
        _, _, state = fp32(frame, state)
        _, _, q_state = q8(frame, q_state)
    c, q_c = state[1], q_state[1]  # (h, c) of the one cell
    assert float(c.max()) == pytest.approx(24.0, abs=0.1)  # 4 frames x 6
    assert float((q_c - c).abs().max()) < 0.5  # the calibrated range (0 to 24) in 255 steps, not 0 to 6


def test_calibration_picks_spread_frames_and_whole_runs(tmp_path):
    entries = [type("E", (), {"sort_key": (f"v{v}", f)})() for v in range(5) for f in range(10)]
    runs = pick(entries, "frames_from_clips", count=12, run_length=4)
    # Three runs of four, from videos 0, 1 and 3 of five (evenly spread), each starting a sequence.
    assert [i for i, _ in runs] == [0, 1, 2, 3, 10, 11, 12, 13, 30, 31, 32, 33]
    assert [s for _, s in runs] == [True, False, False, False] * 3
    many = pick(entries, "frames_from_clips", count=40, run_length=4)  # more runs than videos: further in
    assert len(many) == 40 and len({i for i, _ in many}) == 40
    # Runs cut short by a video's end are made up from other videos: the count is met while the
    # split has the frames (it gave 768 of 1000, and 104 of 128, without a word).
    short = [type("E", (), {"sort_key": (f"v{v:02d}", f)})() for v in range(27) for f in range(48)]
    assert len(pick(short, "frames_from_clips", count=1000, run_length=64)) == 1000
    mixed = [type("E", (), {"sort_key": (f"v{v}", f)})() for v in range(8) for f in range(500 if v % 2 else 10)]
    for count in (128, 256):
        got = pick(mixed, "frames_from_clips", count=count, run_length=64)
        assert len(got) == count and len({i for i, _ in got}) == count
        for (i, starts), (j, _) in zip(got, got[1:] + [(None, True)]):  # within a run: the next frame
            if j is not None and not dict(got)[j]:
                assert mixed[j].sort_key == (mixed[i].sort_key[0], mixed[i].sort_key[1] + 1)
    assert len(pick(mixed, "frames_from_clips", count=5000, run_length=64)) == 4 * 510  # the whole split
    spread = pick(list(range(100)), "frames", count=5, run_length=4)
    assert [i for i, _ in spread] == [0, 25, 50, 74, 99] and all(s for _, s in spread)


def test_onnx_loading_errors_are_one_line(tmp_path, trained):
    with pytest.raises(InputError, match="no such ONNX file"):
        load_onnx_detector(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(InputError, match=r"bad.onnx: not a graph onnxruntime can load") as e:
        load_onnx_detector(tmp_path / "bad.onnx")
    assert "\n" not in str(e.value)
    model, _ = load_model_file(trained)
    save_onnx(tmp_path / "decoded.onnx", deployable_onnx(model, decoded=True))
    with pytest.raises(InputError, match="raw outputs"):
        load_onnx_detector(tmp_path / "decoded.onnx")
    save_onnx(tmp_path / "old.onnx", _without_arch(onnx_bytes(model)))
    with pytest.raises(InputError, match="no model_arch"):
        load_detector(tmp_path / "old.onnx")


def _without_arch(data: bytes) -> bytes:
    proto = onnx.load_from_string(data)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "model_arch"]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


# ---------------------------------------------------------------------------------------------
# The stages: deploy, and evaluate on a graph


def run_stage(module: str, root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def deployed(frames, trained, tmp_path_factory) -> Path:
    """A project where the deploy stage wrote a frame model's and an LSTM-SSD's graphs."""
    root = tmp_path_factory.mktemp("project")
    clips = write_clip_dataset(root / "data" / "ir", {"train": [8, 8], "val": [8]}, clip_length=4, size=48)
    (root / "models").mkdir()
    (root / "models" / "tiny.pt").write_bytes(trained.read_bytes())
    save_model_file(root / "models" / "lstm.pt", lstm_model(), CLASSES)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    deploy = {**params["deploy"], "models": [{"file": "models/tiny.pt", "shards": str(frames)},
                                             {"file": "models/lstm.pt", "shards": str(clips)}]}
    deploy["int8"] = {**deploy["int8"], "frames": 12, "run_length": 4}
    evaluate = {**params["evaluate"], "shards": str(frames), "batch_size": 5, "num_workers": 0, "examples": 0}
    (root / "params.yaml").write_text(yaml.safe_dump({"deploy": deploy, "evaluate": evaluate}))
    result = run_stage("pipeline.deploy", root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_deploy_stage_writes_both_graphs_and_metrics(deployed):
    files = sorted(p.name for p in (deployed / "models" / "deploy").iterdir())
    assert files == [f"{stem}{variant}.onnx" for stem in ("lstm", "tiny")
                     for variant in ("-detect", "-int8-detect", "-int8", "")]
    metrics = json.loads((deployed / "metrics" / "deploy.json").read_text())["models"]
    assert metrics["tiny"]["float"]["max_difference"] <= 1e-4
    assert metrics["lstm"]["int8"]["calibration"]["calibration_frames"] == 12
    assert metrics["tiny"]["int8"]["nodes"] > metrics["tiny"]["float"]["nodes"]  # the Q/DQ pairs
    first = yaml.safe_load((deployed / "params.yaml").read_text())["deploy"]["int8"]["float_first"]
    assert first == 3
    for stem in ("tiny", "lstm"):
        _, info = load_onnx_detector(deployed / "models" / "deploy" / f"{stem}-int8.onnx")
        assert info["class_names"] == CLASSES and info["quantization"]["method"] == "minmax"
        # The first convolutions run in float: no DequantizeLinear feeds them; the next ones are int8.
        graph = onnx.load(str(deployed / "models" / "deploy" / f"{stem}-int8.onnx")).graph
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        fed = [bool(dequantized & set(n.input[:1])) for n in convs]
        assert fed[:first] == [False] * first and all(fed[first:first + 3]), fed[:8]
        float_convs = {n.name for n in onnx.load(str(deployed / "models" / "deploy" / f"{stem}.onnx")).graph.node
                       if n.op_type == "Conv"}
        assert len(float_convs & set(info["quantization"]["excluded_nodes"])) == first


def test_deployed_int8_detector_graph_detects_as_the_int8_graph_and_the_postprocessor(deployed, frames):
    # The file a deployer runs: the int8 graph with deploy.detect's thresholds inside.
    graph, info = load_detection_graph(deployed / "models" / "deploy" / "tiny-int8-detect.onnx")
    raw, _ = load_onnx_detector(deployed / "models" / "deploy" / "tiny-int8.onnx")
    detect = yaml.safe_load((deployed / "params.yaml").read_text())["deploy"]["detect"]
    assert info["postprocess"]["score_threshold"] == detect["score_threshold"] and not graph.is_temporal
    post = PostProcessor(raw.priors, PostprocessConfig(score_threshold=detect["score_threshold"],
                                                       nms_threshold=detect["nms_threshold"]))
    batch = next(iter(eval_loader(read_manifest(frames).shard_paths("val"), image_size=64, rank=0, world_size=1,
                                  batch_size=10, num_workers=0)))
    expected = post(*raw(batch.images))
    got = graph.per_image(graph.run(batch.images)[0], 10)
    assert sum(len(e["labels"]) for e in expected) >= 10
    for g, e in zip(got, expected):
        assert g["labels"].tolist() == e["labels"].tolist()
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-6, rtol=0)
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-6, rtol=0)


def evaluate(root: Path, model: str, name: str) -> dict:
    result = run_stage("pipeline.evaluate", root, "--set", f"model={model}", "--set", f"name={name}")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / "metrics" / f"eval-{name}.json").read_text())


def test_onnx_evaluation_equals_the_pytorch_one(deployed):
    """The float graph through ONNX Runtime, with the evaluation's own loader and post-processing, gives
    the PyTorch model's figures (to 1e-3 mAP; measured: equal to 1e-6); the int8 graph runs the same way."""
    torch_metrics = evaluate(deployed, "models/tiny.pt", "tiny")
    onnx_metrics = evaluate(deployed, "models/deploy/tiny.onnx", "tiny-onnx")
    int8_metrics = evaluate(deployed, "models/deploy/tiny-int8.onnx", "tiny-int8")
    assert torch_metrics["voc07"]["map"] > 0.3
    for key in ("voc07", "voc2010"):
        assert onnx_metrics[key]["map"] == pytest.approx(torch_metrics[key]["map"], abs=1e-3)
        for cls, ap in torch_metrics[key]["ap"].items():
            assert onnx_metrics[key]["ap"][cls] == pytest.approx(ap, abs=1e-3)
    assert onnx_metrics["detections"] == torch_metrics["detections"]
    print("VOC07 mAP: torch", torch_metrics["voc07"]["map"], "onnx", onnx_metrics["voc07"]["map"],
          "int8", int8_metrics["voc07"]["map"])
    assert int8_metrics["voc07"]["map"] > 0.5 * torch_metrics["voc07"]["map"]


@pytest.mark.parametrize("int8", ["true", "false"])  # the classes were checked only for calibrating
def test_deploy_refuses_shards_of_other_classes_and_keeps_the_old_output(deployed, tmp_path, int8):
    other = write_frame_dataset(tmp_path / "other", {"train": [4]})
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["classes"] = ["cat", "dog"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    before = sorted((deployed / "models" / "deploy").iterdir())
    result = run_stage("pipeline.deploy", deployed, "--set", f"models=[{{file: models/tiny.pt, shards: {other}}}]",
                       "--set", f"int8.enabled={int8}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "classes" in lines[0] and "Traceback" not in result.stderr
    assert sorted((deployed / "models" / "deploy").iterdir()) == before


def test_deploy_refuses_frame_shards_for_an_lstm_and_graph_names_that_collide(deployed, frames):
    """An LSTM-SSD calibrated on frame shards got its state's ranges from zero states only (a
    clipped int8 cell), and a model named `tiny-detect` replaced `tiny`'s detector graph; both
    exited 0."""
    before = sorted((deployed / "models" / "deploy").iterdir())
    result = run_stage("pipeline.deploy", deployed, "--set", f"models=[{{file: models/lstm.pt, shards: {frames}}}]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {frames / 'manifest.json'}: frames shards; an LSTM-SSD's int8 graph is calibrated on clip shards, "
        "whose runs of consecutive frames give its state the ranges of a real stream")
    (deployed / "models" / "tiny-detect.pt").write_bytes((deployed / "models" / "tiny.pt").read_bytes())
    models = f"[{{file: models/tiny.pt, shards: {frames}}}, {{file: models/tiny-detect.pt, shards: {frames}}}]"
    result = run_stage("pipeline.deploy", deployed, "--set", f"models={models}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: deploy.models: models/tiny.pt and models/tiny-detect.pt would both write tiny-detect.onnx; "
        "rename one of the model files")
    assert sorted((deployed / "models" / "deploy").iterdir()) == before


def test_deploy_refuses_a_metrics_file_inside_the_graphs_folder(deployed):
    """The metrics went into the folder the graphs then replaced whole: exit 0, and no metrics."""
    before = sorted((deployed / "models" / "deploy").iterdir())
    result = run_stage("pipeline.deploy", deployed, "--set", "metrics=models/deploy/deploy.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: deploy.metrics: models/deploy/deploy.json is inside deploy.out_dir (models/deploy), which is "
        "replaced whole by the graphs: put it elsewhere (metrics/deploy.json)")
    assert sorted((deployed / "models" / "deploy").iterdir()) == before
