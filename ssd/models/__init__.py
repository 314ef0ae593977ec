"""Detector architectures and their builders.

:func:`build_model` rebuilds any model from the ``arch`` dict it carries
(``model.arch``: the builder's name and plain-data arguments), which is what
model files store.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ssd.models.lstm_ssd import LSTMSSD, lstm_ssd_mobilenet_v2, lstm_ssd_mobilenet_v3_large
from ssd.models.mobilenet_v3 import ssdlite_mobilenet_v3_large
from ssd.models.ssd import SSD
from ssd.models.ssds_mobilenet_v2 import ssds_ssdlite_mobilenet_v2
from ssd.models.ssdlite import ssdlite_mobilenet_v2
from ssd.models.vgg import ssd300_vgg16

BUILDERS: dict[str, Callable[..., SSD]] = {
    "ssdlite_mobilenet_v2": ssdlite_mobilenet_v2,
    "ssd300_vgg16": ssd300_vgg16,
    "lstm_ssd_mobilenet_v2": lstm_ssd_mobilenet_v2,
    "ssdlite_mobilenet_v3_large": ssdlite_mobilenet_v3_large,
    "lstm_ssd_mobilenet_v3_large": lstm_ssd_mobilenet_v3_large,
    "ssds_ssdlite_mobilenet_v2": ssds_ssdlite_mobilenet_v2,
}


def build_model(arch: Mapping[str, Any], **extra: Any) -> SSD:
    """Build the model an ``arch`` dict describes (``{"name": builder, **arguments}``)."""
    args = dict(arch)
    name = args.pop("name", None)
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](**args, **extra)


__all__ = ["SSD", "LSTMSSD", "BUILDERS", "build_model", "ssdlite_mobilenet_v2", "ssd300_vgg16", "lstm_ssd_mobilenet_v2",
           "ssdlite_mobilenet_v3_large", "lstm_ssd_mobilenet_v3_large"]
