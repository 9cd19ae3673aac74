"""ONNX Runtime on the CPU: the network exported once to ONNX, run in fp32."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..hardware import FP16_ON_CPU, usable_cores
from .base import cam_network, logits_from_cam
from .export_cache import ExportRecipe, cached_export, export_cache_root

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

_ONNX = "model.onnx"

#: Loggers of PyTorch's ONNX exporter and the onnxscript optimiser it runs; their
#: INFO lines (passes applied, nodes removed) say nothing to a user.
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: blocked by a None entry in sys.modules
        return False


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime version, or None when it or the ONNX exporter
    (the ``onnx`` and ``onnxscript`` packages) cannot be imported."""
    try:
        import onnxruntime
    except ImportError:
        return None
    if not (_module_available("onnx") and _module_available("onnxscript")):
        return None
    return str(onnxruntime.__version__)


def onnx_exporter_versions() -> str:
    """The versions of the packages that write the ONNX graph, e.g.
    ``torch 2.14.1, onnx 1.23.2, onnxscript 0.7.2`` (keys the export cache)."""
    parts = []
    for package in ("torch", "onnx", "onnxscript"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package} none")
    return ", ".join(parts)


@contextmanager
def _quiet_loggers(names: tuple[str, ...], level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of the loggers ``names`` to ``level`` for the duration of the block."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


def export_onnx(model: nn.Module, *, shape: tuple[int, int, int], out_dir: Path) -> None:
    """Export ``model`` with its activation-map output to ONNX (fp32, weights inside the file).

    It uses PyTorch's ``torch.export``-based exporter (``dynamo=True``, which needs
    ``onnxscript``): the TorchScript exporter is deprecated, and both give the same
    graph here. The graph takes ``x [N, 1, D, H, W]`` for any batch ``N`` and gives
    ``logits [N]`` and ``cam [N, d', h', w']``.

    Args:
        model: the r3d_18 (on the CPU, eval mode).
        shape: the static input ``(D, H, W)``.
        out_dir: folder that receives ``model.onnx`` (also any report of a failed export).
    """
    import torch

    example = torch.zeros((1, 1, *shape))
    with torch.no_grad(), _quiet_loggers(_EXPORTER_LOGGERS):
        torch.onnx.export(
            cam_network(model),
            (example,),
            str(out_dir / _ONNX),
            dynamo=True,
            verbose=False,  # else it prints each step to stdout
            input_names=["x"],
            output_names=["logits", "cam"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,  # one file (the weights are far below ONNX's 2 GB limit)
            artifacts_dir=str(out_dir),
        )


def onnxruntime_recipe() -> ExportRecipe:
    """How the ONNX graph is made: one ``model.onnx`` with the weights inside."""
    return ExportRecipe(
        "onnxruntime",
        export_onnx,
        (_ONNX,),
        onnxruntime_version() or "none",
        onnx_exporter_versions(),
    )


@dataclass
class OnnxRuntimeBackend:
    """An ONNX Runtime session on the CPU, fp32, any batch of the static shape.

    Attributes:
        session: the ``onnxruntime.InferenceSession`` (input ``x``; outputs logits, cam).
        shape: the input ``(D, H, W)`` the graph was exported for.
        bias: the head bias (logits are ``cam.mean() + bias``).
        from_cache: the graph was read from the export cache, not exported now.
    """

    session: Any
    shape: tuple[int, int, int]
    bias: float
    from_cache: bool = False
    precision: str = field(default="fp32", init=False)
    name: str = field(default="onnxruntime", init=False)

    def __post_init__(self) -> None:
        self._input = self.session.get_inputs()[0].name
        self._cam_output = self.session.get_outputs()[1].name

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[B]`` and activation maps ``[B, d', h', w']`` for ``x [B, 1, D, H, W]``.

        Raises:
            ConfigError: ``x`` is not ``[B, 1, *shape]``.
        """
        if x.ndim != 5 or tuple(x.shape[1:]) != (1, *self.shape):
            raise ConfigError(
                f"the ONNX Runtime model takes [B, 1, {', '.join(map(str, self.shape))}] but got "
                f"{list(x.shape)}; preprocess with the model card's settings."
            )
        feed = {self._input: np.ascontiguousarray(x, dtype=np.float32)}
        (cam,) = self.session.run([self._cam_output], feed)
        cam = np.asarray(cam, dtype=np.float32)
        return logits_from_cam(cam, self.bias), cam


def onnxruntime_precision(precision: str) -> str:
    """The precision ONNX Runtime runs at for ``precision``: fp32, its only fast one on the CPU.

    bf16 is a speed choice and fp32 is at least as accurate, so bf16 runs as fp32
    with one warning rather than stopping the run.

    Raises:
        ConfigError: ``precision`` is fp16 (not run on the CPU).
    """
    if precision == "fp16":
        raise ConfigError(FP16_ON_CPU)
    if precision == "bf16":
        log.warning(
            "ONNX Runtime runs fp32 on the CPU, not bf16; running fp32 "
            "(use --backend torch or openvino for bf16)"
        )
    return "fp32"


def onnxruntime_session(path: Path) -> Any:
    """An ONNX Runtime session for the graph at ``path``: CPU execution provider, every
    graph optimisation, one intra-op thread per usable core, telemetry off."""
    import onnxruntime as ort

    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = usable_cores()
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def load_onnxruntime(
    model: nn.Module,
    *,
    weights_sha256: str,
    weights_path: Path | None,
    shape: tuple[int, int, int],
    precision: str,
    cache_root: Path | None = None,
) -> OnnxRuntimeBackend:
    """Export (or reuse) ``model`` as ONNX and open it with ONNX Runtime on the CPU.

    Args:
        model: the r3d_18 (on the CPU, eval mode).
        weights_sha256: SHA-256 of the checkpoint file (keys the export cache).
        weights_path: the checkpoint file (the cache goes beside it when writable).
        shape: the static input ``(D, H, W)`` of the model card.
        precision: ``fp32``, ``bf16`` (runs fp32, with a warning) or ``auto``.
        cache_root: cache folder; default :func:`export_cache_root` of ``weights_path``.

    Returns:
        The backend, ready to run.

    Raises:
        ImportError: ONNX Runtime or the ONNX exporter is not installed.
        ConfigError: ``precision`` is fp16, or no cache folder can be written.
    """
    onnxruntime_precision(precision)
    root = cache_root if cache_root is not None else export_cache_root(weights_path)
    graph, from_cache = cached_export(
        model,
        weights_sha256=weights_sha256,
        shape=tuple(shape),
        cache_root=root,
        weights_path=weights_path,
        recipe=onnxruntime_recipe(),
    )
    bias = float(model.fc.bias.detach().float().cpu()[0])
    return OnnxRuntimeBackend(
        session=onnxruntime_session(graph), shape=tuple(shape), bias=bias, from_cache=from_cache
    )
