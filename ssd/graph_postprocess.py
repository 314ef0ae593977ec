"""Post-processing inside the ONNX graph: a detector file whose outputs are its detections.

:func:`append_postprocess` takes a graph with the raw outputs (``class_logits [B, P, C]``,
``box_deltas [B, P, 4]``, as :func:`ssd.export.deployable_onnx` writes it, float or int8) and
adds the standard SSD post-processing after them, as ONNX operators:

1. softmax over the classes, the background column dropped;
2. the boxes decoded against the priors (a constant of the graph) and clipped to the image:
   :func:`ssd.boxes.decode` and :func:`ssd.boxes.clip_boxes`, in the same order of operations;
3. ``NonMaxSuppression`` per image and class (score strictly above ``score_threshold``, IoU
   above ``nms_threshold`` suppresses, at most ``max_detections`` per class);
4. the survivors sorted by image, then by decreasing score, at most ``max_detections`` per image.

The outputs replace the raw ones: ``boxes [N, 4]`` (xyxy, normalised), ``scores [N]``,
``labels [N]`` (int64, >= 1, as :class:`ssd.postprocess.PostProcessor` numbers them) and
``batch_index [N]`` (int64, the image of each detection) for the ``N`` detections of the whole
batch. A temporal graph's state outputs stay, after them, so a runtime streams as before.

Why in the graph: after a 2-3 ms int8 forward, the Python post-processing of one frame
(:func:`ssd.postprocess.single_image_cpu`, a few dozen NumPy calls on cold caches) took
0.7-1.0 ms, a fifth of the frame; the same work as ONNX Runtime operators took 0.1-0.4 ms
(the benchmark's ``camera_loop``), and a deployer in C++ or on a phone gets a file that needs
no post-processing code of its own.

What differs from :class:`ssd.postprocess.PostProcessor`: its ``top_k`` limit on the
candidates of one class before NMS is not applied (``NonMaxSuppression`` has no such input),
so the results are the same whenever no image has more than ``top_k`` candidates of one class
above the threshold (a deployed detector's threshold leaves a few dozen); detections of exactly
equal scores may come in another order; IoU is computed in float32 by ONNX Runtime instead of
float64, so a pair of boxes whose IoU is within rounding of ``nms_threshold`` may be decided
the other way (tested equal on random and trained outputs).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ssd.boxes import MAX_LOG_SCALE, VARIANCES
from ssd.onnx_detector import DETECTION_OUTPUTS, RAW_OUTPUTS
from ssd.postprocess import PostprocessConfig

RAW = tuple(RAW_OUTPUTS)
DETECTIONS = DETECTION_OUTPUTS


class _Graph:
    """The nodes and constants being added, each named ``pp/...``."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[Any] = []
        self.consts: list[Any] = []

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        if f"pp/c_{name}" not in {c.name for c in self.consts}:  # a name is one value: the first one given
            self.consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"pp/c_{name}"))
        return f"pp/c_{name}"

    def op(self, kind: str, inputs: list[str], name: str, outputs: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        names = [f"pp/{name}"] if outputs == 1 else [f"pp/{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(kind, inputs, names, name=f"pp/{name}", **attrs))
        return names[0] if outputs == 1 else names


def append_postprocess(data: bytes, priors: np.ndarray, config: PostprocessConfig,
                       variances: tuple[float, float] = VARIANCES) -> bytes:
    """The graph ``data`` with its raw outputs replaced by detections (module docstring).

    Args:
        data: a serialised ONNX model whose first two outputs are ``class_logits [B, P, C]`` and
            ``box_deltas [B, P, 4]`` (float32); any further outputs (a temporal model's state) stay.
        priors: ``float32 [P, 4]`` cxcywh priors of the model.
        config: the thresholds and limits, written into the graph (and its ``postprocess`` metadata).

    Raises:
        ValueError: the graph has no raw outputs, or ``priors`` does not fit them.
    """
    import onnx

    proto = onnx.load_from_string(data)
    graph = proto.graph
    outputs = [o.name for o in graph.output]
    if tuple(outputs[:2]) != RAW:
        raise ValueError(f"outputs {outputs[:2]}: in-graph post-processing needs the raw outputs {list(RAW)}")
    raw, rest = ([copy.deepcopy(o) for o in part] for part in (graph.output[:2], graph.output[2:]))
    _complete(proto, raw, rest, priors, config, variances)
    graph.value_info.extend(raw)  # the raw outputs' shapes, now of inner tensors
    return proto.SerializeToString()


def postprocess_graph(priors: np.ndarray, num_classes: int, config: PostprocessConfig, opset: int = 17,
                      variances: tuple[float, float] = VARIANCES) -> bytes:
    """The post-processing alone as a graph: inputs ``class_logits [B, P, C]`` and ``box_deltas
    [B, P, 4]`` (a raw graph's outputs, passed on by the caller), outputs as :func:`append_postprocess`'s."""
    from onnx import TensorProto, helper

    num_priors = int(np.asarray(priors).shape[0])
    raw = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", num_priors, d])
           for n, d in zip(RAW, (num_classes, 4))]
    proto = helper.make_model(helper.make_graph([], "postprocess", raw, []),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    _complete(proto, raw, [], priors, config, variances)
    return proto.SerializeToString()


def _complete(proto: Any, raw: list[Any], rest: list[Any], priors: np.ndarray, config: PostprocessConfig,
              variances: tuple[float, float]) -> None:
    """Add the post-processing after the tensors ``raw`` of ``proto`` and make its outputs the
    detections, then ``rest``; metadata ``outputs`` and ``postprocess``; checked."""
    import onnx
    from onnx import TensorProto, helper

    graph = proto.graph
    priors = np.asarray(priors, dtype=np.float32)
    num_priors = _dim(raw[0], 1)
    if priors.ndim != 2 or priors.shape[1] != 4 or (num_priors is not None and priors.shape[0] != num_priors):
        raise ValueError(f"priors of shape {list(priors.shape)} do not fit class_logits with {num_priors} priors")
    g = _Graph(next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17))
    found = _select(g, _boxes(g, priors, variances), _probabilities(g), config)
    _by_image_and_score(g, found, config.max_detections)
    graph.node.extend(g.nodes)
    graph.initializer.extend(g.consts)
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["detections", 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["detections"]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["detections"]),
        helper.make_tensor_value_info("batch_index", TensorProto.INT64, ["detections"]),
        *rest,
    ])
    _set_metadata(proto, {"outputs": [*DETECTIONS, *(o.name for o in rest)],
                          "postprocess": {"score_threshold": config.score_threshold,
                                          "nms_threshold": config.nms_threshold,
                                          "max_detections": config.max_detections,
                                          "num_classes": _dim(raw[0], 2)}})
    onnx.checker.check_model(proto)


