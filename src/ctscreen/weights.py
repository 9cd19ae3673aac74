"""Checkpoints: write them atomically, read them without executing pickled code.

A ctscreen checkpoint is a plain dict saved with ``torch.save``::

    {"format": "ctscreen-checkpoint", "format_version": 1,
     "state_dict": {name: tensor}, "card": ModelCard.to_dict()}

A checkpoint made by ``ctscreen quantize`` also holds its INT8 OpenVINO graph as
two uint8 tensors, ``"openvino_int8": {"xml": ..., "bin": ...}`` (see
:mod:`ctscreen.backends.openvino_int8`), so it runs INT8 on any machine it is
copied to.

It holds only tensors and plain Python containers, so it is always read with
``torch.load(weights_only=True)``: a file that smuggles in other pickled objects is
refused, never executed. The only extra types allowed are data-only ones that
training scripts put beside the weights (numpy scalars, ``argparse.Namespace``).

Files of the original implementation are accepted too, with a made-up card
(``legacy=True``, default preprocessing, threshold 0.5) and a warning:

* a dict ``{"model": state_dict, ...}`` whose keys start with ``backbone.``
  (its wrapper module held the r3d_18 as ``self.backbone``);
* a bare r3d_18 state dict (``stem.0.weight``, ``layer1...``, ``fc.weight``),
  possibly with the ``module.`` prefix DataParallel adds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import Int8Graph, ModelCard, format_interval
from .config import PreprocessConfig
from .errors import CtscreenError, WeightsError
from .fileio import file_sha256, write_atomic
from .hardware import select_device
from .model import build_model, count_parameters
from .torchfile import read_torch_file

log = logging.getLogger(__name__)


CHECKPOINT_FORMAT = "ctscreen-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

_STEM_KEY = "stem.0.weight"
_HEAD_KEY = "fc.weight"
#: Prefixes wrappers put before the r3d_18 keys, stripped in this order.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")
#: Keys older torch versions did not write; their absence is harmless.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _legacy_warning() -> str:
    pre = PreprocessConfig()
    d, h, w = pre.shape
    return (
        "this checkpoint was written by the original implementation: using the default "
        f"preprocessing (window level {pre.window_level:g} / width {pre.window_width:g}, "
        f"shape {d}×{h}×{w}) and threshold 0.5; retrain or re-save with ctscreen to store "
        "its own"
    )


#: The warning every legacy checkpoint carries.
LEGACY_WARNING = _legacy_warning()


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready for inference and everything known about it.

    Attributes:
        model: r3d_18 in eval mode on the requested device.
        card: the model card (made up, ``legacy=True``, for original-implementation files).
        warnings: sentences to show the user and write into reports.
        sha256: hex SHA-256 of the checkpoint file.
        path: the file it was loaded from.
        int8_graph: the INT8 OpenVINO graph a quantized checkpoint carries, else None.
    """

    model: nn.Module
    card: ModelCard
    warnings: tuple[str, ...]
    sha256: str
    path: Path
    int8_graph: Int8Graph | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel/DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_plain(obj: Any, where: str) -> None:
    """Raise when ``obj`` holds anything ``weights_only`` loading would refuse."""
    if isinstance(obj, _PLAIN_SCALARS) or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise WeightsError(f"checkpoint key {where}[{key!r}] is not a string or integer.")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise WeightsError(
        f"{where} is a {type(obj).__name__}, which a safe checkpoint cannot hold; "
        "convert it to str, int, float, bool, list or dict before saving."
    )


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def save_checkpoint(
    path: Path, model: nn.Module, card: ModelCard, *, int8_graph: Int8Graph | None = None
) -> None:
    """Write ``model`` and ``card`` to ``path`` atomically.

    The file is first written next to its destination and then moved over it with
    ``os.replace``, so a crash never leaves a half-written checkpoint behind.

    Args:
        path: destination file (parent folders are created).
        model: the r3d_18 (DataParallel/DDP/compiled wrappers are unwrapped).
        card: its model card.
        int8_graph: an INT8 graph to carry (``ctscreen quantize``).

    Raises:
        WeightsError: the card holds a value a safe checkpoint cannot store, or the
            file cannot be written.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": state,
        "card": card.to_dict(),
    }
    _check_plain(payload["card"], "card")
    if int8_graph is not None:
        payload["openvino_int8"] = {
            "xml": _bytes_tensor(int8_graph.xml),
            "bin": _bytes_tensor(int8_graph.weights),
        }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())

    try:
        write_atomic(path, write)
    except OSError as exc:
        raise WeightsError(f"cannot write checkpoint {path} ({exc.strerror}).") from exc
    log.info("saved checkpoint %s", path)


def _legacy_card() -> ModelCard:
    """The card assumed for a file of the original implementation (it stored none)."""
    return ModelCard(legacy=True, created="unknown", ctscreen_version="unknown")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``backbone.``) from keys."""
    out = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in out):
            out = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in out.items()}
    return out


