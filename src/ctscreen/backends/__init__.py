"""Ways to run the network: PyTorch, or OpenVINO or ONNX Runtime on the CPU.

Every backend takes one preprocessed input ``[B, 1, D, H, W]`` float32 and gives
``(logits [B], cam [B, d', h', w'])`` from one forward pass, as
:func:`ctscreen.model.forward_with_cam` does. The logit is always taken as
``cam.mean() + bias`` computed in float64 on the host: the decomposition used for
per-slice scores then holds exactly, and at reduced precision the logit keeps the
accuracy of the averaged map instead of the rounding of a bf16 head output.

* ``torch``: fp32, or bf16 autocast on a CPU with native bf16 (AVX512-BF16/AMX);
  fp16/bf16 autocast on CUDA. At reduced precision the stem stays fp32
  (:func:`ctscreen.model.stem_features` says why).
* ``openvino`` (optional extra ``pip install 'ctscreen[openvino]'``): the network
  with its activation-map output is converted once, saved as OpenVINO IR next to
  the weights (or in the user cache when that folder is read-only) and compiled
  for the CPU in stages: the stem with the f32 inference-precision hint, the rest
  with bf16 (where the CPU has it) or f32 (:func:`export_openvino` says why). The
  saved graph is
  keyed by the weight file's SHA-256, the input shape and the OpenVINO version,
  written atomically and checked against its recorded hashes before every use;
  a stale or damaged one is rebuilt.
* ``onnxruntime`` (optional extra ``pip install 'ctscreen[onnxruntime]'``): the same
  network exported once to ONNX by PyTorch's ``torch.export``-based exporter (any
  batch size, the model card's input shape), kept in the same cache under its own
  entry names and checks, and run by ONNX Runtime's CPU execution provider in fp32
  (it has no faster precision on the CPU: bf16 asked for runs fp32 with one warning).

``auto`` on the CPU picks, in order: OpenVINO when it is installed (fastest);
else PyTorch when the run is bf16 (the CPU has native bf16 or bf16 was asked),
as bf16 autocast beats ONNX Runtime's fp32; else ONNX Runtime when it is
installed, as it beats PyTorch's fp32; else PyTorch. Measured on a 2-core AMD
EPYC with AVX512-BF16, one forward at (96, 192, 192): OpenVINO bf16 1.7 s,
PyTorch bf16 2.6 s, OpenVINO fp32 3.3 s, ONNX Runtime fp32 3.8 s, PyTorch fp32
4.9 s. Off the CPU ``auto`` is PyTorch.
A speed option never fails a run: when OpenVINO or ONNX Runtime cannot export,
load or run, the scorer logs one warning and goes on with PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..hardware import FP16_ON_CPU, cpu_supports_bf16
from .base import BACKENDS, TITLES, Backend, cam_network, logits_from_cam
from .export_cache import (
    EXPORT_FORMAT_VERSION,
    ExportRecipe,
    cached_export,
    export_cache_root,
    export_key,
    user_cache_dir,
)
from .onnx_backend import (
    OnnxRuntimeBackend,
    export_onnx,
    load_onnxruntime,
    onnx_exporter_versions,
    onnxruntime_precision,
    onnxruntime_recipe,
    onnxruntime_version,
)
from .openvino_backend import (
    OpenVinoBackend,
    block_converter_telemetry,
    export_openvino,
    finite_half,
    half_boundaries,
    load_openvino,
    openvino_hint,
    openvino_recipe,
    openvino_version,
    stage_networks,
)
from .torch_backend import TorchBackend

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "EXPORT_FORMAT_VERSION",
    "Backend",
    "ExportRecipe",
    "FallbackBackend",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "TorchBackend",
    "block_converter_telemetry",
    "cached_export",
    "cam_network",
    "export_cache_root",
    "export_key",
    "export_onnx",
    "export_openvino",
    "finite_half",
    "half_boundaries",
    "load_onnxruntime",
    "load_openvino",
    "logits_from_cam",
    "make_backend",
    "onnx_exporter_versions",
    "onnxruntime_precision",
    "onnxruntime_recipe",
    "onnxruntime_version",
    "openvino_hint",
    "openvino_recipe",
    "openvino_version",
    "resolve_backend",
    "stage_networks",
    "user_cache_dir",
]


def resolve_backend(name: str, device: torch.device, precision: str = "auto") -> str:
    """Turn ``auto`` into the fastest backend installed for ``device`` and ``precision``.

    On the CPU: ``openvino`` when installed; else ``torch`` when the run is bf16
    (``precision`` bf16, or ``auto`` on a CPU with native bf16); else
    ``onnxruntime`` when installed; else ``torch``. Elsewhere ``torch``. See the
    module docstring for the timings behind this order.

    Args:
        name: a name from :data:`BACKENDS`.
        device: where the network runs.
        precision: the run's precision (``auto`` when not yet resolved).

    Raises:
        ConfigError: an unknown name, or OpenVINO or ONNX Runtime asked for a GPU device.
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name in ("openvino", "onnxruntime") and device.type != "cpu":
        raise ConfigError(
            f"the {TITLES[name]} backend runs on the CPU, not {device}; use --device cpu or "
            "--backend torch."
        )
    if name != "auto":
        return name
    if device.type != "cpu":
        return "torch"
    if openvino_version() is not None:
        return "openvino"
    if precision == "bf16" or (precision == "auto" and cpu_supports_bf16()):
        return "torch"
    if onnxruntime_version() is not None:
        return "onnxruntime"
    return "torch"