def _probabilities(g: _Graph) -> str:
    """``[B, K, P]`` probabilities of the ``K = C - 1`` object classes (NonMaxSuppression's layout).

    Computed as :func:`ssd.postprocess.class_probabilities` does, classes on the middle axis:
    ONNX Runtime's Softmax over a last axis of 7 took 112 us of a 2.3 ms int8 frame, these ~35.
    """
    by_class = g.op("Transpose", [RAW[0]], "logits_bcp", perm=[0, 2, 1])
    ax1 = g.const("ax1", [1], np.int64)
    peak = (g.op("ReduceMax", [by_class, ax1], "peak", keepdims=1) if g.opset >= 18  # axes: an input from 18
            else g.op("ReduceMax", [by_class], "peak", axes=[1], keepdims=1))
    exp = g.op("Exp", [g.op("Sub", [by_class, peak], "shifted")], "exp")
    obj = g.op("Slice", [exp, ax1, g.const("big", [np.iinfo(np.int64).max], np.int64), ax1], "exp_objects")
    return g.op("Div", [obj, g.op("ReduceSum", [exp, ax1], "total", keepdims=1)], "scores_bkp")


def _boxes(g: _Graph, priors: np.ndarray, variances: tuple[float, float]) -> str:
    """``[B, P, 4]`` boxes: :func:`ssd.boxes.decode` then :func:`ssd.boxes.clip_boxes`, the prior
    terms precomputed (``v0 * w``, ``w / 2``: equal to float32 rounding)."""
    zero, two, four, axis2 = (g.const(n, [v], np.int64) for n, v in (("zero", 0), ("two", 2), ("four", 4),
                                                                      ("axis2", 2)))
    d_xy = g.op("Slice", [RAW[1], zero, two, axis2], "d_xy")
    d_wh = g.op("Slice", [RAW[1], two, four, axis2], "d_wh")
    offset = g.op("Mul", [d_xy, g.const("prior_wh_v0", priors[:, 2:] * np.float32(variances[0]))], "offset")
    centre = g.op("Add", [g.const("prior_xy", priors[:, :2]), offset], "centre")
    log_scale = g.op("Min", [g.op("Mul", [d_wh, g.const("v1", variances[1])], "d_wh_v"),
                             g.const("max_log", MAX_LOG_SCALE)], "log_scale")
    half = g.op("Mul", [g.const("prior_half_wh", priors[:, 2:] / 2), g.op("Exp", [log_scale], "scale")], "half")
    corners = g.op("Concat", [g.op("Sub", [centre, half], "xy1"), g.op("Add", [centre, half], "xy2")], "corners",
                   axis=2)
    return g.op("Clip", [corners, g.const("lo", 0.0), g.const("hi", 1.0)], "boxes_bp4")


