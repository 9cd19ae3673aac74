"""OpenVINO on the CPU: the network as IR graphs run in stages, fp32 or bf16."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..hardware import FP16_ON_CPU
from .base import logits_from_cam
from .export_cache import ExportRecipe, cached_export, export_cache_root

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: The OpenVINO graphs, run one after another; the last one gives (logits, cam).
_OV_STAGES = ("stem", "layer1", "layer2", "layer3", "model")

#: Input shape used to trace the network for conversion; the real shape is set after.
_TRACE_SHAPE = (1, 1, 16, 32, 32)


def openvino_version() -> str | None:
    """The installed OpenVINO version, or None when it cannot be imported."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def block_converter_telemetry() -> None:
    """Keep OpenVINO's model converter from sending usage telemetry.

    ctscreen runs on hospital machines and must not contact anyone. ``import
    openvino`` imports the ``openvino_telemetry`` package when it can (and counts the
    run in ``~/intel/stats``) and otherwise uses its own no-op stub; marking that
    package as unimportable selects the stub. ``import ctscreen`` already does it
    (``ctscreen/__init__.py``), before any ``import openvino``; this repeats it for
    code that reached here another way. It is done only when the package has not
    been imported already by someone else.
    """
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]


def stage_networks(model: nn.Module) -> list[nn.Module]:
    """The network cut into the OpenVINO stages: stem, layer1, layer2, layer3, and
    layer4 with the head giving ``(logits, cam)``. They share ``model``'s parameters."""
    from torch import nn

    from ..model import head_with_cam

    class LastStage(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return head_with_cam(self.inner, self.inner.layer4(x))

    stages = [model.stem, model.layer1, model.layer2, model.layer3, LastStage(model)]
    return [stage.eval() for stage in stages]


def export_openvino(model: nn.Module, *, shape: tuple[int, int, int], out_dir: Path) -> None:
    """Convert ``model`` to OpenVINO IR (fp32 weights) as graphs run one after another.

    OpenVINO's CPU plugin gives one inference precision to the whole of a compiled
    graph (and keeps only its tail, after the last convolution, in fp32), so the
    network is cut where fp32 matters: ``stem.xml`` runs in fp32 (see
    :func:`ctscreen.model.stem_features`), and the cuts after layer1, layer2 and
    layer3 keep the end of each residual stage and its output in fp32. Measured on
    three trained demo models over 160 synthetic studies each, bf16 moved
    probabilities by up to 0.022 as one graph, 0.015 with only the stem apart and
    0.009 cut this way, for 1.94 s per forward at (96, 192, 192) against 1.65 s
    (:func:`half_boundaries` then wins most of that time back).

    Args:
        model: the r3d_18 (on the CPU, eval mode).
        shape: the static input ``(D, H, W)``; the stem takes ``[1, 1, D, H, W]``.
        out_dir: folder that receives ``<stage>.xml`` and ``<stage>.bin`` for each
            stage of ``_OV_STAGES``.
    """
    block_converter_telemetry()
    import openvino as ov
    import torch

    example = torch.zeros(_TRACE_SHAPE)
    input_shape = ov.PartialShape([1, 1, *shape])
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing is what OpenVINO's PyTorch frontend reads; its deprecation notice
        # is of no use to a user, and skipping the trace check saves three forwards.
        warnings.simplefilter("ignore", FutureWarning)
        for name, stage in zip(_OV_STAGES, stage_networks(model), strict=True):
            converted = ov.convert_model(
                torch.jit.trace(stage, example, check_trace=False),
                example_input=example,
                input=[input_shape],
            )
            ov.save_model(converted, str(out_dir / f"{name}.xml"), compress_to_fp16=False)
            example = stage(example) if name != _OV_STAGES[-1] else example
            input_shape = converted.output(0).get_partial_shape()


def openvino_recipe() -> ExportRecipe:
    """How the OpenVINO graphs are made: one IR (xml + bin) per stage, the last stage first."""
    files = tuple(f"{stage}.{ext}" for stage in reversed(_OV_STAGES) for ext in ("xml", "bin"))
    return ExportRecipe("openvino", export_openvino, files, openvino_version() or "none")


@dataclass
class OpenVinoBackend:
    """Compiled OpenVINO graphs on the CPU, run one after another; static shape, batch 1.

    Attributes:
        stages: the compiled graphs in order (see :func:`export_openvino`); the last
            one's outputs are (logits, cam).
        shape: the input ``(D, H, W)`` they were compiled for.
        bias: the head bias (logits are ``cam.mean() + bias``).
        precision: ``fp32`` or ``bf16``: the precision of every stage but the stem
            (which is always fp32); in bf16 the stem and layer1 hand their outputs
            on as fp16 (see :func:`half_boundaries`).
        from_cache: the graphs were read from the export cache, not converted now.
    """

    stages: list[Any]
    shape: tuple[int, int, int]
    bias: float
    precision: str
    from_cache: bool = False
    name: str = field(default="openvino", init=False)

    def __post_init__(self) -> None:
        self._requests = [stage.create_infer_request() for stage in self.stages]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[B]`` and activation maps ``[B, d', h', w']`` for ``x [B, 1, D, H, W]``.

        Raises:
            ConfigError: ``x`` is not ``[B, 1, *shape]``.
        """
        if x.ndim != 5 or tuple(x.shape[1:]) != (1, *self.shape):
            raise ConfigError(
                f"the OpenVINO model takes [B, 1, {', '.join(map(str, self.shape))}] but got "
                f"{list(x.shape)}; preprocess with the model card's settings."
            )
        first, *rest = self._requests
        cams = []
        for item in np.ascontiguousarray(x, dtype=np.float32):
            first.infer({0: item[None]})
            previous = first
            for request in rest:
                # Each stage reads the previous one's output where it lies: no copy.
                handed_on = previous.get_output_tensor(0)
                if not finite_half(handed_on.data):
                    raise FloatingPointError(
                        "an activation went beyond fp16's range between two OpenVINO stages"
                    )
                request.set_input_tensor(handed_on)
                request.infer()
                previous = request
            cam = previous.get_output_tensor(1).data
            cams.append(np.array(cam, dtype=np.float32, copy=True))
        cam = np.concatenate(cams, axis=0)
        return logits_from_cam(cam, self.bias), cam


#: In a bf16 run, the stages whose output is handed on as fp16 instead of fp32.
_F16_OUTPUTS = ("stem", "layer1")


def half_boundaries(graphs: list[Any]) -> list[Any]:
    """``graphs`` (one per stage of ``_OV_STAGES``) with the outputs of the stem and
    layer1 handed on as fp16, for a bf16 run.

    Those two are the largest tensors of the network (64 channels at half the
    input's height and width, 226 MB in fp32 at (96, 192, 192)), and writing them
    in fp32 and reading them back cost 0.44 s of a 2.1 s forward on a 2-core
    EPYC. fp16 keeps 11 significant bits to bf16's 8, so the next stage still
    starts from values finer than it computes with: on three trained demo models
    over 160 synthetic studies each, the largest probability move against fp32
    went from 0.0091/0.0057/0.0043 to 0.0098/0.0061/0.0041 while the forward
    took 1.68 s. A value beyond fp16's range (65504) becomes infinite, and a later
    stage would turn that into a wrong but finite answer, so the backend checks
    both tensors (:func:`finite_half`, ~13 ms each) and hands the run to PyTorch
    if that ever happens.
    """
    from openvino import Type
    from openvino.preprocess import PrePostProcessor

    out = []
    previous_half = False
    for stage, graph in zip(_OV_STAGES, graphs, strict=True):
        steps = PrePostProcessor(graph)
        if previous_half:
            steps.input().tensor().set_element_type(Type.f16)
        previous_half = stage in _F16_OUTPUTS
        if previous_half:
            steps.output(0).tensor().set_element_type(Type.f16)
        out.append(steps.build())
    return out


def finite_half(values: np.ndarray) -> bool:
    """False when ``values`` is fp16 and holds an infinity or NaN (a value past fp16's
    range); True for any other dtype. Reads the bits: 13 ms for 56M values, where
    ``np.isfinite`` takes 65 ms."""
    if values.dtype != np.float16:
        return True
    magnitude_bits = values.view(np.uint16) & np.uint16(0x7FFF)
    return bool(magnitude_bits.max(initial=0) < 0x7C00)  # 0x7C00: the exponent of inf/NaN


def openvino_bf16_capable() -> bool:
    """True when OpenVINO's CPU plugin reports bf16 among this CPU's capabilities
    (what it *can* run; whether bf16 is *faster* is left to measurement)."""
    try:
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # not installed, or a plugin that cannot say
        return False
    return "BF16" in [str(c).upper() for c in capabilities]


def openvino_hint(precision: str) -> str:
    """The CPU inference-precision hint for ``precision`` (``bf16`` or ``f32``).

    Raises:
        ConfigError: ``precision`` is fp16 (not run on the CPU) or not one OpenVINO's
            staged graphs run (INT8 has its own graph).
    """
    if precision == "fp16":
        raise ConfigError(FP16_ON_CPU)
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"the staged OpenVINO graphs run fp32 or bf16, not {precision!r}.")
    return "bf16" if precision == "bf16" else "f32"


def compile_for_latency(core: Any, graph: Any, inference_precision: str) -> Any:
    """``graph`` compiled for the CPU, one request at a time, computing in
    ``inference_precision`` (``f32`` or ``bf16``) where it is not quantized."""
    return core.compile_model(
        graph,
        "CPU",
        {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"},
    )


def load_openvino(
    model: nn.Module,
    *,
    weights_sha256: str,
    weights_path: Path | None,
    shape: tuple[int, int, int],
    precision: str,
    cache_root: Path | None = None,
) -> OpenVinoBackend:
    """Export (or reuse) and compile ``model`` for the CPU with OpenVINO.

    Args:
        model: the r3d_18 (on the CPU, eval mode).
        weights_sha256: SHA-256 of the checkpoint file (keys the export cache).
        weights_path: the checkpoint file (the cache goes beside it when writable).
        shape: the static input ``(D, H, W)`` of the model card.
        precision: ``fp32`` or ``bf16`` (OpenVINO runs bf16 as f32 on a CPU
            without it, and the backend then says fp32).
        cache_root: cache folder; default :func:`export_cache_root` of ``weights_path``.

    Returns:
        The backend, ready to run.

    Raises:
        ImportError: OpenVINO is not installed.
        ConfigError: ``precision`` is fp16, or no cache folder can be written.
    """
    hint = openvino_hint(precision)
    root = cache_root if cache_root is not None else export_cache_root(weights_path)
    xml, from_cache = cached_export(
        model,
        weights_sha256=weights_sha256,
        shape=tuple(shape),
        cache_root=root,
        weights_path=weights_path,
        recipe=openvino_recipe(),
    )
    bias = float(model.fc.bias.detach().float().cpu()[0])
    return compile_stages(
        xml.parent, shape=tuple(shape), bias=bias, hint=hint, from_cache=from_cache
    )


def compile_stages(
    folder: Path, *, shape: tuple[int, ...], bias: float, hint: str, from_cache: bool
) -> OpenVinoBackend:
    """Compile the stage graphs ``folder/<stage>.xml`` (an export cache entry or a
    bundle) for the CPU: the stem in f32, the rest with ``hint`` (``f32`` or ``bf16``)."""
    block_converter_telemetry()
    import openvino as ov

    core = ov.Core()
    graphs = [core.read_model(str(folder / f"{stage}.xml")) for stage in _OV_STAGES]
    if hint == "bf16" and openvino_bf16_capable():
        graphs = half_boundaries(graphs)
    stages = [
        compile_for_latency(core, graph, "f32" if stage == "stem" else hint)
        for stage, graph in zip(_OV_STAGES, graphs, strict=True)
    ]
    actual = str(stages[-1].get_property("INFERENCE_PRECISION_HINT")).lower()
    d, h, w = shape
    return OpenVinoBackend(
        stages=stages,
        shape=(d, h, w),
        bias=bias,
        precision="bf16" if "bf16" in actual or "bfloat16" in actual else "fp32",
        from_cache=from_cache,
    )
