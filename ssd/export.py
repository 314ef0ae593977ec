"""Detectors as graphs of plain tensors, for ONNX and the runtimes that read it.

A detector's ``forward`` already returns raw predictions; what an exported graph
needs on top is a fixed signature of tensors, in and out:

- :class:`RawOutputs`: ``images -> (class_logits [B, P, C], box_deltas [B, P, 4])``,
  the model's own outputs (a runtime decodes them with the priors and
  ``ssd.boxes.VARIANCES``);
- :class:`DecodedOutputs`: ``images -> (scores [B, P, C], boxes [B, P, 4])``: the
  softmax over all classes (column 0 the background) and the decoded boxes, xyxy
  normalised to ``[0, 1]`` and clipped to the image, which is exactly what
  :class:`ssd.postprocess.PostProcessor` thresholds and suppresses (NMS too, with the
  deployer's thresholds: :mod:`ssd.graph_postprocess` appends it to a raw graph);
- for a temporal model (LSTM-SSD, ``model.is_temporal``) either of the above with the
  recurrent state as explicit inputs and outputs: ``(images, state_0 .. state_{2k-1})
  -> (..., new_state_0 .. new_state_{2k-1})``, in the order of ``model.init_state``
  (``h, c`` per cell). A runtime streams a video by feeding each call's new state to
  the next; zeros (``model.init_state``) start a video.

Every input and output has a dynamic batch axis (axis 0).

:func:`onnx_bytes` exports with the TorchScript-based exporter (``dynamo=False``), which
needs no ``onnxscript`` and traces these fixed-shape graphs faithfully. The deployed form,
:func:`deployable_onnx`, first folds batch norm into the convolutions (:mod:`ssd.fold`) and
then simplifies the graph with onnx-simplifier (constant folding, dead nodes: 425 operators
of our SSDLite's graph down to 251); :mod:`ssd.quantize` makes an int8 graph of it and
:mod:`ssd.onnx_detector` runs any of them in place of a PyTorch model. The metadata carries
the model's whole ``arch`` (``model_arch``), from which a runtime rebuilds the priors.
:func:`save_onnx` is the one function here that writes a file.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ssd.boxes import VARIANCES, clip_boxes, decode
from ssd.atomic import atomic_open
from ssd.models import SSD

DEFAULT_OPSET = 17
#: The operator sets the graph can be written in: LSTM-SSD's clip outputs need Unflatten (13);
#: 23 is the newest the pinned torch writes.
MIN_OPSET, MAX_OPSET = 13, 23


class RawOutputs(nn.Module):
    """``images [B, 3, S, S]`` -> ``(class_logits [B, P, C], box_deltas [B, P, 4])``.

    For a temporal model the state tensors follow the images as inputs, and the new
    state follows the predictions as outputs.
    """

    def __init__(self, model: SSD):
        super().__init__()
        self.model = model
        self.temporal = bool(getattr(model, "is_temporal", False))

    def forward(self, images: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        if self.temporal:
            logits, deltas, new_state = self.model(images, state=tuple(state))
            return (logits, deltas, *new_state)
        logits, deltas = self.model(images)
        return logits, deltas


class DecodedOutputs(RawOutputs):
    """``images [B, 3, S, S]`` -> ``(scores [B, P, C], boxes [B, P, 4])``.

    ``scores``: softmax over the ``C`` classes, column 0 the background. ``boxes``: xyxy
    normalised to ``[0, 1]``, clipped to the image: :class:`ssd.postprocess.PostProcessor`'s
    scores and boxes before thresholding and NMS. State inputs and outputs as for
    :class:`RawOutputs`.
    """

    def forward(self, images: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, deltas, *new_state = super().forward(images, *state)
        scores = torch.softmax(logits.float(), dim=-1)
        boxes = clip_boxes(decode(deltas.float(), self.model.priors))
        return (scores, boxes, *new_state)


@dataclass(frozen=True)
class ExportSpec:
    """What an exported graph takes and returns."""

    module: nn.Module
    """The wrapper to trace (in eval mode)."""
    inputs: tuple[Tensor, ...]
    """Example inputs, in ``input_names`` order."""
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    """Axis 0 of every input and output is the batch."""


def export_spec(model: SSD, decoded: bool = False, batch_size: int = 1) -> ExportSpec:
    """The wrapper, example inputs and names for exporting ``model``.

    Args:
        model: any detector of :mod:`ssd.models` (pruned ones included); a temporal one
            gets its state as inputs and outputs.
        decoded: :class:`DecodedOutputs` (``scores``, ``boxes``) instead of
            :class:`RawOutputs` (``class_logits``, ``box_deltas``).
        batch_size: batch of the example inputs (the exported batch axis is dynamic).

    The wrapper, and so ``model``, is put in eval mode: an export traces inference.
    """
    wrapper = (DecodedOutputs if decoded else RawOutputs)(model).eval()
    param = next(model.parameters())
    size = int(model.image_size)
    images = torch.rand(batch_size, 3, size, size, device=param.device, dtype=param.dtype)
    inputs: tuple[Tensor, ...] = (images,)
    input_names = ["images"]
    output_names = ["scores", "boxes"] if decoded else ["class_logits", "box_deltas"]
    if wrapper.temporal:
        state = model.init_state(batch_size, param.device, param.dtype)
        inputs += tuple(state)
        input_names += [f"state_{i}" for i in range(len(state))]
        output_names += [f"new_state_{i}" for i in range(len(state))]
    return ExportSpec(
        module=wrapper,
        inputs=inputs,
        input_names=tuple(input_names),
        output_names=tuple(output_names),
        dynamic_axes={name: {0: "batch"} for name in [*input_names, *output_names]},
    )


def onnx_bytes(
    model: SSD,
    decoded: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """``model`` as a checked ONNX model (serialised), with a dynamic batch axis.

    Args:
        model: the detector; its train/eval mode is left as it was.
        decoded, opset: see :func:`export_spec` and the ONNX operator set version.
        metadata: extra ``metadata_props`` (values that aren't strings are stored as JSON),
            next to the ones always written: ``image_size``, ``input`` (the expected
            input), ``outputs``, ``box_variances`` and for temporal models ``state``.

    Raises:
        onnx.checker.ValidationError: the exported graph is not valid ONNX.
    """
    import onnx

    was_training = model.training
    buffer = io.BytesIO()
    try:
        spec = export_spec(model, decoded)  # puts the model in eval mode
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter announces its own deprecation and warns about every
            # shape-dependent Python value it traces; the graph is checked below instead.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                spec.module,
                spec.inputs,
                buffer,
                dynamo=False,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
            )
    finally:
        # The exporter puts the wrapper back in the mode it found it in (eval), which may
        # not be the caller's.
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    props = {
        "image_size": model.image_size,
        "model_arch": dict(getattr(model, "arch", {})),
        "input": "images: float32 RGB in [0, 1], NCHW, square image_size (normalisation is in the graph)",
        "outputs": list(spec.output_names),
        "box_variances": list(VARIANCES),
        **(
            {"state": [list(s.shape[1:]) for s in spec.inputs[1:]]}
            if len(spec.inputs) > 1
            else {}
        ),
        **dict(metadata or {}),
    }
    set_metadata(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def set_metadata(proto: Any, props: Mapping[str, Any]) -> None:
    """Replace an ONNX model's ``metadata_props`` with ``props``, in order (values that aren't
    strings stored as JSON)."""
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=str(key), value=value if isinstance(value, str) else json.dumps(value))


def simplify_onnx(data: bytes) -> bytes:
    """``data`` simplified by onnx-simplifier: constants folded, dead and no-op nodes removed.

    onnx-simplifier runs the graph before and after on random input and refuses a result
    that differs (a RuntimeError here); the dynamic batch axis stays dynamic. Its own
    bookkeeping (``onnxsim.*`` metadata entries) is dropped, ours kept.
    """
    import onnx
    import onnxsim

    proto, ok = onnxsim.simplify(onnx.load_from_string(data))
    if not ok:
        raise RuntimeError("onnx-simplifier could not check its simplified graph against the original")
    for value in [*proto.graph.input, *proto.graph.output]:
        # Its shape inference renames some dynamic axes (unk__N); axis 0 is the batch everywhere.
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = "batch"
    set_metadata(proto, {p.key: p.value for p in proto.metadata_props if not p.key.startswith("onnxsim.")})
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def deployable_onnx(
    model: SSD,
    decoded: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
    fold: bool = True,
    simplify: bool = True,
) -> bytes:
    """The graph to deploy: ``model`` with batch norm folded (:func:`ssd.fold.fold_batchnorm`),
    exported (:func:`onnx_bytes`) and simplified (:func:`simplify_onnx`); ``model`` itself is
    left as it was. ``metadata`` gets ``folded_batchnorm`` and ``simplified``."""
    from ssd.fold import fold_batchnorm

    source = fold_batchnorm(model).model if fold else model
    props = {**dict(metadata or {}), "folded_batchnorm": fold, "simplified": simplify}
    data = onnx_bytes(source, decoded, opset, props)
    return simplify_onnx(data) if simplify else data


def save_onnx(path: str | os.PathLike, data: bytes) -> None:
    """Write the serialised graph ``data`` (:func:`onnx_bytes`, :func:`deployable_onnx`, an int8
    graph) to ``path`` atomically: it appears complete or not at all (a temporary name in the same
    directory, fsynced and renamed)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def onnxruntime_difference(
    model: SSD, data: bytes, decoded: bool = False, frames: int = 1, batch_size: int = 2, seed: int = 0
) -> float:
    """Largest absolute difference between onnxruntime running ``data`` and ``model`` itself.

    Feeds ``frames`` random batches of ``batch_size`` images (a temporal model: in sequence,
    each call's new state fed to the next, from the zero state) and compares every output.
    ``model`` must be on the CPU in float32 (as :func:`ssd.model_file.load_model_file`
    returns it). A non-finite output on either side is an infinite difference.
    """
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    was_training = model.training
    wrapper = (DecodedOutputs if decoded else RawOutputs)(model).eval()
    generator = torch.Generator().manual_seed(seed)
    size = int(model.image_size)
    state: Sequence[Tensor] = (
        model.init_state(batch_size, "cpu", torch.float32) if wrapper.temporal else ()
    )
    ort_state = [s.numpy() for s in state]
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    try:
        with torch.no_grad():
            for _ in range(frames):
                images = torch.rand(batch_size, 3, size, size, generator=generator)
                expected = wrapper(images, *state)
                got = session.run(None, dict(zip(names, [images.numpy(), *ort_state])))
                for e, g in zip(expected, got):
                    e = e.numpy()
                    if not (np.isfinite(e).all() and np.isfinite(g).all()):
                        return math.inf  # a NaN compares false with anything: max() would skip it
                    worst = max(worst, float(np.abs(e - g).max()))
                state, ort_state = expected[2:], got[2:]  # each side streams its own state
    finally:
        model.train(was_training)
    return worst
