"""OpenVINO INT8: the network quantized after training with NNCF, run as one graph.

Quantization needs calibration inputs the user chooses (``ctscreen quantize``), so
the INT8 graph is made once, ahead of time, and travels inside the checkpoint
(:class:`Int8Graph`, written by :func:`ctscreen.weights.save_checkpoint`). At run
time it is written into the export cache beside the weights like the other
exports (:func:`openvino_int8_recipe`) and compiled from there. Running it needs
OpenVINO only; making it needs NNCF too (``pip install 'ctscreen[quantize]'``).

What stays in floating point (``keep``): NNCF inserts no quantizer in the parts
of :data:`PARTS` named (see :func:`keep_names`); the rest of the graph (convolutions of
layer1 to layer4) runs in INT8 with per-channel weight scales and per-tensor
activation ranges from the calibration inputs. The stem stays fp32 for the reason
:func:`ctscreen.model.stem_features` gives; the head (the activation map and the
logit) is a few thousand multiply-adds and stays fp32 too. The non-quantized
parts run with the f32 inference-precision hint.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..card import Int8Graph
from ..errors import ConfigError
from .base import cam_network
from .export_cache import ExportRecipe, cached_export, export_cache_root
from .openvino_backend import (
    OpenVinoBackend,
    block_converter_telemetry,
    compile_for_latency,
    openvino_version,
)

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: The name the INT8 graph's cache entries start with.
INT8_RECIPE = "openvino_int8"

#: Parts of the network that may be kept out of quantization, and how many
#: convolutions each has (in the order of the graph: a residual stage's first
#: block has a 1x1x1 downsampling convolution from layer2 on).
PARTS: dict[str, int] = {"stem": 1, "layer1": 4, "layer2": 5, "layer3": 5, "layer4": 5, "head": 0}

#: Kept in floating point unless the user says otherwise.
DEFAULT_KEEP: tuple[str, ...] = ("stem", "head")

NNCF_MISSING = (
    "quantizing needs NNCF: pip install 'ctscreen[quantize]' (or pip install nncf), "
    "then run the command again."
)


def nncf_version() -> str | None:
    """The installed NNCF version, or None when it cannot be imported."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("nncf")
    except PackageNotFoundError:
        return None


def keep_names(graph: Any, keep: Sequence[str]) -> list[str]:
    """The names of the nodes of ``graph`` that belong to the parts named in ``keep``.

    OpenVINO's converter folds each batch norm into its convolution and names the
    result after the multiplication, not the module, so the convolutions are
    told apart by their order in the graph (:data:`PARTS` gives their counts);
    the head is the activation map (Einsum) and the logit (MatMul).

    Raises:
        ConfigError: a name that is not one of :data:`PARTS`.
        RuntimeError: the graph is not the r3d_18 :data:`PARTS` describes.
    """
    unknown = [name for name in keep if name not in PARTS]
    if unknown:
        raise ConfigError(
            f"cannot keep {', '.join(unknown)} in floating point; choose from {', '.join(PARTS)}."
        )
    ops = graph.get_ordered_ops()
    convolutions = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
    if len(convolutions) != sum(PARTS.values()):
        raise RuntimeError(
            f"expected {sum(PARTS.values())} convolutions in the r3d_18 graph, "
            f"found {len(convolutions)}"
        )
    names: list[str] = []
    start = 0
    for part, count in PARTS.items():
        if part in keep:
            names.extend(convolutions[start : start + count])
        start += count
    if "head" in keep:
        names.extend(
            op.get_friendly_name() for op in ops if op.get_type_name() in ("Einsum", "MatMul")
        )
    return names


