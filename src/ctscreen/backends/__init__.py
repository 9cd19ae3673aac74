"""Ways to run the network: PyTorch, or OpenVINO on the CPU (fp32, bf16 or INT8).

Every backend takes one preprocessed input ``[B, 1, D, H, W]`` float32 and gives
``(logits [B], cam [B, d', h', w'])`` from one forward pass, as
:func:`ctscreen.model.forward_with_cam` does. The logit is always taken as
``cam.mean() + bias`` computed in float64 on the host: the decomposition used for
per-slice scores then holds exactly, and at reduced precision the logit keeps the
accuracy of the averaged map instead of the rounding of a bf16 head output.

* ``torch``: fp32, or bf16 autocast (CPU or CUDA), or fp16 autocast (CUDA only).
  At reduced precision the stem stays fp32 (:func:`ctscreen.model.stem_features`
  says why).
* ``openvino`` (installed with ctscreen): the network with its activation-map
  output is converted once, saved as OpenVINO IR next to the weights (or in the
  user cache when that folder is read-only) and compiled for the CPU in stages:
  the stem with the f32 inference-precision hint, the rest with bf16 or f32
  (:func:`export_openvino` says why). ``int8``: the graph NNCF quantized ahead of
  time from the user's calibration studies (``ctscreen quantize``), carried in
  the checkpoint and run as one graph (:mod:`.openvino_int8`). Every saved graph
  is keyed by the weight file's SHA-256, the input shape and the OpenVINO
  version, written atomically and checked against its recorded hashes before
  every use; a stale or damaged one is rebuilt.

``auto`` (backend, precision or both) is decided by measurement on the machine
where it runs, once per checkpoint, shape and runtime versions
(:mod:`.choice`): every installed candidate that passes the accuracy gate is
timed at the model's input shape and the fastest is kept. Plain PyTorch fp32 is
always a candidate, so ``auto`` is never slower than it was measured to be.
ONNX Runtime was a backend until measurement showed that it never won: on a
2-core AMD EPYC and a 2-core Intel Xeon, OpenVINO fp32 was faster than ONNX
Runtime fp32 (0.67 vs 0.82 of PyTorch fp32 on the Xeon, 3.3 s vs 3.8 s on the
EPYC), and bf16 or INT8 faster still.

A speed option never fails a run: when OpenVINO cannot export, load or run, the
scorer logs one warning and goes on with PyTorch fp32.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..hardware import FP16_ON_CPU, PRECISIONS, cpu_model, usable_cores
from .base import BACKENDS, TITLES, Backend, cam_network, logits_from_cam
from .choice import (
    REFERENCE,
    Candidate,
    Trial,
    choice_key,
    choices_path,
    format_trials,
    load_choice,
    measure_candidates,
    pick,
    save_choice,
    trial_from_dict,
)
from .export_cache import (
    EXPORT_FORMAT_VERSION,
    ExportRecipe,
    cached_export,
    export_cache_root,
    export_key,
    user_cache_dir,
)
from .openvino_backend import (
    OpenVinoBackend,
    block_converter_telemetry,
    compile_stages,
    export_openvino,
    finite_half,
    half_boundaries,
    load_openvino,
    openvino_bf16_capable,
    openvino_hint,
    openvino_recipe,
    openvino_version,
    stage_networks,
)
from .openvino_int8 import (
    DEFAULT_KEEP,
    PARTS,
    Int8Graph,
    load_openvino_int8,
    nncf_version,
    openvino_int8_recipe,
    quantize_openvino,
)
from .torch_backend import TorchBackend

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..bundle import LoadedBundle
    from ..config import PreprocessConfig
    from ..weights import LoadedModel

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "DEFAULT_KEEP",
    "TITLES",
    "EXPORT_FORMAT_VERSION",
    "PARTS",
    "REFERENCE",
    "Backend",
    "Candidate",
    "Choice",
    "ExportRecipe",
    "FallbackBackend",
    "Int8Graph",
    "ModelSource",
    "OpenVinoBackend",
    "TorchBackend",
    "Trial",
    "block_converter_telemetry",
    "bundle_backend",
    "cached_export",
    "cam_network",
    "candidates",
    "choose_backend",
    "export_cache_root",
    "export_key",
    "export_openvino",
    "finite_half",
    "format_trials",
    "gate_inputs",
    "half_boundaries",
    "load_openvino",
    "load_openvino_int8",
    "logits_from_cam",
    "make_backend",
    "nncf_version",
    "openvino_bf16_capable",
    "openvino_hint",
    "openvino_int8_recipe",
    "openvino_recipe",
    "openvino_version",
    "quantize_openvino",
    "runtime_versions",
    "stage_networks",
    "user_cache_dir",
]


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


#: Says what ``--precision int8`` needs when the checkpoint has no INT8 graph.
INT8_NEEDS_QUANTIZE = (
    "--precision int8 needs a checkpoint quantized by `ctscreen quantize` (it carries the "
    "INT8 graph and what calibrated it); quantize this one, or use --precision auto."
)


def check_request(
    backend: str, precision: str, device: torch.device, *, int8_graph: Int8Graph | None
) -> None:
    """Refuse a backend or precision this device or checkpoint cannot run.

    Raises:
        ConfigError: an unknown name, OpenVINO or INT8 off the CPU, fp16 on the
            CPU, INT8 with PyTorch, or INT8 for a checkpoint without an INT8 graph.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}."
        )
    if device.type != "cpu" and (backend == "openvino" or precision == "int8"):
        what = "the OpenVINO backend" if backend == "openvino" else "INT8"
        raise ConfigError(
            f"{what} runs on the CPU, not {device}; use --device cpu, or --backend torch "
            "with fp32, bf16 or fp16."
        )
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(FP16_ON_CPU)
    if precision == "int8" and backend == "torch":
        raise ConfigError("INT8 runs with OpenVINO; use --backend openvino or auto.")
    if precision == "int8" and int8_graph is None:
        raise ConfigError(INT8_NEEDS_QUANTIZE)


