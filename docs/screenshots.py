"""Render charts of `dvc plots show` to PNG for the docs (docs/images/).

Usage, in a project where `dvc repro` has run::

    pip install vl-convert-python      # once; not a dependency of the project
    python docs/screenshots.py [CHART_ID ...]

Each chart is the Vega-Lite spec DVC builds from dvc.yaml (`dvc plots show --json`),
rendered as DVC's HTML page would show it (vl-convert runs the Vega renderer without a
browser). Without arguments: the PR chart and the confusion matrix of the VOC evaluation,
the mAP of every model, and the VOC model's training loss and validation mAP.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

DEFAULT = ["plots/pr-ssdlite_voc.csv", "plots/confusion-ssdlite_voc.csv", "mAP per model", "train_voc loss",
           "train_voc validation mAP"]


def main(argv: list[str]) -> int:
    import vl_convert

    shown = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], capture_output=True, text=True,
                                      check=True).stdout)
    out = Path(__file__).parent / "images"
    out.mkdir(exist_ok=True)
    for chart in argv or DEFAULT:
        entries = shown["data"].get(chart)
        if not entries or entries[0]["type"] != "vega":
            print(f"error: {chart}: no such chart in `dvc plots show` (ids: {', '.join(shown['data'])})",
                  file=sys.stderr)
            return 2
        spec = entries[0]["content"]
        png = vl_convert.vegalite_to_png(json.dumps(spec), scale=2)
        path = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", chart.removeprefix("plots/")).removesuffix(".csv") + ".png")
        path.write_bytes(png)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