def convert_cam_network(model: nn.Module, shape: tuple[int, int, int]) -> Any:
    """``model`` with its ``(logits, cam)`` outputs as one OpenVINO graph for ``[1, 1, *shape]``."""
    block_converter_telemetry()
    import openvino as ov
    import torch

    example = torch.zeros((1, 1, 16, 32, 32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return ov.convert_model(
            torch.jit.trace(cam_network(model), example, check_trace=False),
            example_input=example,
            input=[ov.PartialShape([1, 1, *shape])],
        )


def quantize_openvino(
    model: nn.Module,
    *,
    shape: tuple[int, int, int],
    calibration: Sequence[np.ndarray],
    keep: Sequence[str] = DEFAULT_KEEP,
) -> Int8Graph:
    """Quantize ``model`` to INT8 with NNCF's post-training quantization.

    Args:
        model: the r3d_18 (CPU, eval mode).
        shape: the model card's input ``(D, H, W)``.
        calibration: network inputs ``[D, H, W]`` (float32 in [0, 1]) whose
            activation ranges set the quantizers.
        keep: parts left in floating point (names of :data:`PARTS`).

    Returns:
        The INT8 graph.

    Raises:
        ConfigError: NNCF is not installed, no calibration input, an input of
            another shape, or an unknown part in ``keep``.
    """
    if not calibration:
        raise ConfigError("quantizing needs at least one calibration study.")
    wrong = [tuple(a.shape) for a in calibration if tuple(a.shape) != tuple(shape)]
    if wrong:
        raise ConfigError(
            f"calibration inputs must be {tuple(shape)} (the model card's shape), not {wrong[0]}."
        )
    try:
        import nncf
    except ImportError as exc:
        raise ConfigError(NNCF_MISSING) from exc
    import openvino as ov

    graph = convert_cam_network(model, shape)
    kept = keep_names(graph, keep)
    inputs = [np.ascontiguousarray(a, dtype=np.float32)[None, None] for a in calibration]
    quantized = nncf.quantize(
        graph,
        nncf.Dataset(inputs),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(inputs),
        ignored_scope=nncf.IgnoredScope(names=kept) if kept else None,
    )
    with tempfile.TemporaryDirectory(prefix="ctscreen-int8-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        return Int8Graph(xml=xml.read_bytes(), weights=xml.with_suffix(".bin").read_bytes())


def openvino_int8_recipe(graph: Int8Graph) -> ExportRecipe:
    """How the INT8 graph reaches the export cache: its two files, written as they are."""

    def write(model: nn.Module, *, shape: tuple[int, int, int], out_dir: Path) -> None:
        del model, shape  # the graph was made (and its shape fixed) by quantize_openvino
        (out_dir / "model.xml").write_bytes(graph.xml)
        (out_dir / "model.bin").write_bytes(graph.weights)

    return ExportRecipe(
        INT8_RECIPE,
        write,
        ("model.xml", "model.bin"),
        openvino_version() or "none",
        exporter=f"int8 graph {graph.sha256[:32]}",
    )


def load_openvino_int8(
    model: nn.Module,
    graph: Int8Graph,
    *,
    weights_sha256: str,
    weights_path: Path | None,
    shape: tuple[int, int, int],
    cache_root: Path | None = None,
) -> OpenVinoBackend:
    """Write (or reuse) ``graph`` in the export cache and compile it for the CPU.

    Args:
        model: the r3d_18 the graph was made from (gives the head bias).
        graph: the INT8 graph the checkpoint carries.
        weights_sha256: SHA-256 of the checkpoint file (keys the export cache).
        weights_path: the checkpoint file (the cache goes beside it when writable).
        shape: the model card's input ``(D, H, W)``.
        cache_root: cache folder; default :func:`export_cache_root` of ``weights_path``.

    Returns:
        The backend (precision ``int8``), ready to run.

    Raises:
        ImportError: OpenVINO is not installed.
    """
    import openvino as ov

    root = cache_root if cache_root is not None else export_cache_root(weights_path)
    xml, from_cache = cached_export(
        model,
        weights_sha256=weights_sha256,
        shape=tuple(shape),
        cache_root=root,
        weights_path=weights_path,
        recipe=openvino_int8_recipe(graph),
    )
    core = ov.Core()
    compiled = compile_for_latency(core, core.read_model(str(xml)), "f32")
    bias = float(model.fc.bias.detach().float().cpu()[0])
    return OpenVinoBackend(
        stages=[compiled], shape=tuple(shape), bias=bias, precision="int8", from_cache=from_cache
    )