@dataclass
class FallbackBackend:
    """Runs ``primary``; on its first failure warns once and runs ``fallback()`` from then on.

    Attributes:
        primary: the fast backend.
        fallback: makes the PyTorch backend when needed.
    """

    primary: Backend
    fallback: Callable[[], Backend]
    _active: Backend | None = field(default=None, init=False, repr=False)

    @property
    def active(self) -> Backend:
        return self._active if self._active is not None else self.primary

    @property
    def name(self) -> str:
        return self.active.name

    @property
    def precision(self) -> str:
        return self.active.precision

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and activation maps from the active backend (see :class:`Backend`)."""
        if self._active is not None:
            return self._active.run(x)
        try:
            return self.primary.run(x)
        except ConfigError:
            raise
        except Exception as exc:  # a speed option must never fail the run
            log.warning(
                "the %s backend failed (%s: %s); running with PyTorch from now on",
                self.primary.name,
                type(exc).__name__,
                exc,
            )
            self._active = self.fallback()
            return self._active.run(x)


def make_backend(
    model: nn.Module,
    *,
    device: torch.device,
    backend: str = "auto",
    precision: str = "fp32",
    weights_sha256: str = "",
    weights_path: Path | None = None,
    shape: tuple[int, int, int],
    cache_root: Path | None = None,
) -> Backend:
    """The backend that will run ``model``, falling back to PyTorch when the choice fails.

    Args:
        model: the r3d_18 on ``device``, eval mode.
        device: where the network runs.
        backend: ``auto``, ``torch``, ``openvino`` or ``onnxruntime``.
        precision: a concrete precision (``fp32``, ``bf16``, ``fp16``) for ``device``.
        weights_sha256: SHA-256 of the checkpoint (keys the export cache).
        weights_path: the checkpoint file (the export cache goes beside it).
        shape: the static input ``(D, H, W)`` of the model card.
        cache_root: export cache folder; default beside the weights or in the user cache.

    Returns:
        A backend; OpenVINO and ONNX Runtime ones are wrapped so that a failure
        at run time switches to PyTorch with one warning.

    Raises:
        ConfigError: an unknown backend, OpenVINO or ONNX Runtime asked for a GPU,
            or fp16 on the CPU.
    """
    chosen = resolve_backend(backend, device, precision)

    def torch_backend() -> Backend:
        return TorchBackend(model, device, precision)

    if chosen == "torch":
        return torch_backend()
    if precision == "fp16":
        raise ConfigError(FP16_ON_CPU)
    title = TITLES[chosen]
    version = _runtime_version(chosen)
    if version is None:
        log.warning(
            "%s is not installed (pip install 'ctscreen[%s]'); running with PyTorch", title, chosen
        )
        return torch_backend()
    load = load_openvino if chosen == "openvino" else load_onnxruntime
    try:
        primary = load(
            model,
            weights_sha256=weights_sha256 or _model_digest(model),
            weights_path=weights_path,
            shape=shape,
            precision=precision,
            cache_root=cache_root,
        )
    except Exception as exc:  # a speed option must never fail the run
        reason = exc.message if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        log.warning("%s could not load the model (%s); running with PyTorch", title, reason)
        return torch_backend()
    log.info("running the network with %s %s (%s)", title, version, primary.precision)
    return FallbackBackend(primary, torch_backend)


def _runtime_version(backend: str) -> str | None:
    """The installed version of ``backend``'s runtime (``openvino`` or ``onnxruntime``), or None."""
    return openvino_version() if backend == "openvino" else onnxruntime_version()


def _model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's tensors, for a model that came from no file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