def candidates(
    device: torch.device,
    backend: str = "auto",
    precision: str = "auto",
    *,
    openvino: bool,
    openvino_bf16: bool = True,
    int8: bool = False,
    cuda_bf16: bool = True,
    cpu_bf16: bool = True,
) -> list[Candidate]:
    """The ways to run the network that fit the request, on what is installed.

    What the hardware and runtimes *can* run decides this list (fp16 only on a
    GPU; OpenVINO only on the CPU; bf16 in OpenVINO where it reports the
    capability; INT8 where the checkpoint carries a graph); which of them is
    fastest is left to measurement.

    Args:
        device: where the network runs.
        backend: ``auto``, ``torch`` or ``openvino``.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        openvino: OpenVINO is installed.
        openvino_bf16: OpenVINO reports bf16 on this CPU.
        int8: the checkpoint carries an INT8 graph.
        cuda_bf16: the GPU computes bf16.
        cpu_bf16: PyTorch runs bf16 natively on this CPU (without it, bf16 is
            emulated: 110x slower than fp32 on a Zen 3, so it is not worth a trial).

    Returns:
        Candidates, :data:`REFERENCE`-like PyTorch fp32 first when it fits.
    """
    if device.type == "cpu":
        every = [Candidate("torch", "fp32")]
        if cpu_bf16:
            every.append(Candidate("torch", "bf16"))
        if openvino:
            every.append(Candidate("openvino", "fp32"))
            if openvino_bf16:
                every.append(Candidate("openvino", "bf16"))
            if int8:
                every.append(Candidate("openvino", "int8"))
    else:
        every = [Candidate("torch", "fp32"), Candidate("torch", "fp16")]
        if cuda_bf16:
            every.insert(1, Candidate("torch", "bf16"))
    return [
        c for c in every if backend in ("auto", c.backend) and precision in ("auto", c.precision)
    ]


def runtime_versions() -> dict[str, str | None]:
    """The versions that can change which candidate is fastest: ctscreen, PyTorch, OpenVINO."""
    import torch

    from .._version import __version__

    return {"ctscreen": __version__, "torch": torch.__version__, "openvino": openvino_version()}


