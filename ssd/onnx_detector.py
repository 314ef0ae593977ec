"""An exported detector run by ONNX Runtime, in place of the PyTorch model.

:class:`OnnxDetector` behaves like the model a model file loads into where inference code
uses it (evaluation, benchmarks, detection): ``forward(images[, state])`` returns
``(class_logits [B, P, C], box_deltas [B, P, 4][, new_state])`` as torch tensors, and it has
``priors``, ``image_size``, ``num_classes``, ``arch`` and, for LSTM-SSD, ``is_temporal`` and
``init_state``. The same pre-processing (the graph takes ``[0, 1]`` RGB, the normalisation is
inside) and the same post-processing (:class:`ssd.postprocess.PostProcessor` on its outputs)
then apply to the exported artifact, float or int8, as to the PyTorch model.

Only graphs with raw outputs (``class_logits``, ``box_deltas``, as
:func:`ssd.export.deployable_onnx` writes by default) fit here; the priors are rebuilt from the
``model_arch`` metadata. A graph with its post-processing inside (:mod:`ssd.graph_postprocess`,
the deploy stage's ``-detect.onnx``) runs in :class:`DetectionGraph` instead: detections out.
ONNX Runtime runs on the CPU: inputs on another device are copied over and the outputs go back
to the inputs' device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ssd.errors import InputError

RAW_OUTPUTS = ["class_logits", "box_deltas"]


class OnnxDetector(nn.Module):
    """A detector graph in an ``onnxruntime.InferenceSession`` (build with :func:`load_onnx_detector`).

    Args:
        session: the session (CPU provider).
        info: the graph's metadata, JSON values decoded; needs ``model_arch``.
    """

    def __init__(self, session: Any, info: dict[str, Any]):
        super().__init__()
        from ssd.pruned_widths import rebuild_model

        self.session = session
        self.info = info
        self.arch = dict(info["model_arch"])
        reference = rebuild_model(self.arch)  # the priors and sizes (its random weights are not used)
        self.register_buffer("priors", reference.priors.detach().clone(), persistent=False)
        self.image_size = int(reference.image_size)
        self.num_classes = int(reference.num_classes)
        inputs = session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.state_shapes = [tuple(int(d) for d in i.shape[1:]) for i in inputs[1:]]
        self.is_temporal = bool(self.state_shapes)

    def init_state(self, batch_size: int, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Tensor, ...]:
        """The zero state a sequence starts from: ``Tensor[B, ...]`` per state input."""
        return tuple(torch.zeros(batch_size, *s, device=device, dtype=dtype) for s in self.state_shapes)

    def forward(self, images: Tensor, state: Sequence[Tensor] | None = None) -> tuple:
        """``images [B, 3, S, S]`` float in [0, 1] -> ``(class_logits, box_deltas)``, and for a
        temporal graph ``new_state`` (``state`` None: a fresh zero state)."""
        device = images.device
        feed = _feed(self.input_names, self.state_shapes, images, state)
        out = [torch.from_numpy(o).to(device) for o in self.session.run(None, feed)]
        if self.is_temporal:
            return out[0], out[1], tuple(out[2:])
        return out[0], out[1]


def load_onnx_detector(path: str | os.PathLike, threads: int | None = None) -> tuple[OnnxDetector, dict[str, Any]]:
    """``(detector, metadata)`` of the ONNX file ``path``; ``threads``: ONNX Runtime's intra-op threads
    (None: its default). The metadata has ``class_names`` as a model file's info does.

    Raises:
        InputError: missing or unreadable file, not an ONNX graph, onnxruntime missing, or a graph
            this module can't run (decoded outputs, no ``model_arch``), with a one-line message.
    """
    session, info = _session(path, threads)
    outputs = [o.name for o in session.get_outputs()]
    if tuple(outputs[:4]) == DETECTION_OUTPUTS:
        raise InputError(f"{path}: its post-processing is in the graph (outputs {outputs[:4]}): "
                         "evaluation needs the raw outputs (the graph without -detect)")
    if outputs[:2] != RAW_OUTPUTS:
        raise InputError(f"{path}: outputs {outputs[:2]}: evaluation needs the raw outputs {RAW_OUTPUTS} "
                         "(export without --decode)")
    if not isinstance(info.get("model_arch"), dict) or "name" not in info["model_arch"]:
        raise InputError(f"{path}: no model_arch in its metadata: export it again with pipeline.export")
    return OnnxDetector(session, info), info


#: The outputs of a graph with its post-processing inside (:mod:`ssd.graph_postprocess`).
DETECTION_OUTPUTS = ("boxes", "scores", "labels", "batch_index")


class DetectionGraph:
    """A graph whose outputs are detections (:func:`ssd.graph_postprocess.append_postprocess`) in
    an ``onnxruntime.InferenceSession``: ``images [B, 3, S, S]`` in [0, 1] (and a temporal graph's
    state) in, per-image detections out; build with :func:`load_detection_graph`."""

    def __init__(self, session: Any, info: dict[str, Any]):
        self.session = session
        self.info = info
        self.image_size = int(info["image_size"])
        inputs = session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.state_shapes = [tuple(int(d) for d in i.shape[1:]) for i in inputs[1:]]
        self.is_temporal = bool(self.state_shapes)

    def run(self, images: Tensor, state: Sequence[np.ndarray] | None = None) -> tuple[list[np.ndarray], list]:
        """One call: ``(outputs, new_state)``; ``outputs`` as the graph returns them (boxes ``[N, 4]``,
        scores ``[N]``, labels ``[N]``, batch_index ``[N]``); ``state`` None: a fresh zero state."""
        out = self.session.run(None, _feed(self.input_names, self.state_shapes, images, state))
        return out[:4], out[4:]

    @staticmethod
    def per_image(outputs: Sequence[np.ndarray], batch: int) -> list[dict[str, Tensor]]:
        """``outputs`` of :meth:`run` as :class:`ssd.postprocess.PostProcessor` returns detections:
        per image ``{"boxes", "scores", "labels"}``, by decreasing score."""
        boxes, scores, labels, image = (torch.from_numpy(o) for o in outputs)
        if batch == 1:
            return [{"boxes": boxes, "scores": scores, "labels": labels}]
        counts = torch.bincount(image, minlength=batch).tolist()
        return [{"boxes": b, "scores": s, "labels": lab}
                for b, s, lab in zip(boxes.split(counts), scores.split(counts), labels.split(counts))]


def _feed(names: Sequence[str], state_shapes: Sequence[tuple[int, ...]], images: Tensor,
          state: Sequence[Tensor | np.ndarray] | None) -> dict[str, np.ndarray]:
    """A session's inputs: ``images`` and, for a temporal graph, ``state`` (torch tensors or
    arrays; None: zeros), as contiguous float32 arrays."""
    def array(x: Tensor | np.ndarray) -> np.ndarray:
        x = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else x
        return np.ascontiguousarray(x, dtype=np.float32)

    feed = {names[0]: array(images)}
    if state_shapes:
        if state is None:
            state = [np.zeros((images.shape[0], *shape), np.float32) for shape in state_shapes]
        feed.update((n, array(s)) for n, s in zip(names[1:], state))
    return feed


def load_detection_graph(path: str | os.PathLike, threads: int | None = None) -> tuple[DetectionGraph, dict[str, Any]]:
    """``(graph, metadata)`` of an ONNX file with its post-processing inside (``*-detect.onnx``).

    Raises:
        InputError: as :func:`load_onnx_detector`, or the graph's outputs are not detections.
    """
    session, info = _session(path, threads)
    outputs = tuple(o.name for o in session.get_outputs())
    if outputs[:4] != DETECTION_OUTPUTS:
        raise InputError(f"{path}: outputs {list(outputs[:4])}: not a graph with its post-processing "
                         f"inside (outputs {list(DETECTION_OUTPUTS)})")
    if "image_size" not in info:
        raise InputError(f"{path}: no image_size in its metadata: export it again with pipeline.deploy")
    return DetectionGraph(session, info), info


def _session(path: str | os.PathLike, threads: int | None) -> tuple[Any, dict[str, Any]]:
    """An ONNX Runtime CPU session of the file ``path`` and its metadata (InputError: one line)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError(f"{path}: running an ONNX file needs onnxruntime: pip install -c constraints.txt -e .") from None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    try:
        session = ort.InferenceSession(str(path), _options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types, one per failure kind
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a graph onnxruntime can load ({first})") from None
    return session, _metadata(session)


def _options(threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    # Idle worker threads sleep instead of spinning: spinning ones keep a core busy between calls,
    # which on a small machine slows whatever runs next (the loader's workers, the post-processing;
    # in the benchmark's alternating loop PyTorch at 2 threads took 48 ms instead of 13).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # its warnings about unused initialisers are not the user's concern
    return options


def _metadata(session: Any) -> dict[str, Any]:
    """The graph's ``metadata_props``, JSON values decoded (other strings as they are)."""
    info: dict[str, Any] = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            info[key] = json.loads(value)
        except ValueError:
            info[key] = value
    return info


def load_detector(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A model file (``.pt``, :func:`ssd.model_file.load_model_file`) or an ONNX file (``.onnx``,
    :func:`load_onnx_detector`), by its suffix: ``(model, info)`` with ``info["class_names"]``."""
    if Path(path).suffix.lower() == ".onnx":
        return load_onnx_detector(path)
    from ssd.model_file import load_model_file

    return load_model_file(path, map_location=map_location)