def _select(g: _Graph, boxes: str, scores: str, config: PostprocessConfig) -> dict[str, str]:
    """NMS per image and class; the survivors' ``image``, ``cls``, ``score`` ``[N]`` and ``box`` ``[N, 4]``."""
    selected = g.op("NonMaxSuppression", [boxes, scores, g.const("per_class", [config.max_detections], np.int64),
                                          g.const("iou", [config.nms_threshold]),
                                          g.const("score", [config.score_threshold])], "selected")  # [N, 3]
    image, cls, prior = (g.op("Gather", [selected, g.const(f"col{i}", i, np.int64)], name, axis=1)
                         for i, name in enumerate(("image", "cls", "prior")))
    ax1 = g.const("ax1", [1], np.int64)
    where = g.op("Concat", [g.op("Unsqueeze", [image, ax1], "image_col"), g.op("Unsqueeze", [prior, ax1], "prior_col")],
                 "image_prior", axis=1)
    return {"image": image, "cls": cls, "score": g.op("GatherND", [scores, selected], "score"),
            "box": g.op("GatherND", [boxes, where], "box")}


def _by_image_and_score(g: _Graph, found: dict[str, str], max_detections: int) -> None:
    """The graph's outputs: ``found`` sorted by image, then by decreasing score, at most
    ``max_detections`` per image."""
    from onnx import TensorProto, helper

    # One TopK on score - 4 * image, exact in float64; ties keep the lower index (ONNX's TopK).
    key = g.op("Sub", [g.op("Cast", [found["score"]], "score64", to=TensorProto.DOUBLE),
                       g.op("Mul", [g.op("Cast", [found["image"]], "image64", to=TensorProto.DOUBLE),
                                    g.const("four_d", 4.0, np.float64)], "image_x4")], "key")
    count = g.op("Shape", [key], "count")
    order = g.op("TopK", [key, count], "sort", outputs=2, axis=0, largest=1, sorted=1)[1]
    image, cls, score, box = (g.op("Gather", [found[n], order], f"{n}_sorted", axis=0)
                              for n in ("image", "cls", "score", "box"))
    # Rank within its image: position - (detections of the images before it), by a [B, N] comparison.
    ax1 = g.const("ax1", [1], np.int64)
    batch = g.op("Gather", [g.op("Shape", [RAW[0]], "logits_shape"), g.const("b0", 0, np.int64)], "batch")
    images = g.op("Range", [g.const("r0", 0, np.int64), batch, g.const("r1", 1, np.int64)], "images")
    earlier = g.op("Less", [image, g.op("Unsqueeze", [images, ax1], "images_col")], "earlier")  # [B, N]
    starts = g.op("ReduceSum", [g.op("Cast", [earlier], "earlier_i", to=TensorProto.INT64), ax1], "starts",
                  keepdims=0)
    n = g.op("Squeeze", [count, g.const("ax0", [0], np.int64)], "n")
    position = g.op("Range", [g.const("q0", 0, np.int64), n, g.const("r1", 1, np.int64)], "position")
    rank = g.op("Sub", [position, g.op("Gather", [starts, image], "start_of_image", axis=0)], "rank")
    keep = g.op("Less", [rank, g.const("max_det", max_detections, np.int64)], "keep")
    for name, tensor in (("boxes", box), ("scores", score), ("batch_index", image)):
        g.nodes.append(helper.make_node("Compress", [tensor, keep], [name], name=f"pp/out_{name}", axis=0))
    kept = g.op("Compress", [cls, keep], "cls_kept", axis=0)
    g.nodes.append(helper.make_node("Add", [kept, g.const("label1", 1, np.int64)], ["labels"], name="pp/out_labels"))


def _dim(value: Any, axis: int) -> int | None:
    dims = value.type.tensor_type.shape.dim
    return int(dims[axis].dim_value) if len(dims) > axis and dims[axis].HasField("dim_value") else None


def _set_metadata(proto: Any, updates: dict[str, Any]) -> None:
    from ssd.export import set_metadata

    set_metadata(proto, {**{p.key: p.value for p in proto.metadata_props}, **updates})