def gate_inputs(preprocess: PreprocessConfig) -> list[np.ndarray]:
    """The accuracy gate's studies: two synthetic chest phantoms (one normal, one with
    consolidation) drawn at the model's input shape and preprocessed with its window,
    each as ``[1, 1, D, H, W]`` float32 (see :mod:`.choice`)."""
    from ..preprocess import preprocess_array
    from ..synth.phantom import make_phantom

    d, h, w = preprocess.shape
    spacing = (300.0 / d, 360.0 / h, 360.0 / w)
    out = []
    for seed, pathology in ((11, None), (12, "consolidation")):
        phantom = make_phantom(seed=seed, shape=(d, h, w), spacing=spacing, pathology=pathology)
        out.append(preprocess_array(phantom.hu, preprocess)[None, None])
    return out


@dataclass(frozen=True)
class Choice:
    """The measured choice of ``auto``.

    Attributes:
        winner: the candidate chosen.
        trials: what every candidate did (gate, seconds per forward).
        from_cache: the choice was read from the user cache, not measured now.
        key: its key (:func:`ctscreen.backends.choice.choice_key`).
        measured: when it was measured (ISO 8601 UTC).
    """

    winner: Candidate
    trials: tuple[Trial, ...]
    from_cache: bool
    key: str
    measured: str = ""

    def table(self) -> str:
        """The measured table as text."""
        return format_trials(self.trials, self.winner)


