"""``model.init_weights``: start the model a section builds from another model file's weights.

The user asks for *this* architecture, started from *that* model's weights. Name-and-shape
matching alone (:func:`ssd.weights.loading.load_matching`) would also accept a file of another
architecture, width or a pruned model: a few tensors match, the rest start random, and the run
trains from a mostly random network. So only the differences a fine-tune means are accepted:

- other classes: the class-dependent tensors (those whose shape follows the class count) start
  fresh. Other class *names* with the same count start fresh too; copying them would make the
  new model call a car by the file's first class name;
- an LSTM-SSD from its frame model: the temporal cells (``temporal.*``) start fresh; an LSTM-SSD
  file into a frame model leaves its cells unused.

Anything else left fresh or unused is a :class:`~pipeline.stage.StageError` naming the layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.stage import StageError
from ssd.models import build_model
from ssd.weights.loading import load_matching

_TEMPORAL = "temporal."


def class_dependent_keys(arch: dict[str, Any]) -> set[str]:
    """The state-dict keys of the ``arch`` model whose shapes follow its class count (built on
    the meta device twice: no memory, no weights)."""
    with torch.device("meta"):
        shapes = [
            {k: v.shape for k, v in build_model({**arch, "num_classes": n}).state_dict().items()}
            for n in (arch["num_classes"], arch["num_classes"] + 1)
        ]
    return {k for k, shape in shapes[0].items() if shapes[1].get(k) != shape}


def load_init_weights(model: nn.Module, arch: dict[str, Any], classes: list[str], path: str,
                      source: nn.Module, info: dict[str, Any]) -> None:
    """Copy ``source``'s weights (the model file ``path``, its ``info``) into ``model`` (built
    from ``arch`` for ``classes``), and log what loaded; StageError if they don't fit."""
    state = source.state_dict()
    by_design: dict[str, str] = {}
    if info["class_names"] != classes:  # (two meta-device builds; the same classes need none)
        per_class = class_dependent_keys(arch)
        state = {k: v for k, v in state.items() if k not in per_class}
        by_design.update({k.rsplit(".", 1)[0]: "other classes" for k in per_class})
    cells = [k for k in model.state_dict() if k.startswith(_TEMPORAL)]
    by_design.update({k.rsplit(".", 1)[0]: "the LSTM-SSD's cell" for k in cells})
    report = load_matching(model, state, path, by_design=by_design)
    fresh = sorted(layer for layer in report.fresh if layer not in report.by_design)
    unused = [k for k in report.unused if not k.startswith(_TEMPORAL)]
    if fresh or unused:
        held, wanted = info.get("arch", {}), {k: v for k, v in arch.items() if k != "num_classes"}
        differ = sorted(k for k in wanted if k in held and held[k] != wanted[k] and k != "input_norm")
        what = [f"{len(fresh)} of this model's layers would start random ({', '.join(fresh[:3])}"
                f"{', ...' if len(fresh) > 3 else ''})"] if fresh else []
        what += [f"{len(unused)} of the file's tensors fit nowhere ({', '.join(unused[:3])}"
                 f"{', ...' if len(unused) > 3 else ''})"] if unused else []
        keys = "".join(f"; the file's {k} is {held[k]}, here {wanted[k]}" for k in differ[:3])
        raise StageError(
            f"{path}: its {held.get('name', 'model')} doesn't fit the {arch['name']} this section builds: "
            f"{' and '.join(what)}{keys}. init_weights takes a model of the same architecture and widths (other "
            "classes, or the frame model of an LSTM-SSD); to go on training a model as it is (a pruned one too), "
            "use model.from_file"
        )
    report.log()
