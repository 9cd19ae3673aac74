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
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: Names accepted by ``--backend``.
BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino", "onnxruntime")
#: How each backend is named in messages.
_TITLES = {"torch": "PyTorch", "openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}
#: Bumped whenever the exported graph or the cache layout changes.
EXPORT_FORMAT_VERSION = 2  # 2: the OpenVINO graph is split into stages
_MANIFEST = "manifest.json"
_IR_XML = "model.xml"
_IR_BIN = "model.bin"
#: The OpenVINO graphs, run one after another; the last one gives (logits, cam).
_OV_STAGES = ("stem", "layer1", "layer2", "layer3", "model")
_ONNX = "model.onnx"
#: Input shape used to trace the network for conversion; the real shape is set after.
_TRACE_SHAPE = (1, 1, 16, 32, 32)


class Backend(Protocol):
    """What the scorer needs of a way to run the network."""

    name: str
    precision: str

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[B]`` and activation maps ``[B, d', h', w']`` for ``x [B, 1, D, H, W]``."""
        ...


def logits_from_cam(cam: np.ndarray, bias: float) -> np.ndarray:
    """The logits ``[B]`` of activation maps ``[B, d', h', w']``: their mean plus the head bias."""
    flat = np.asarray(cam, dtype=np.float64).reshape(cam.shape[0], -1)
    return (flat.mean(axis=1) + float(bias)).astype(np.float32)


# --------------------------------------------------------------------------- torch


@dataclass
class TorchBackend:
    """PyTorch eager, fp32 or autocast.

    Attributes:
        model: an r3d_18 from :func:`ctscreen.model.build_model`, on ``device``, in eval mode.
        device: where it runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 only on CUDA).
    """

    model: nn.Module
    device: torch.device
    precision: str = "fp32"
    name: str = field(default="torch", init=False)

    def __post_init__(self) -> None:
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("fp16 runs only on a GPU; use --precision bf16 or fp32 on the CPU.")
        self.bias = float(self.model.fc.bias.detach().float().cpu()[0])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[B]`` and activation maps ``[B, d', h', w']`` for ``x [B, 1, D, H, W]``."""
        import torch

        from .model import forward_with_cam

        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.inference_mode():
            _, cam = forward_with_cam(self.model, tensor, reduced=dtype)
        cam_np = cam.float().cpu().numpy()
        return logits_from_cam(cam_np, self.bias), cam_np


# --------------------------------------------------------------------------- openvino


def openvino_version() -> str | None:
    """The installed OpenVINO version, or None when it cannot be imported."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def user_cache_dir() -> Path:
    """``$CTSCREEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctscreen``, else ``~/.cache/ctscreen``."""
    explicit = os.environ.get("CTSCREEN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctscreen"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def export_cache_root(weights_path: Path | None) -> Path:
    """Where exported graphs of ``weights_path`` are kept.

    Args:
        weights_path: the checkpoint file, or None for a model without one.

    Returns:
        ``<weights folder>/.ctscreen-export`` when that can be written, else
        ``<user cache>/export``.

    Raises:
        ConfigError: neither folder can be written.
    """
    candidates = []
    if weights_path is not None:
        candidates.append(Path(weights_path).resolve().parent / ".ctscreen-export")
    candidates.append(user_cache_dir() / "export")
    for folder in candidates:
        if _writable_dir(folder):
            return folder
    raise ConfigError(
        f"cannot write an exported model to {' or '.join(map(str, candidates))}; "
        "set CTSCREEN_CACHE_DIR to a writable folder or use --backend torch."
    )


def export_key(
    *,
    weights_sha256: str,
    shape: tuple[int, ...],
    backend_version: str,
    backend: str = "openvino",
    exporter: str | None = None,
) -> str:
    """The cache entry name of one exported graph: its backend, then what it was made from, hashed.

    Args:
        weights_sha256: SHA-256 of the checkpoint the weights came from.
        shape: the input shape the graph was made for.
        backend_version: the version of the backend that runs (and for OpenVINO, converts) it.
        backend: ``openvino`` or ``onnxruntime``; the entry name starts with it.
        exporter: the versions of the converter when it is not the backend itself
            (ONNX: PyTorch, onnx, onnxscript). Left out of the hash when None, so
            that OpenVINO entries keep the names earlier releases gave them.
    """
    made_from: dict[str, Any] = {
        "format": EXPORT_FORMAT_VERSION,
        "weights_sha256": weights_sha256,
        "shape": list(shape),
        "backend_version": backend_version,
    }
    if exporter is not None:
        made_from["exporter"] = exporter
    text = json.dumps(made_from, sort_keys=True)
    return f"{backend}-{weights_sha256[:16]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _entry_is_valid(entry: Path, key: str, files: tuple[str, ...] = (_IR_XML, _IR_BIN)) -> bool:
    """True when ``entry`` holds a complete export whose ``files`` match its manifest."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        return manifest.get("key") == key and all(
            manifest.get(name) == _sha256(entry / name) for name in files
        )
    except (OSError, ValueError, AttributeError):
        return False


def cam_network(model: nn.Module) -> nn.Module:
    """An ``nn.Module`` around ``model`` whose forward returns ``(logits, cam)``.

    Args:
        model: an r3d_18 from :func:`ctscreen.model.build_model`.

    Returns:
        The wrapper in eval mode; it shares ``model``'s parameters.
    """
    from torch import nn

    from .model import forward_with_cam

    class CamNetwork(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return forward_with_cam(self.inner, x)

    return CamNetwork(model).eval()


def block_converter_telemetry() -> None:
    """Keep OpenVINO's model converter from sending usage telemetry.

    ctscreen runs on hospital machines and must not contact anyone. The converter
    imports the ``openvino_telemetry`` package when it can and otherwise uses its
    own no-op stub; marking that package as unimportable selects the stub. It is
    done only when the package has not been imported already by someone else.
    """
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]


def stage_networks(model: nn.Module) -> list[nn.Module]:
    """The network cut into the OpenVINO stages: stem, layer1, layer2, layer3, and
    layer4 with the head giving ``(logits, cam)``. They share ``model``'s parameters."""
    from torch import nn

    from .model import head_with_cam

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


def _export_recipe(backend: str) -> tuple[Callable[..., None], tuple[str, ...], str, str | None]:
    """How ``backend``'s graph is made: the export function, the files it writes (the
    runtime reads the first), the backend's version and the exporter's versions (or None)."""
    if backend == "openvino":
        files = tuple(f"{stage}.{ext}" for stage in reversed(_OV_STAGES) for ext in ("xml", "bin"))
        return export_openvino, files, openvino_version() or "none", None
    if backend == "onnxruntime":
        return export_onnx, (_ONNX,), onnxruntime_version() or "none", onnx_exporter_versions()
    raise ValueError(f"no exported graph for backend {backend!r}")


def cached_export(
    model: nn.Module,
    *,
    weights_sha256: str,
    shape: tuple[int, int, int],
    cache_root: Path,
    weights_path: Path | None = None,
    backend: str = "openvino",
) -> tuple[Path, bool]:
    """The graph of ``model`` from the cache, exported first when missing, stale or damaged.

    The export is written into a temporary folder beside the entry and renamed
    into place, so a reader never sees half an entry; the other entries of the
    same backend for the same weights or the same weight file (older weights,
    older backend or exporter, other shapes) are removed. Entries of other
    backends are left alone.

    Args:
        model: the r3d_18 (on the CPU, eval mode).
        weights_sha256: SHA-256 of the checkpoint the weights came from.
        shape: the static input ``(D, H, W)``.
        cache_root: the cache folder (see :func:`export_cache_root`).
        weights_path: the checkpoint file, recorded so that a later export of
            new weights at the same path replaces this one.
        backend: ``openvino`` (IR: ``model.xml`` and ``model.bin``) or
            ``onnxruntime`` (``model.onnx``, weights inside).

    Returns:
        ``(path to model.xml or model.onnx, True when it came from the cache)``.
    """
    export, files, version, exporter = _export_recipe(backend)
    key = export_key(
        weights_sha256=weights_sha256,
        shape=tuple(shape),
        backend_version=version,
        backend=backend,
        exporter=exporter,
    )
    entry = cache_root / key
    if entry.exists():
        if _entry_is_valid(entry, key, files):
            log.debug("using the exported model %s", entry)
            return entry / files[0], True
        log.warning("exported model %s is incomplete or damaged; exporting it again", entry)
        shutil.rmtree(entry, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root))
    try:
        export(model, shape=shape, out_dir=staging)
        manifest: dict[str, Any] = {
            "key": key,
            "backend": backend,
            "format": EXPORT_FORMAT_VERSION,
            "weights_sha256": weights_sha256,
            "weights_path": _path_text(weights_path),
            "shape": list(shape),
            "backend_version": version,
        }
        if exporter is not None:
            manifest["exporter"] = exporter
        manifest.update({name: _sha256(staging / name) for name in files})
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; others reading the weights may use it
        try:
            os.rename(staging, entry)
        except OSError:  # another process finished the same export first
            if not _entry_is_valid(entry, key, files):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune(
        cache_root,
        backend=backend,
        keep=key,
        weights_sha256=weights_sha256,
        weights_path=weights_path,
    )
    log.info("exported the model for %s %s to %s", _TITLES[backend], version, entry)
    return entry / files[0], False


def _path_text(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _prune(
    cache_root: Path, *, backend: str, keep: str, weights_sha256: str, weights_path: Path | None
) -> None:
    """Remove ``backend``'s entries, other than ``keep``, of the same weights or weight file."""
    same_file = _path_text(weights_path)
    for old in cache_root.glob(f"{backend}-*"):
        if old.name == keep or not old.is_dir():
            continue
        try:
            manifest = json.loads((old / _MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge: another process may be writing it
        if not isinstance(manifest, dict):
            continue
        if manifest.get("weights_sha256") == weights_sha256 or (
            same_file is not None and manifest.get("weights_path") == same_file
        ):
            shutil.rmtree(old, ignore_errors=True)


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


def openvino_hint(precision: str) -> str:
    """The CPU inference-precision hint for ``precision``: bf16 only where the CPU has it.

    Raises:
        ConfigError: ``precision`` is fp16 (not run on the CPU).
    """
    from .inference import cpu_supports_bf16

    if precision == "fp16":
        raise ConfigError("fp16 runs only on a GPU; use --precision bf16 or fp32 on the CPU.")
    if precision in ("bf16", "auto") and cpu_supports_bf16():
        return "bf16"
    return "f32"


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
        precision: ``fp32``, ``bf16`` or ``auto``.
        cache_root: cache folder; default :func:`export_cache_root` of ``weights_path``.

    Returns:
        The backend, ready to run.

    Raises:
        ImportError: OpenVINO is not installed.
        ConfigError: ``precision`` is fp16, or no cache folder can be written.
    """
    import openvino as ov

    hint = openvino_hint(precision)
    root = cache_root if cache_root is not None else export_cache_root(weights_path)
    xml, from_cache = cached_export(
        model,
        weights_sha256=weights_sha256,
        shape=tuple(shape),
        cache_root=root,
        weights_path=weights_path,
    )
    core = ov.Core()
    graphs = [core.read_model(str(xml.parent / f"{stage}.xml")) for stage in _OV_STAGES]
    if hint == "bf16":
        graphs = half_boundaries(graphs)

    def compile_graph(graph: Any, inference_precision: str) -> Any:
        return core.compile_model(
            graph,
            "CPU",
            {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"},
        )

    bias = float(model.fc.bias.detach().float().cpu()[0])
    stages = [
        compile_graph(graph, "f32" if stage == "stem" else hint)
        for stage, graph in zip(_OV_STAGES, graphs, strict=True)
    ]
    return OpenVinoBackend(
        stages=stages,
        shape=tuple(shape),
        bias=bias,
        precision="bf16" if hint == "bf16" else "fp32",
        from_cache=from_cache,
    )


# --------------------------------------------------------------------------- onnxruntime

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


def usable_cores() -> int:
    """How many CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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
        raise ConfigError("fp16 runs only on a GPU; use --precision bf16 or fp32 on the CPU.")
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
        backend="onnxruntime",
    )
    bias = float(model.fc.bias.detach().float().cpu()[0])
    return OnnxRuntimeBackend(
        session=onnxruntime_session(graph), shape=tuple(shape), bias=bias, from_cache=from_cache
    )


# --------------------------------------------------------------------------- choice


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
    from .inference import cpu_supports_bf16

    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name in ("openvino", "onnxruntime") and device.type != "cpu":
        raise ConfigError(
            f"the {_TITLES[name]} backend runs on the CPU, not {device}; use --device cpu or "
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
        raise ConfigError("fp16 runs only on a GPU; use --precision bf16 or fp32 on the CPU.")
    title = _TITLES[chosen]
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
