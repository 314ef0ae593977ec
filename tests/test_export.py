"""ONNX export: the graphs onnxruntime runs give PyTorch's outputs, states streamed included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pipeline.export import main  # noqa: E402
from ssd.boxes import clip_boxes, decode  # noqa: E402
from ssd.export import onnx_bytes  # noqa: E402
from ssd.model_file import load_model_file, save_model_file  # noqa: E402
from ssd.models import lstm_ssd_mobilenet_v2, ssdlite_mobilenet_v2  # noqa: E402
from ssd.postprocess import PostprocessConfig, PostProcessor, select_detections  # noqa: E402
from ssd.pruning import ARCH_KEY, PruneConfig, count_macs_params, prune_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red", "blue"]
TOL = dict(atol=1e-4, rtol=0)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """He-initialised convolutions and non-trivial batch-norm statistics: outputs of order 1
    (a fresh model's are ~0.02, which would make a 1e-4 tolerance meaningless), and an export
    that used batch statistics instead of the running ones would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def make_ssdlite(path: Path) -> Path:
    torch.manual_seed(0)
    save_model_file(path, randomise(ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), 0), CLASSES)
    return path


def make_lstm(path: Path) -> Path:
    torch.manual_seed(0)
    model = lstm_ssd_mobilenet_v2(3, width_mult=0.25, image_size=64, placement=("backbone", "extras"))
    save_model_file(path, randomise(model, 1), CLASSES)
    return path


def export(model_file: Path, out: Path, *flags: str) -> onnx.ModelProto:
    assert main([str(model_file), "--out", str(out), *flags]) == 0
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    return proto


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def names(values) -> list[str]:
    return [v.name for v in values]


def metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def batch_dim(value) -> str:
    return value.type.tensor_type.shape.dim[0].dim_param


def test_ssdlite_raw(tmp_path):
    model_file = make_ssdlite(tmp_path / "ssdlite.pt")
    proto = export(model_file, tmp_path / "ssdlite.onnx")
    assert names(proto.graph.input) == ["images"]
    assert names(proto.graph.output) == ["class_logits", "box_deltas"]
    assert {batch_dim(v) for v in [*proto.graph.input, *proto.graph.output]} == {"batch"}
    assert proto.opset_import[0].version == 17
    meta = metadata(proto)
    assert json.loads(meta["class_names"]) == CLASSES and json.loads(meta["image_size"]) == 64

    model, _ = load_model_file(model_file)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # exported at batch 1
    logits, deltas = session(tmp_path / "ssdlite.onnx").run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images)
    assert logits.shape == (3, model.priors.shape[0], 3)
    torch.testing.assert_close(torch.from_numpy(logits), expected[0], **TOL)
    torch.testing.assert_close(torch.from_numpy(deltas), expected[1], **TOL)


def test_ssdlite_decoded(tmp_path):
    model_file = make_ssdlite(tmp_path / "ssdlite.pt")
    proto = export(model_file, tmp_path / "decoded.onnx", "--decode", "--opset", "18")
    assert names(proto.graph.output) == ["scores", "boxes"]
    assert proto.opset_import[0].version == 18

    model, _ = load_model_file(model_file)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    scores, boxes = (torch.from_numpy(a) for a in session(tmp_path / "decoded.onnx").run(None, {"images": images.numpy()}))
    with torch.no_grad():
        logits, deltas = model(images)
    torch.testing.assert_close(scores, torch.softmax(logits, -1), **TOL)
    torch.testing.assert_close(boxes, clip_boxes(decode(deltas, model.priors)), **TOL)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, model.priors.shape[0]), **TOL)

    # NMS outside the graph on its outputs keeps what PostProcessor keeps on PyTorch's.
    cfg = PostprocessConfig(score_threshold=0.3)
    ours = select_detections(scores[..., 1:], boxes, cfg)
    reference = PostProcessor(model.priors, cfg)(logits, deltas)
    assert sum(len(d["labels"]) for d in reference) > 0
    for a, b in zip(ours, reference):
        assert a["labels"].tolist() == b["labels"].tolist()
        torch.testing.assert_close(a["boxes"], b["boxes"], **TOL)
        torch.testing.assert_close(a["scores"], b["scores"], **TOL)


