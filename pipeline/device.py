"""Where a run computes and in which precision, decided once and said out loud.

- Mixed precision: a section's ``mixed_precision`` key is optional. Unset, Accelerate
  decides (``accelerate config``, ``accelerate launch --mixed_precision`` or the
  ``ACCELERATE_MIXED_PRECISION`` variable, else full precision). Set, it wins only where the
  launcher said nothing different: a launcher asking for another low precision is a
  :class:`~pipeline.config.ConfigError` naming both. ``accelerate launch`` sets ``no`` when
  nobody chose anything, so a launcher's ``no`` gives way to the section with a warning.
- The device and precision are logged when a run starts, and a machine with NVIDIA GPUs
  that torch cannot use (a CPU-only build, a driver too old for torch's CUDA) gets a loud
  warning instead of a quiet run on the CPU.
- ``compile`` (a torch.compile backend) is resolved against the launcher's ``--dynamo_backend``
  the same way; ``tf32`` sets torch's float32 precision for CUDA matmuls and convolutions.
"""

from __future__ import annotations

import glob
import logging
import os

import torch

from pipeline.config import ConfigError

log = logging.getLogger("pipeline.device")

#: The variable through which Accelerate's launcher (and its config file) passes the precision.
PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
#: The variable through which it passes the torch.compile backend (``--dynamo_backend``).
DYNAMO_ENV = "ACCELERATE_DYNAMO_BACKEND"


def resolve_mixed_precision(section_value: str | None, key: str) -> str | None:
    """The ``mixed_precision`` to give ``Accelerator`` (None: Accelerate's own choice)."""
    return _resolve(section_value, key, PRECISION_ENV, "accelerate launch --mixed_precision")


def resolve_compile(section_value: str | None, key: str) -> str | None:
    """The ``dynamo_backend`` (torch.compile backend) to give ``Accelerator`` (None: the launcher's).

    Raises:
        ConfigError: a backend Accelerate does not know (its own error is a traceback), or one
            that differs from the launcher's.
    """
    from accelerate.utils import DynamoBackend

    if section_value is not None and section_value.upper() not in DynamoBackend.__members__:
        known = ", ".join(m.lower() for m in DynamoBackend.__members__)
        raise ConfigError(f"{key}: unknown torch.compile backend {section_value!r}; Accelerate knows: {known}")
    return _resolve(section_value, key, DYNAMO_ENV, "accelerate launch --dynamo_backend")


def _resolve(section_value: str | None, key: str, env: str, flag: str) -> str | None:
    """A section's choice against the launcher's (``env``): the same, or the launcher's 'no'
    (what ``accelerate launch`` passes when nobody chose) gives way; another choice is an error."""
    launcher = os.environ.get(env)
    if section_value is None or launcher is None or launcher.lower() == section_value.lower():
        return section_value
    if launcher.lower() == "no":
        log.warning(
            "%s is %r; the launcher says 'no' (accelerate launch's value when nothing is chosen): using %r",
            key, section_value, section_value,
        )
        return section_value
    raise ConfigError(
        f"{key} is {section_value!r} but the launcher asks for {launcher!r} (accelerate config, "
        f"{flag} or {env}): make them agree, or remove {key} to use the launcher's"
    )


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) for float32 matmuls and convolutions on NVIDIA Ampere and later, or
    IEEE float32; no effect on a CPU. torch's per-backend setting (its older ``allow_tf32`` flags
    and ``set_float32_matmul_precision`` mixed with it are an error in torch)."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def unusable_gpus(dev_glob: str = "/dev/nvidia[0-9]*") -> str | None:
    """Why this machine's NVIDIA GPUs can't be used by torch, or None (none found, or usable)."""
    if torch.cuda.is_available():
        return None
    devices = sorted(glob.glob(dev_glob))
    if not devices:
        return None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        reason = f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot initialise CUDA"
        try:
            torch.cuda.init()
        except Exception as e:  # the driver's own words, e.g. "found no NVIDIA driver" or too old
            reason += f": {str(e).strip().splitlines()[0]}"
    return f"{len(devices)} NVIDIA GPU device(s) found ({', '.join(devices[:4])}) but {reason}"


def report(accelerator, what: str) -> None:
    """Log the device, process count and precision of a run; warn loudly about unusable GPUs."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log.info(
        "%s on %s (%s), %d process(es), mixed precision %s",
        what, device, name, accelerator.num_processes, accelerator.mixed_precision,
    )
    problem = unusable_gpus()
    if problem and accelerator.is_main_process:
        log.warning("!" * 80)
        log.warning("NOT USING THE GPUs: %s; running on the CPU. Install a torch build for this machine's "
                    "driver (https://pytorch.org/get-started/locally/)", problem)
        log.warning("!" * 80)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state (``AcceleratorState``, ``PartialState``,
    ``GradientState``), so that the next ``Accelerator`` made in this process is set up by its
    own settings (mixed precision, ...) instead of clashing with an earlier one's: for stages
    that run other stages' code in one process (prune: evaluate, train, evaluate), and for tests
    and benchmarks that run several."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
