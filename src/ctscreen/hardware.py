"""Where and how the network runs: device, precision and cores, decided in one place.

A leaf module: it imports nothing else from ctscreen, so every other module
(backends, the screener, training, benchmarks) can ask it without an import cycle.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Names accepted by ``--device``.
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")
#: Names accepted by ``--precision``.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
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


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_device(name: str = "auto") -> torch.device:
    """Turn a device name into a ``torch.device``.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU, logged), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ConfigError: an unknown name, or CUDA requested on a machine without it.
    """
    import torch

    key = str(name).strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("no CUDA device found; running on the CPU")
        return torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or key.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was requested but no CUDA GPU is available; "
                "use --device cpu or --device auto."
            )
        try:
            device = torch.device(key)
        except RuntimeError as exc:
            raise ConfigError(f"cannot parse device {name!r}; use cuda or cuda:N.") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
        return device
    raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}.")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision ``device`` cannot run.

    Raises:
        ConfigError: an unknown name, or fp16 on the CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}."
        )
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(FP16_ON_CPU)


def resolve_precision(precision: str, device: torch.device, *, backend: str = "auto") -> str:
    """Turn ``auto`` into a concrete precision for ``device`` and check it.

    ``auto`` means bf16 where the hardware computes it natively (CUDA with bf16
    support, or a CPU with AVX512-BF16/AMX), else fp32 (fp16 on an older GPU);
    with ONNX Runtime, which runs only fp32 on the CPU, ``auto`` is fp32.

    Raises:
        ConfigError: see :func:`check_precision`.
    """
    check_precision(precision, device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if backend == "onnxruntime":
        return "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def default_batch_size(device: torch.device) -> int:
    """Studies per forward pass on ``device``: 1 on the CPU, 4 on a GPU."""
    return 4 if device.type == "cuda" else 1


def default_readers(device: torch.device) -> int:
    """Reader threads for ``device``: 1 on the CPU; on a GPU one per 4 cores, at most 4."""
    if device.type != "cuda":
        return 1
    return max(1, min(4, usable_cores() // 4))