def test_pruned_model(tmp_path):
    torch.manual_seed(0)
    model = randomise(ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), 2)
    _, params_before = count_macs_params(model)
    prune_model(model, PruneConfig(ratio=0.5))
    assert model.arch[ARCH_KEY]
    save_model_file(tmp_path / "pruned.pt", model, CLASSES)
    proto = export(tmp_path / "pruned.pt", tmp_path / "pruned.onnx")
    assert json.loads(metadata(proto)["pruned"]) is True

    loaded, _ = load_model_file(tmp_path / "pruned.pt")
    assert count_macs_params(loaded)[1] < params_before
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    logits, deltas = session(tmp_path / "pruned.onnx").run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = loaded(images)
    torch.testing.assert_close(torch.from_numpy(logits), expected[0], **TOL)
    torch.testing.assert_close(torch.from_numpy(deltas), expected[1], **TOL)


def test_lstm_ssd_streaming(tmp_path):
    """10 frames through onnxruntime, its new state fed back, equal PyTorch streaming at every frame."""
    model_file = make_lstm(tmp_path / "lstm.pt")
    proto = export(model_file, tmp_path / "lstm.onnx")
    model, _ = load_model_file(model_file)
    n = len(model.init_state(1))
    assert n == 2 * len(model.temporal) == 10
    assert names(proto.graph.input) == ["images", *[f"state_{i}" for i in range(n)]]
    assert names(proto.graph.output) == ["class_logits", "box_deltas", *[f"new_state_{i}" for i in range(n)]]
    assert {batch_dim(v) for v in [*proto.graph.input, *proto.graph.output]} == {"batch"}
    assert json.loads(metadata(proto)["state"]) == [list(s.shape[1:]) for s in model.init_state(1)]

    run = session(tmp_path / "lstm.onnx")
    g = torch.Generator().manual_seed(3)
    batch = 2
    state = model.init_state(batch)
    ort_state = [np.zeros(s.shape, np.float32) for s in state]  # what a runtime starts a video with
    with torch.no_grad():
        for frame in range(10):
            images = torch.rand(batch, 3, 64, 64, generator=g)
            logits, deltas, state = model(images, state=state)
            got = run.run(None, {"images": images.numpy(), **{f"state_{i}": s for i, s in enumerate(ort_state)}})
            ort_state = got[2:]
            for expected, actual in zip((logits, deltas, *state), got):
                torch.testing.assert_close(torch.from_numpy(actual), expected, **TOL, msg=lambda m: f"frame {frame}: {m}")
    # The state matters: a fresh state on the last frame gives other predictions.
    fresh = run.run(None, {"images": images.numpy(), **{f"state_{i}": np.zeros_like(s) for i, s in enumerate(ort_state)}})
    assert np.abs(fresh[0] - logits.numpy()).max() > 0.1


def test_lstm_ssd_decoded(tmp_path):
    model_file = make_lstm(tmp_path / "lstm.pt")
    proto = export(model_file, tmp_path / "lstm-decoded.onnx", "--decode")
    model, _ = load_model_file(model_file)
    assert names(proto.graph.output)[:3] == ["scores", "boxes", "new_state_0"]
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    state = [torch.randn(s.shape, generator=torch.Generator().manual_seed(5)) for s in model.init_state(1)]
    got = session(tmp_path / "lstm-decoded.onnx").run(
        None, {"images": images.numpy(), **{f"state_{i}": s.numpy() for i, s in enumerate(state)}}
    )
    with torch.no_grad():
        logits, deltas, new_state = model(images, state=tuple(state))
    torch.testing.assert_close(torch.from_numpy(got[0]), torch.softmax(logits, -1), **TOL)
    torch.testing.assert_close(torch.from_numpy(got[1]), clip_boxes(decode(deltas, model.priors)), **TOL)
    for actual, expected in zip(got[2:], new_state):
        torch.testing.assert_close(torch.from_numpy(actual), expected, **TOL)


def test_export_keeps_the_model_mode():
    # The exporter restores its wrapper's mode (eval) onto the model: the caller's must survive.
    model = ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64).train()
    onnx_bytes(model)
    assert all(m.training for m in model.modules())
    onnx_bytes(model.eval())
    assert not any(m.training for m in model.modules())