#: The ``format`` of ``ctscreen train``'s resume state (``train/checkpoint.py``); named
#: here, not imported, so that loading weights never imports the training package.
TRAIN_STATE_FORMAT = "ctscreen-train-state"


def _is_training_state(obj: Mapping[str, Any]) -> bool:
    """True for the resume state of a ``ctscreen train`` run. (Files of the original
    implementation may hold an optimizer beside the model and still load, as before.)"""
    return obj.get("format") == TRAIN_STATE_FORMAT


def _split_payload(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], ModelCard, list[str]]:
    """Find the state dict and card in a loaded file of any accepted layout."""
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
            raise WeightsError(
                f"checkpoint {path} has format version {version!r}, newer than this ctscreen "
                f"reads ({CHECKPOINT_FORMAT_VERSION}); upgrade ctscreen."
            )
        state, card_dict = obj.get("state_dict"), obj.get("card")
        if not _is_state_dict(state) or not isinstance(card_dict, Mapping):
            raise WeightsError(
                f"checkpoint {path} lacks its state_dict or card; re-save it with ctscreen."
            )
        try:
            card = ModelCard.from_dict(dict(card_dict))
        except (CtscreenError, TypeError) as exc:
            reason = exc.message if isinstance(exc, CtscreenError) else str(exc)
            raise WeightsError(f"checkpoint {path} has an invalid model card: {reason}") from exc
        return dict(state), card, []
    if isinstance(obj, Mapping) and _is_training_state(obj):
        raise WeightsError(
            f"{path} is a training resume state (model, optimizer and progress of a "
            "`ctscreen train` run, for `train --resume`), not a model to predict with; pass "
            f"{path.with_name('best.pth')} or an epochs/epoch_XXX/weights.pth of the same run."
        )
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(key)):
            return dict(obj[key]), _legacy_card(), [LEGACY_WARNING]
    if _is_state_dict(obj):
        return dict(obj), _legacy_card(), [LEGACY_WARNING]
    raise WeightsError(
        f"{path} is a PyTorch file but not a ctscreen checkpoint or an r3d_18 state dict; "
        "pass a checkpoint made by `ctscreen train`."
    )


