"""Where and how the network runs: device, precision and cores, decided in one place.

Which precision and backend run fastest is not decided here: no CPU flag
predicts it, so ``auto`` is measured (:mod:`ctscreen.backends.choice`). What is
here is capability: fp16 runs only on a GPU.

A leaf module: it imports nothing else from ctscreen, so every other module
(backends, the screener, training, benchmarks) can ask it without an import cycle.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Names accepted by ``--device``.
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")
#: Names accepted by ``--precision``.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
FP16_ON_CPU = "fp16 runs only on a GPU; use --precision bf16 or fp32 on the CPU."


def usable_cores() -> int:
    """How many CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``"unknown CPU"`` where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def check_device_name(name: str) -> str:
    """The device name ``--device`` was given, lower-cased, if its form is one ctscreen
    knows; checked without importing torch, so that a typo is refused at once.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (N a whole number).

    Returns:
        The name, stripped and lower-cased.

    Raises:
        ConfigError: any other name (whether CUDA is there is :func:`select_device`'s check).
    """
    key = str(name).strip().lower()
    if key in ("auto", "cpu", "cuda"):
        return key
    if key.startswith("cuda:"):
        if key[5:].isdigit():
            return key
        raise ConfigError(f"cannot parse device {name!r}; use cuda or cuda:N.")
    raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}.")


def select_device(name: str = "auto") -> torch.device:
    """Turn a device name into a ``torch.device``.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU, logged), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ConfigError: an unknown name, or CUDA requested on a machine without it.
    """
    import torch

    key = check_device_name(name)
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("no CUDA device found; running on the CPU")
        return torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    # "cuda" or "cuda:N", the only forms check_device_name lets through.
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was requested but no CUDA GPU is available; "
            "use --device cpu or --device auto."
        )
    device = torch.device(key)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist; this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)."
        )
    return device


@dataclass(frozen=True)
class HostCpu:
    """The CPU, named without PyTorch: what a scorer running an exported bundle uses for
    a device (code that asks a device only reads its ``type``, ``index`` and ``str``)."""

    type: str = "cpu"
    index: int | None = None

    def __str__(self) -> str:
        return "cpu"


def bundle_device(name: object = "auto") -> HostCpu:
    """The device of an exported bundle, which OpenVINO runs on the CPU.

    Raises:
        ConfigError: a device other than ``auto`` or ``cpu``.
    """
    key = str(name).strip().lower()
    if key in ("auto", "cpu"):
        return HostCpu()
    raise ConfigError(
        f"an exported bundle runs on the CPU with OpenVINO, not on {name!r}; use --device cpu "
        "or auto, or pass the .pth checkpoint to run on a GPU."
    )


def default_batch_size(device: torch.device | HostCpu) -> int:
    """Studies per forward pass on ``device``: 1 on the CPU, 4 on a GPU."""
    return 4 if device.type == "cuda" else 1


def default_readers(device: torch.device | HostCpu) -> int:
    """Reader threads for ``device``: 1 on the CPU; on a GPU one per 4 cores, at most 4."""
    if device.type != "cuda":
        return 1
    return max(1, min(4, usable_cores() // 4))
