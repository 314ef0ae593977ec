"""Static int8 quantization of an exported detector with ONNX Runtime.

:func:`quantize_int8` takes a float graph (:func:`ssd.export.deployable_onnx`) and frames to
calibrate on, and returns the int8 graph ONNX Runtime's quantizer makes of it:

- ``quant_pre_process`` first (shape inference and graph optimisation, as ONNX Runtime
  recommends before static quantization);
- QDQ format (QuantizeLinear / DequantizeLinear pairs around each quantized operator,
  which ONNX Runtime fuses into integer kernels and other runtimes read too), activations
  uint8 and weights int8, per output channel (per-tensor weights lose the depthwise
  convolutions of MobileNet, whose channels have very different ranges);
- activation ranges from the calibration frames, by ``method``: ``minmax`` (the observed
  range), ``percentile`` (99.999% of it) or ``entropy``.

A temporal graph (LSTM-SSD) keeps its explicit state inputs and outputs, in float: the
calibration feeds each frame with the state the float graph computed for the frame before
it (zeros where a sequence starts), so the state's ranges are those of real streaming; the
``relu6`` of the cell state stays float, so that the state keeps its own range
(:func:`_clips_of_graph_outputs`).

The graph's inputs and outputs stay float32: an int8 file is a drop-in replacement for the
float one (:class:`ssd.onnx_detector.OnnxDetector` runs either).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np

from ssd.export import set_metadata

Method = Literal["minmax", "percentile", "entropy"]

#: One calibration input: images ``float32 [B, 3, S, S]`` in [0, 1], and whether a new
#: sequence starts with them (a temporal graph: fresh zero state; a frame graph ignores it).
CalibrationFrame = tuple[np.ndarray, bool]


class _Reader:
    """The quantizer's ``CalibrationDataReader``: input feeds, the state streamed by the float graph."""

    def __init__(self, session: Any, frames: Iterable[CalibrationFrame]):
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.state_shapes = [tuple(i.shape[1:]) for i in session.get_inputs()[1:]]
        self.frames: Iterator[CalibrationFrame] = iter(frames)
        self.state: list[np.ndarray] = []
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.frames, None)
        if item is None:
            return None
        images, starts = item
        images = np.ascontiguousarray(images, dtype=np.float32)
        feed = {self.inputs[0]: images}
        if self.state_shapes:
            if starts or not self.state or self.state[0].shape[0] != images.shape[0]:
                self.state = [np.zeros((images.shape[0], *shape), np.float32) for shape in self.state_shapes]
            feed.update(zip(self.inputs[1:], self.state))
            self.state = self.session.run(None, feed)[2:]  # the float graph's next state
        self.count += int(images.shape[0])
        return feed

    def rewind(self) -> None:  # noqa: D401  (the quantizer may call it; one pass is all we give)
        pass


def quantize_int8(
    data: bytes,
    calibration: Iterable[CalibrationFrame],
    method: Method = "minmax",
    per_channel: bool = True,
    exclude: Sequence[str] = (),
) -> tuple[bytes, dict[str, Any]]:
    """``(int8 graph, report)`` of the float graph ``data``, calibrated on ``calibration``.

    ``exclude``: names of nodes left in float. The report (also stored in the graph's metadata
    as ``quantization``) gives the method, the frames calibrated on and the operators quantized.
    The graph's other metadata (class names, arch, ...) is kept.

    Raises:
        ValueError: ``calibration`` gave no frame.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    source = onnx.load_from_string(data)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    reader = _Reader(session, calibration)
    with tempfile.TemporaryDirectory(prefix="ssd-quantize-") as tmp:
        float_path, pre_path, out_path = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        float_path.write_bytes(data)
        # ONNX's own shape inference is enough for these graphs of fixed-size convolutions; ONNX
        # Runtime's symbolic one gives up on the LSTM-SSD state paths ("Incomplete symbolic shape
        # inference").
        quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=True)
        output_clips = _clips_of_graph_outputs(onnx.load(str(pre_path)))
        quantize_static(
            str(pre_path), str(out_path), reader,
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[method], nodes_to_exclude=[*exclude, *output_clips],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        if reader.count == 0:
            raise ValueError("no calibration frame: the calibration data is empty")
        proto = onnx.load(str(out_path))
    quantized = sorted({n.op_type for n in _dequantized_consumers(proto)})
    report = {"method": method, "per_channel": per_channel, "calibration_frames": reader.count,
              "format": "QDQ, activations uint8, weights int8", "quantized_ops": quantized,
              "excluded_nodes": list(exclude), "float_clips_of_outputs": output_clips}
    # The float graph's entries (arch, classes, ...), then the quantizer's own, then ours.
    set_metadata(proto, {**{p.key: p.value for p in source.metadata_props},
                         **{p.key: p.value for p in proto.metadata_props}, "quantization": report})
    onnx.checker.check_model(proto)
    return proto.SerializeToString(), report


def leading_nodes(data: bytes, convolutions: int) -> list[str]:
    """Names of the graph's nodes before its ``convolutions + 1``-th ``Conv`` (in the graph's
    topological order): the input normalisation and the first layers, which
    :func:`quantize_int8` can leave in float (``exclude``). Up to the next convolution, not to
    the last excluded one: a residual ``Add`` after it stays float too, else the quantizer puts
    a Quantize/Dequantize pair on a tensor the float convolutions read as well.

    Why: at the input resolution with a handful of channels ONNX Runtime's int8 kernels are
    slower than its float ones. Measured on the sample's SSDLite at 160 px, one thread: the
    stem (3 -> 16 channels at 80x80) took 264 us in int8 against 139 us in float, and the
    first block's depthwise 150 against 85; leaving the first three convolutions in float took
    the int8 forward from 2.56 to 2.10 ms (the 50% pruned model's, with 8 channels there,
    from 2.27 to 1.74 ms).
    """
    import onnx

    if convolutions <= 0:
        return []
    names, seen = [], 0
    for node in onnx.load_from_string(data).graph.node:
        seen += node.op_type == "Conv"
        if seen > convolutions:
            break
        names.append(node.name)
    return names


def _clips_of_graph_outputs(proto: Any) -> list[str]:
    """Names of the Clip / Relu nodes that read a graph output (LSTM-SSD: ``relu6(c)`` of the
    cell state ``c``, itself the output ``new_state_1``).

    ONNX Runtime's quantizer gives a Clip's input tensor the Clip's range when no other node
    reads it (``adjust_tensor_ranges``: the activation is then dropped from the int8 graph), and
    a graph output does not count as a reader: the int8 graph's cell state came out clipped at
    6 while the float graph's reached 108 on a sample video. Left in float, the Clip keeps its
    input's own calibrated range.
    """
    outputs = {o.name for o in proto.graph.output}
    return [n.name for n in proto.graph.node if n.op_type in ("Clip", "Relu") and n.input and n.input[0] in outputs]


def _dequantized_consumers(proto: Any) -> list[Any]:
    """The nodes that read a DequantizeLinear output: the operators that run in int8."""
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n for n in proto.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(i in dequantized for i in n.input)]