def _check_fits(state: Mapping[str, torch.Tensor], reference: nn.Module, path: Path) -> None:
    """Raise a one-sentence WeightsError unless ``state`` fits the 1-channel r3d_18."""
    stem = state.get(_STEM_KEY)
    if stem is not None and (stem.ndim != 5 or stem.shape[1] != 1):
        channels = stem.shape[1] if stem.ndim == 5 else "?"
        raise WeightsError(
            f"{path} has a first convolution with {channels} input channels but ctscreen's "
            "r3d_18 takes 1 (CT); Kinetics-400 video weights only serve to initialise "
            "training, they cannot predict."
        )
    head = state.get(_HEAD_KEY)
    if head is not None and tuple(head.shape) != (1, reference.fc.in_features):
        raise WeightsError(
            f"{path} has a head with {head.shape[0]} outputs but ctscreen needs one logit; "
            "pass a binary checkpoint made by `ctscreen train`."
        )
    expected = reference.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise WeightsError(
            f"{path} does not fit r3d_18: {len(missing)} keys missing and {len(unexpected)} "
            f"unexpected (e.g. {example!r}); pass a checkpoint made by `ctscreen train`."
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise WeightsError(
            f"{path} does not fit r3d_18: {len(wrong)} tensors have the wrong shape "
            f"(e.g. {wrong[0]!r}); pass a checkpoint made by `ctscreen train`."
        )


def load_checkpoint(path: Path | str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint (ctscreen's or the original implementation's) for inference.

    Args:
        path: the ``.pth`` file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.

    Returns:
        The model in eval mode on ``device`` with its card, warnings and file hash.

    Raises:
        WeightsError: the file is missing, damaged, holds pickled objects, or its
            tensors do not fit r3d_18 with a 1-channel stem and one logit.
        ConfigError: ``device`` names CUDA on a machine without it.
    """
    path = Path(path)
    target = device if isinstance(device, torch.device) else select_device(str(device))
    obj = read_torch_file(path)
    raw_state, card, notes = _split_payload(obj, path)
    int8_graph = _int8_graph(obj, path)
    state = _strip_prefixes(raw_state)
    model = build_model()
    _check_fits(state, model, path)
    model.load_state_dict(state, strict=False)
    model.to(target).eval()
    try:
        sha = file_sha256(path)
    except OSError as exc:
        raise WeightsError(f"cannot read {path} to hash it ({exc.strerror}).") from exc
    for note in notes:
        log.warning("%s: %s", path, note)
    log.info("loaded %s (sha256 %s) on %s", path, sha[:12], target)
    return LoadedModel(
        model=model,
        card=card,
        warnings=tuple(notes),
        sha256=sha,
        path=path,
        int8_graph=int8_graph,
    )


def _int8_graph(obj: Any, path: Path) -> Int8Graph | None:
    """The INT8 graph a ctscreen checkpoint carries, or None."""
    if not isinstance(obj, Mapping) or obj.get("format") != CHECKPOINT_FORMAT:
        return None
    graph = obj.get("openvino_int8")
    if graph is None:
        return None
    parts = (graph.get("xml"), graph.get("bin")) if isinstance(graph, Mapping) else (None, None)
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in parts):
        raise WeightsError(f"checkpoint {path} has a damaged INT8 graph; quantize it again.")
    xml, weights = (t.contiguous().numpy().tobytes() for t in parts)
    return Int8Graph(xml=xml, weights=weights)


def _format_metric(value: Any) -> str:
    if isinstance(value, Mapping) and "value" in value:
        text = _format_number(value["value"])
        low, high = value.get("ci_low"), value.get("ci_high")
        if low is not None and high is not None:
            text += f" (95% CI {format_interval(float(low), float(high))})"
        return text
    return _format_number(value)


def _format_number(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        separator = "; " if any(isinstance(v, Mapping) for v in value) else ", "
        return separator.join(_format_number(v) for v in value)
    if isinstance(value, Mapping):
        return " ".join(f"{k} {_format_number(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _format_mapping(data: Mapping[str, Any], indent: str = "  ") -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value and "value" not in value:
            lines.append(f"{indent}{key}:")
            lines.extend(_format_mapping(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {_format_metric(value)}")
    return lines


def describe_card(loaded: LoadedModel) -> str:
    """A human-readable, multi-line description of a loaded checkpoint.

    Args:
        loaded: the result of :func:`load_checkpoint`.

    Returns:
        Text for ``ctscreen info``: architecture, preprocessing, threshold and how
        it was chosen, classes, validation metrics with confidence intervals,
        training data, version, creation time, file hash and warnings.
    """
    card = loaded.card
    pre = card.preprocess
    d, h, w = pre.shape
    n_params = count_parameters(loaded.model)
    lines = [
        f"checkpoint:     {loaded.path}",
        f"sha256:         {loaded.sha256}",
        f"architecture:   {card.architecture} (3D ResNet-18, 1-channel input, 1 logit), "
        f"{n_params / 1e6:.1f} M parameters",
        f"preprocessing:  window level {pre.window_level:g} / width {pre.window_width:g} HU "
        f"(HU {pre.hu_min:g} to {pre.hu_max:g} -> 0 to 1), resized to {d}×{h}×{w} (D×H×W)",
        f"threshold:      {card.threshold:.4f} (rule: {card.threshold_rule}); "
        f"probability >= threshold -> {card.class_names[1]}",
        f"classes:        0 = {card.class_names[0]}, 1 = {card.class_names[1]}",
        f"ctscreen:       {card.ctscreen_version}" + (" (legacy file)" if card.legacy else ""),
        f"created:        {card.created}",
    ]
    if card.validation_metrics:
        lines.append("validation metrics:")
        lines.extend(_format_mapping(card.validation_metrics))
    else:
        lines.append("validation metrics: none stored")
    if card.training_data:
        lines.append("training data:")
        lines.extend(_format_mapping(card.training_data))
    else:
        lines.append("training data: none stored")
    if card.quantization:
        lines.append("INT8 quantization:" + ("" if loaded.int8_graph else " (graph missing)"))
        lines.extend(_format_mapping(card.quantization))
    for note in loaded.warnings:
        lines.append(f"warning: {note}")
    return "\n".join(lines)