@dataclass(frozen=True)
class ModelSource:
    """The checkpoint every way of running it starts from (what the backends need to
    know of it, whoever loaded it).

    Attributes:
        model: the r3d_18 on the device it will run on, eval mode.
        weights_sha256: SHA-256 of the checkpoint (keys the exports and the choice);
            empty: a digest of the model's tensors is taken.
        preprocess: the model card's preprocessing (its shape is the static input shape).
        weights_path: the checkpoint file (the export cache goes beside it).
        cache_root: export cache folder; default beside the weights or in the user cache.
        int8_graph: the checkpoint's INT8 graph, when it carries one.
        int8_failed_check: why that graph failed its recorded check, if it did.
        int8_passed_check: that graph passed its recorded check on real studies (it is
            then judged by that, not by the phantom gate; see :mod:`.choice`).
    """

    model: nn.Module
    weights_sha256: str
    preprocess: PreprocessConfig
    weights_path: Path | None = None
    cache_root: Path | None = None
    int8_graph: Int8Graph | None = None
    int8_failed_check: str | None = None
    int8_passed_check: bool = False

    @classmethod
    def of(cls, loaded: LoadedModel, *, cache_root: Path | None = None) -> ModelSource:
        """The source of a checkpoint loaded by :func:`ctscreen.weights.load_checkpoint`."""
        from ..card import failed_check, passed_check

        return cls(
            model=loaded.model,
            weights_sha256=loaded.sha256,
            preprocess=loaded.card.preprocess,
            weights_path=loaded.path,
            cache_root=cache_root,
            int8_graph=loaded.int8_graph,
            int8_failed_check=failed_check(loaded.card),
            int8_passed_check=passed_check(loaded.card),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """The static input shape ``(D, H, W)``."""
        d, h, w = self.preprocess.shape
        return (d, h, w)


def build_candidate(candidate: Candidate, source: ModelSource, *, device: torch.device) -> Backend:
    """Load ``candidate`` (exporting or compiling what it needs).

    Raises:
        ConfigError: INT8 without a graph; ImportError or a runtime error when
            OpenVINO cannot load the model.
    """
    if candidate.backend == "torch":
        return TorchBackend(source.model, device, candidate.precision)
    where = {
        "weights_sha256": source.weights_sha256,
        "weights_path": source.weights_path,
        "shape": source.shape,
        "cache_root": source.cache_root,
    }
    if candidate.precision == "int8":
        if source.int8_graph is None:
            raise ConfigError(INT8_NEEDS_QUANTIZE)
        return load_openvino_int8(source.model, source.int8_graph, **where)
    return load_openvino(source.model, precision=candidate.precision, **where)


def choose_backend(
    source: ModelSource,
    *,
    device: torch.device,
    backend: str = "auto",
    precision: str = "auto",
    choices_file: Path | None = None,
    remeasure: bool = False,
    rounds: int | None = None,
) -> tuple[Choice, dict[Candidate, Backend]]:
    """Resolve ``auto`` by measurement (or by the measurement kept for this key).

    Args:
        source: the checkpoint (its model on ``device``).
        device: where the network runs.
        backend: ``auto``, ``torch`` or ``openvino``.
        precision: ``auto`` or a concrete precision.
        choices_file: the JSON file of measured choices (default :func:`choices_path`).
        remeasure: measure even when a choice is kept for this key.
        rounds: timed forwards per candidate (default :data:`.choice.DEFAULT_ROUNDS`).

    Returns:
        The choice, and the backends built while measuring (empty when the
        choice came from the cache).
    """
    shape = source.shape
    fits = candidates(
        device,
        backend,
        precision,
        openvino=device.type == "cpu" and openvino_version() is not None,
        openvino_bf16=device.type == "cpu" and openvino_bf16_capable(),
        int8=source.int8_graph is not None,
        cuda_bf16=device.type != "cuda" or _cuda_bf16(),
        cpu_bf16=device.type != "cpu" or torch_cpu_bf16_capable(),
    )
    versions = runtime_versions()
    machine = cpu_model() if device.type == "cpu" else _gpu_name(device)
    requested = (backend, precision)
    key = choice_key(
        machine=machine,
        cores=usable_cores(),
        device=str(device),
        versions=versions,
        weights_sha256=source.weights_sha256,
        shape=shape,
        requested=requested,
    )
    path = choices_file or choices_path()
    record = None if remeasure else load_choice(key, path)
    if record is not None:
        winner = Candidate.parse(record["winner"])
        if winner in fits:
            trials = tuple(trial_from_dict(t) for t in record.get("trials", ()))
            log.info("using the measured choice %s (%s)", winner.label, path)
            return Choice(winner, trials, True, key, str(record.get("measured", ""))), {}
    # INFO, not WARNING: measuring is the designed first run, nothing is wrong. The
    # demo measures for the model it leaves, so a user's first predict rarely gets here.
    log.info(
        "first run of this model on this machine: timing %d ways to run it at %s to choose "
        "the fastest (kept in %s)",
        len(set(fits) | {REFERENCE}),
        "x".join(map(str, shape)),
        path,
    )
    built: dict[Candidate, Backend] = {}
    failures: dict[Candidate, str] = {}
    for candidate in [REFERENCE, *[c for c in fits if c != REFERENCE]]:
        if candidate.precision == "int8" and source.int8_failed_check:
            failures[candidate] = source.int8_failed_check
            built[candidate] = _NotRun(candidate)
            continue
        try:
            built[candidate] = build_candidate(candidate, source, device=device)
        except Exception as exc:  # a candidate that cannot load is simply not chosen
            reason = exc.message if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            failures[candidate] = f"cannot load: {reason}"
            built[candidate] = _NotRun(candidate)
    runners = {c: b.run for c, b in built.items()}
    checked = [c for c in built if c.precision == "int8" and source.int8_passed_check]
    trials = measure_candidates(
        runners,
        gate_inputs(source.preprocess),
        recorded=failures,
        checked=checked,
        **_rounds(rounds),
    )
    winner = pick(trials, allowed=fits)
    facts = {
        "machine": machine,
        "cores": usable_cores(),
        "device": str(device),
        "versions": versions,
        "weights_sha256": source.weights_sha256,
        "weights_path": None
        if source.weights_path is None
        else str(Path(source.weights_path).resolve()),
        "shape": list(shape),
        "requested": list(requested),
    }
    stored = save_choice(key, winner=winner, trials=trials, facts=facts, path=path)
    choice = Choice(winner, tuple(trials), False, key, stored["measured"])
    log.info(
        "chose %s (%s s per forward; the table: ctscreen info --backends)",
        winner.label,
        next((f"{t.seconds:.3f}" for t in trials if t.candidate == winner and t.seconds), "?"),
    )
    log.debug("measured backends:\n%s", choice.table())
    return choice, {c: b for c, b in built.items() if not isinstance(b, _NotRun)}


def _rounds(rounds: int | None) -> dict[str, Any]:
    return {} if rounds is None else {"rounds": rounds}


@dataclass(frozen=True)
class _NotRun:
    """Stands for a candidate that could not be loaded (its trial records why)."""

    candidate: Candidate

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError(f"{self.candidate.label} could not be loaded")


def torch_cpu_bf16_capable() -> bool:
    """True when PyTorch's CPU kernels (oneDNN) run bf16 natively on this CPU
    (AVX-512 or AMX); elsewhere bf16 is emulated and far slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _cuda_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported())


def _gpu_name(device: torch.device) -> str:
    import torch

    return str(torch.cuda.get_device_name(device))


def make_backend(
    source: ModelSource,
    *,
    device: torch.device,
    backend: str = "auto",
    precision: str = "auto",
    choices_file: Path | None = None,
) -> Backend:
    """The backend that will run the model of ``source``, falling back to PyTorch fp32
    when it fails.

    Args:
        source: the checkpoint (its model on ``device``).
        device: where the network runs.
        backend: ``auto``, ``torch`` or ``openvino``.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` (GPU) or ``int8`` (OpenVINO).
        choices_file: the JSON file of measured choices (default in the user cache).

    Returns:
        A backend; an OpenVINO one is wrapped so that a failure at run time
        switches to PyTorch fp32 with one warning.

    Raises:
        ConfigError: see :func:`check_request`.
    """
    check_request(backend, precision, device, int8_graph=source.int8_graph)
    if not source.weights_sha256:
        source = replace(source, weights_sha256=_model_digest(source.model))
    model = source.model

    def torch_backend() -> Backend:
        return TorchBackend(model, device, "fp32")

    fits = candidates(
        device,
        backend,
        precision,
        openvino=device.type == "cpu" and openvino_version() is not None,
        openvino_bf16=True,  # asked for by name: OpenVINO itself runs f32 where it lacks bf16
        int8=source.int8_graph is not None,
    )
    if not fits:  # OpenVINO asked for by name but not installed
        log.warning("OpenVINO is not installed (pip install openvino); running with PyTorch")
        return torch_backend()
    built: dict[Candidate, Backend] = {}
    if len(fits) == 1:
        chosen = fits[0]
        if chosen.precision == "int8" and source.int8_failed_check:
            log.warning(
                "this INT8 graph failed its check (%s); running it as asked",
                source.int8_failed_check,
            )
    else:
        choice, built = choose_backend(
            source,
            device=device,
            backend=backend,
            precision=precision,
            choices_file=choices_file,
        )
        chosen = choice.winner
    if chosen.backend == "torch":
        return built.get(chosen) or TorchBackend(model, device, chosen.precision)
    engine = built.get(chosen)
    if engine is None:
        try:
            engine = build_candidate(chosen, source, device=device)
        except Exception as exc:  # a speed option must never fail the run
            reason = exc.message if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.warning("OpenVINO could not load the model (%s); running with PyTorch", reason)
            return torch_backend()
    log.info("running the network with OpenVINO %s (%s)", openvino_version(), engine.precision)
    return FallbackBackend(engine, torch_backend)


def _model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's tensors, for a model that came from no file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def bundle_backend(
    bundle: LoadedBundle, *, backend: str = "auto", precision: str = "auto"
) -> Backend:
    """The OpenVINO backend of an exported bundle (see :mod:`ctscreen.bundle`); no PyTorch.

    ``auto`` runs fp32, the precision held to PyTorch's probabilities; bf16 is run when
    asked for by name. There is no PyTorch to fall back to, so a graph that OpenVINO
    cannot compile is a ConfigError at once.

    Raises:
        ConfigError: ``--backend torch``, INT8 or fp16 asked of a bundle, an unknown
            name, or OpenVINO missing or unable to compile the graphs.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "torch":
        raise ConfigError(
            f"{bundle.path} is an exported bundle, which runs with OpenVINO; pass the .pth "
            "checkpoint for --backend torch, or use --backend auto."
        )
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}."
        )
    if precision == "int8":
        raise ConfigError(
            "an exported bundle carries fp32 graphs only; score the quantized .pth for INT8."
        )
    hint = openvino_hint("fp32" if precision == "auto" else precision)
    try:
        engine = compile_stages(
            bundle.path,
            shape=bundle.card.preprocess.shape,
            bias=bundle.bias,
            hint=hint,
            from_cache=True,
        )
    except ImportError as exc:
        raise ConfigError(
            "an exported bundle runs with OpenVINO, which is not installed: pip install openvino."
        ) from exc
    except RuntimeError as exc:
        raise ConfigError(
            f"OpenVINO {openvino_version()} cannot compile the bundle {bundle.path} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); export it again "
            "with this OpenVINO."
        ) from exc
    log.info("running the bundle with OpenVINO %s (%s)", openvino_version(), engine.precision)
    return engine
