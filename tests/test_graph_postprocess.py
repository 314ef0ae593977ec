"""Post-processing inside the ONNX graph (ssd.graph_postprocess) against PostProcessor."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.testing import assert_close

from ssd.errors import InputError
from ssd.export import deployable_onnx, save_onnx
from ssd.graph_postprocess import append_postprocess, postprocess_graph
from ssd.onnx_detector import load_detection_graph, load_onnx_detector
from ssd.postprocess import PostprocessConfig, PostProcessor
from test_deployed_model import lstm_model
from test_postprocess import PRIORS, random_outputs

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same(expected: list[dict], boxes, scores, labels, image) -> None:
    assert image.tolist() == sorted(image.tolist())
    for i, e in enumerate(expected):
        mine = image == i
        assert labels[mine].tolist() == e["labels"].tolist()
        assert_close(torch.from_numpy(scores[mine]), e["scores"], atol=1e-6, rtol=0)
        assert_close(torch.from_numpy(boxes[mine]), e["boxes"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg", [
    PostprocessConfig(),  # the evaluation's: hundreds per image, up to the max_detections cap
    PostprocessConfig(score_threshold=0.3),  # a deployed detector's
    PostprocessConfig(score_threshold=0.05, nms_threshold=0.3, max_detections=30),
    PostprocessConfig(max_detections=5),
])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax's axes: an attribute until 17, an input from 18
def test_graph_detections_equal_the_postprocessors(cfg, flat, opset):
    session = ort.InferenceSession(postprocess_graph(PRIORS.numpy(), 7, cfg, opset), providers=["CPUExecutionProvider"])
    total = 0
    for seed in range(3):
        logits, deltas = random_outputs(3, 7, seed=seed, flat=flat)
        expected = PostProcessor(PRIORS, cfg)(logits, deltas)
        out = session.run(None, {"class_logits": logits.numpy(), "box_deltas": deltas.numpy()})
        assert [o.dtype for o in out] == [np.float32, np.float32, np.int64, np.int64]
        assert_same(expected, *out)
        total += len(out[1])
    assert total >= 20  # not a comparison of empty lists


def test_an_image_without_detections_and_a_batch_of_none():
    cfg = PostprocessConfig(score_threshold=0.9)
    session = ort.InferenceSession(postprocess_graph(PRIORS.numpy(), 7, cfg), providers=["CPUExecutionProvider"])
    logits, deltas = random_outputs(2, 7, seed=0, flat=True)
    boxes, scores, labels, image = session.run(None, {"class_logits": logits.numpy(), "box_deltas": deltas.numpy()})
    assert boxes.shape == (0, 4) and len(scores) == len(labels) == len(image) == 0
    logits[1, 5, 3] = 20.0  # one certain detection, in the second image
    boxes, scores, labels, image = session.run(None, {"class_logits": logits.numpy(), "box_deltas": deltas.numpy()})
    assert image.tolist() == [1] and labels.tolist() == [3] and scores[0] > 0.99


def test_lstm_detect_graph_streams_its_state_and_detects_as_the_raw_graph(tmp_path):
    model = lstm_model()
    raw = deployable_onnx(model)
    cfg = PostprocessConfig(score_threshold=0.2)
    save_onnx(tmp_path / "raw.onnx", raw)
    save_onnx(tmp_path / "detect.onnx", append_postprocess(raw, model.priors.numpy(), cfg))
    detector, _ = load_onnx_detector(tmp_path / "raw.onnx")
    graph, info = load_detection_graph(tmp_path / "detect.onnx")
    assert graph.is_temporal and info["postprocess"]["score_threshold"] == 0.2
    post = PostProcessor(model.priors, cfg)
    frames = torch.rand(4, 2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    state = graph_state = None
    found = 0
    for frame in frames:
        logits, deltas, state = detector(frame, state)
        out, graph_state = graph.run(frame, graph_state)
        for got, want in zip(graph.per_image(out, 2), post(logits, deltas)):
            assert got["labels"].tolist() == want["labels"].tolist()
            assert_close(got["scores"], want["scores"], atol=1e-6, rtol=0)
            found += len(want["labels"])
        for mine, theirs in zip(graph_state, state):
            np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-6)
    assert found > 0


def test_only_raw_graphs_take_the_postprocessing_and_each_loader_names_the_other(tmp_path):
    model = lstm_model()
    with pytest.raises(ValueError, match="raw outputs"):
        append_postprocess(deployable_onnx(model, decoded=True), model.priors.numpy(), PostprocessConfig())
    with pytest.raises(ValueError, match="do not fit"):
        append_postprocess(deployable_onnx(model), model.priors.numpy()[:-1], PostprocessConfig())
    save_onnx(tmp_path / "raw.onnx", deployable_onnx(model))
    save_onnx(tmp_path / "detect.onnx", append_postprocess((tmp_path / "raw.onnx").read_bytes(), model.priors.numpy(),
                                                           PostprocessConfig()))
    with pytest.raises(InputError, match="post-processing is in the graph"):
        load_onnx_detector(tmp_path / "detect.onnx")
    with pytest.raises(InputError, match="not a graph with its post-processing inside"):
        load_detection_graph(tmp_path / "raw.onnx")
    names = [o.name for o in onnx.load(str(tmp_path / "detect.onnx")).graph.output]
    assert names[:4] == ["boxes", "scores", "labels", "batch_index"] and names[4:] == [
        f"new_state_{i}" for i in range(len(model.init_state(1)))]
