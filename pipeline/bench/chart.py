"""The benchmark chart: where each model's time goes, as a PNG people can look at.

Left: one stacked bar per model (and the torchvision peer, hatched) of its batch-1
latency: pre-processing, forward, post-processing, with the total and the
post-processing share written above. Right: throughput at the larger batch.
Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend state).
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PARTS = (("pre", "pre-processing", "#8fb8de"), ("forward", "forward", "#3b6ea8"), ("post", "post-processing", "#e07b39"))


def latency_chart(models: dict[str, dict[str, Any]], peer: dict[str, Any] | None, title: str) -> bytes:
    """PNG bytes of the chart for the ``models`` section's figures (``models`` and ``peer`` as in its JSON)."""
    names = list(models)
    bars = [(name, models[name]["latency_ms"], False) for name in names]
    if peer is not None:
        bars.append(("torchvision\npeer", peer["latency_ms"], True))

    fig = Figure(figsize=(max(7.0, 1.6 * len(bars) + 4.0), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(2, len(bars)), max(1.5, 0.7 * len(names))]})

    xs = range(len(bars))
    bottoms = [0.0] * len(bars)
    for key, label, colour in PARTS:
        heights = [ms[key] for _, ms, _ in bars]
        drawn = left.bar(xs, heights, bottom=bottoms, color=colour, label=label, width=0.6)
        for patch, (_, _, is_peer) in zip(drawn, bars):
            if is_peer:
                patch.set_hatch("//")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, (_, ms, _) in zip(xs, bars):
        share = ms["post"] / ms["total"] if ms["total"] else 0.0
        left.annotate(f"{ms['total']:.1f} ms\npost {share:.0%}", (x, ms["total"]), xytext=(0, 3),
                      textcoords="offset points", ha="center", va="bottom", fontsize=8)  # fmt: skip
    left.set_xticks(list(xs), [name for name, _, _ in bars], fontsize=8)
    left.set_ylabel("latency at batch 1 (ms)")
    left.set_ylim(0, max(bottoms + [1e-3]) * 1.25)
    left.legend(fontsize=8, loc="upper left")
    left.set_title("end-to-end latency, split", fontsize=10)

    rates = [models[name]["throughput"]["images_per_s"] for name in names]
    right.bar(range(len(names)), rates, color="#5a9e6f", width=0.6)
    for x, rate in enumerate(rates):
        right.annotate(f"{rate:.0f}", (x, rate), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    right.set_xticks(list(range(len(names))), names, fontsize=8, rotation=20, ha="right")
    batch = models[names[0]]["throughput"]["batch"] if names else 0
    right.set_ylabel(f"images/s at batch {batch}")
    right.set_ylim(0, max(rates + [1e-3]) * 1.2)
    right.set_title("throughput", fontsize=10)

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