def test_cli_subprocess(tmp_path):
    """As users run it, with --verify; a missing model file is one line and exit code 2."""
    model_file = make_lstm(tmp_path / "lstm.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.export", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    result = cli(str(model_file), "--out", "out/lstm.onnx", "--verify")
    assert result.returncode == 0, result.stderr
    assert "onnxruntime matches PyTorch" in result.stderr
    assert (tmp_path / "out" / "lstm.onnx").is_file()

    result = cli("missing.pt", "--out", "x.onnx")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: missing.pt: model file not found"]
    assert not (tmp_path / "x.onnx").exists()


def test_int8_requests_that_cannot_be_done_write_nothing(tmp_path, capsys):
    """The calibration shards are checked before the float graph is written, and --out and --int8
    may not name one file (the int8 graph overwrote the float one, and the run said it wrote both)."""
    from shardgen import write_frame_dataset

    model_file = tmp_path / "ssdlite.pt"
    torch.manual_seed(0)
    save_model_file(model_file, ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), ["a", "b"])
    other = write_frame_dataset(tmp_path / "other", {"train": [4]})  # the shard generator's own classes
    old = tmp_path / "out.onnx"
    old.write_bytes(b"the previous export")
    int8 = str(tmp_path / "out-int8.onnx")
    cases = [
        (["--int8", int8, "--calibration", str(other)], "classes"),
        (["--int8", int8, "--calibration", str(tmp_path / "nowhere")], "nowhere"),
        (["--int8", str(old), "--calibration", str(other)], "the same file as --out"),
        (["--int8", str(tmp_path), "--calibration", str(other)], f"{tmp_path}: is a folder"),  # was a temp file's name
    ]
    for extra, message in cases:
        code = main([str(model_file), "--out", str(old), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: ") and message in err[-1], (extra, err)
        assert old.read_bytes() == b"the previous export"
        assert not (tmp_path / "out-int8.onnx").exists()


def test_a_nan_output_is_an_infinite_difference(tmp_path):
    """`export --verify` said "onnxruntime matches PyTorch" for a model whose class scores were all
    NaN: NaN compares false, so max() kept the finite differences."""
    from ssd.export import onnxruntime_difference

    model = randomise(ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), 0).eval()
    data = onnx_bytes(model)
    assert onnxruntime_difference(model, data) < 1e-4
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("head.cls_layers."):
                p.fill_(float("nan"))
    assert onnxruntime_difference(model, data) == float("inf")  # PyTorch's side is NaN
    assert onnxruntime_difference(model, onnx_bytes(model)) == float("inf")  # both sides NaN


@pytest.mark.parametrize("flags, message", [
    (["--tolerance", "1e-12"], "error: --tolerance is read only with --verify, which is not given"),
    (["--calibration-frames", "16"], "error: --calibration-frames is read only with --int8 FILE, which is not given"),
])
def test_flags_whose_switch_is_off_are_refused(tmp_path, capsys, flags, message):
    model_file = tmp_path / "m.pt"
    save_model_file(model_file, randomise(ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), 0), CLASSES)
    assert main([str(model_file), "--out", str(tmp_path / "m.onnx"), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "m.onnx").exists()


def test_int8_calibration_shards_that_break_midway_leave_the_old_pair(tmp_path, capsys):
    """The float graph was written, then the calibration found its shards truncated: exit 2 with a
    new float graph beside the old int8 one."""
    from shardgen import CLASSES, write_frame_dataset

    model_file = tmp_path / "ssdlite.pt"
    torch.manual_seed(0)
    save_model_file(model_file, ssdlite_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25, image_size=64), CLASSES)
    shards = write_frame_dataset(tmp_path / "cal", {"train": [6]})
    for tar in shards.glob("train-*.tar"):
        tar.write_bytes(tar.read_bytes()[:3000])
    out, int8 = tmp_path / "out.onnx", tmp_path / "out-int8.onnx"
    out.write_bytes(b"the previous float graph")
    int8.write_bytes(b"the previous int8 graph")
    code = main([str(model_file), "--out", str(out), "--int8", str(int8), "--calibration", str(shards)])
    assert code == 2, capsys.readouterr().err[-2000:]
    assert "train-000000.tar" in capsys.readouterr().err.strip().splitlines()[-1]
    assert out.read_bytes() == b"the previous float graph" and int8.read_bytes() == b"the previous int8 graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal", "out-int8.onnx", "out.onnx", "ssdlite.pt"]


@pytest.mark.parametrize("flag", ["--out", "--int8"])
def test_a_graph_under_another_suffix_is_refused(tmp_path, capsys, flag):
    """`export --out x.pt` wrote an ONNX graph under a model file's name, and the stages that read
    `.pt` files then failed on it as a corrupt model file."""
    model_file = tmp_path / "m.pt"
    save_model_file(model_file, randomise(ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), 0), CLASSES)
    names = {"--out": tmp_path / "m.onnx", "--int8": tmp_path / "m-int8.onnx"}
    names[flag] = tmp_path / "graph.pt"
    extra = ["--int8", str(names["--int8"]), "--calibration", str(tmp_path)] if flag == "--int8" else []
    assert main([str(model_file), "--out", str(names["--out"]), *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {flag} {tmp_path / 'graph.pt'}: an ONNX graph's name must end in .onnx")
    assert not any(p.exists() for p in names.values())
