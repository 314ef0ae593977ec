"""ONNX Runtime's convolution kernels by channel width, int8 and float: which widths to prune to.

A pruned model's speed in ONNX Runtime depends on more than its multiply-adds: the int8
kernels work on blocks of channels, and a width that is not a whole number of blocks can
cost more than a wider one. Measured on the CI machine (AVX2, one thread), a 3x3 depthwise
int8 convolution at 160x160, stride 2, took 205 us with 24 channels and 165 us with 32;
the 50% pruned SSDLite's block 2 has 24 (docs/deployment.md).

For each layer kind (``depthwise``: 3x3, ``groups = channels``; ``pointwise``: 1x1, channels
in = out), stride and width, this section builds a one-operator graph in float and in int8
(QDQ, uint8 activations, int8 weights per output channel: what :func:`ssd.quantize.quantize_int8`
writes), runs each ``repeats`` times, and reads the operator's own time from ONNX Runtime's
profiler (its kernel time: no session or Python overhead). It is not in the CPU run's
sections: ``python -m pipeline.benchmark --only kernels --out reports/kernels.json``.

JSON: ``{kind: {"stride_S": {width: {"int8_us", "float_us"}}}}`` (medians), and
``slower_than_wider``: per kind and stride, the widths whose int8 kernel takes longer than
that of a wider width in the list: the widths a pruning ``round_to`` should avoid on this CPU.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: Layer kinds: (kernel size, whether groups equal the channels).
KINDS = {"depthwise": (3, True), "pointwise": (1, False)}


def conv_graph(kind: str, channels: int, size: int, stride: int, int8: bool) -> bytes:
    """A graph of one convolution of ``kind`` on ``float32 [1, channels, size, size]``; ``int8``: in QDQ form."""
    from onnx import TensorProto, helper, numpy_helper

    kernel, depthwise = KINDS[kind]
    rng = np.random.default_rng(channels)
    shape = (channels, 1 if depthwise else channels, kernel, kernel)
    weight = rng.normal(0, 0.1, shape).astype(np.float32)
    attrs = {"group": channels if depthwise else 1, "pads": [kernel // 2] * 4, "strides": [stride, stride]}
    init = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(channels, np.float32), "b")]
    if not int8:
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)]
    else:
        scale = np.abs(weight).reshape(channels, -1).max(1) / 127
        init = [
            numpy_helper.from_array(np.round(weight / scale[:, None, None, None]).astype(np.int8), "wq"),
            numpy_helper.from_array(scale.astype(np.float32), "ws"),
            numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
            numpy_helper.from_array(np.zeros(channels, np.int32), "bq"),
            numpy_helper.from_array((scale / 255).astype(np.float32), "bs"),
            numpy_helper.from_array(np.array(1 / 255, np.float32), "xs"),
            numpy_helper.from_array(np.array(0, np.uint8), "xz"),
            numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
            numpy_helper.from_array(np.array(128, np.uint8), "yz"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
            helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"], axis=0),
            helper.make_node("Conv", ["xd", "w", "b"], ["c"], **attrs),
            helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
            helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"]),
        ]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    # IR version 8 (opset 17's): the newest onnx writes one that older ONNX Runtimes refuse.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def kernel_us(graph: bytes, channels: int, size: int, repeats: int, warmup: int, workdir: Path) -> tuple[str, float]:
    """``(operator, median time in microseconds)`` of the graph's convolution kernel over ``repeats``
    runs, one thread: the operator ONNX Runtime ran (``QLinearConv`` for a fused int8 graph)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "profile")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, channels, size, size), dtype=np.float32)
    for _ in range(warmup + repeats):
        session.run(None, {"x": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [(e["args"]["op_name"], e["dur"]) for e in events if e.get("cat") == "Node"
               and e["name"].endswith("_kernel_time") and e.get("args", {}).get("op_name") in ("Conv", "QLinearConv")]
    return kernels[-1][0], float(statistics.median(t for _, t in kernels[-repeats:]))


def slower_than_wider(times: dict[int, float]) -> list[int]:
    """The widths whose time exceeds that of some wider width: ``{24: 205, 32: 165}`` -> ``[24]``."""
    widths = sorted(times)
    return [w for i, w in enumerate(widths) if any(times[v] < times[w] for v in widths[i + 1:])]


def cpu_description() -> str:
    """The CPU's model name and whether it has VNNI (which changes ONNX Runtime's int8 kernels)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def run(kinds: Sequence[str], widths: Sequence[int], size: int, strides: Sequence[int], repeats: int,
        warmup: int) -> dict[str, Any]:
    """The figures described in the module docstring, and (strings: the setup file's) the CPU and
    the ONNX Runtime version."""
    import onnxruntime as ort

    out: dict[str, Any] = {"cpu": cpu_description(), "onnxruntime": ort.__version__,
                           "graph": f"1 x C x {size} x {size}, one thread, {repeats} runs"}
    flagged: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ssd-kernels-") as tmp:
        for kind in kinds:
            for stride in strides:
                key = f"stride_{stride}"
                row = {}
                for width in widths:
                    row[str(width)] = {}
                    for name, int8 in (("int8", True), ("float", False)):
                        op, us = kernel_us(conv_graph(kind, width, size, stride, int8), width, size, repeats, warmup,
                                           Path(tmp))
                        if int8 and op != "QLinearConv":  # the QDQ pattern was not fused: no int8 kernel ran
                            raise RuntimeError(f"ONNX Runtime ran the int8 {kind} graph as {op}, not QLinearConv")
                        row[str(width)][f"{name}_us"] = round(us, 1)
                out.setdefault(kind, {})[key] = row
                flagged.setdefault(kind, {})[key] = slower_than_wider({int(w): r["int8_us"] for w, r in row.items()})
    return {**out, "slower_than_wider": flagged}
