"""The model card every checkpoint carries (torch-free, plain types only).

A card says what the weights are, how inputs must be preprocessed, where the
decision threshold sits and how well the model did on validation. It is stored
inside the checkpoint as a plain dict (``to_dict``), never as a pickled object,
so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ._version import __version__
from .config import PreprocessConfig
from .errors import WeightsError

ARCHITECTURE = "r3d_18"
CLASS_NAMES: tuple[str, str] = ("no_pathology", "pathology")
#: Default half-width of the borderline band around the threshold. Backends and
#: reduced precision move probabilities by up to ~0.01 (benchmarks/bench_precision.py);
#: a decision within twice that of the threshold is not a firm one.
DEFAULT_BORDERLINE_BAND = 0.02
#: The dataset name the synthetic generator's registries carry.
SYNTHETIC_DATASET = "synthetic"


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint is and how to use it.

    Attributes:
        architecture: network name; only ``"r3d_18"`` (1-channel stem, 1 logit).
        preprocess: the preprocessing the weights were trained with.
        threshold: probability at or above which a study is called pathological.
        class_names: names of label 0 and label 1.
        validation_metrics: metric name -> value or ``{"value", "ci_low", "ci_high"}``.
        training_data: summary of the data (sources, counts per label, split seed).
        train_config: the resolved training configuration.
        threshold_rule: how the threshold was chosen (``"default"``, ``"youden"``, ...).
        ctscreen_version: version of ctscreen that wrote the checkpoint.
        created: ISO 8601 UTC time of writing.
        legacy: true when the card was made up for a checkpoint of the original
            implementation, which carried no preprocessing or threshold.
        quantization: for a checkpoint made by ``ctscreen quantize``: what
            calibrated its INT8 graph, what stayed in floating point, the tool
            versions and the measured check against fp32 (``check``, with
            ``passed``); empty otherwise.
        borderline_band: a probability closer than this to the threshold is
            flagged as a borderline decision.
    """

    architecture: str = ARCHITECTURE
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    threshold: float = 0.5
    class_names: tuple[str, str] = CLASS_NAMES
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    threshold_rule: str = "default"
    ctscreen_version: str = __version__
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    legacy: bool = False
    quantization: dict[str, Any] = field(default_factory=dict)
    borderline_band: float = DEFAULT_BORDERLINE_BAND

    def __post_init__(self) -> None:
        if self.architecture != ARCHITECTURE:
            raise WeightsError(
                f"unknown architecture {self.architecture!r}; ctscreen only runs {ARCHITECTURE!r}."
            )
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise WeightsError(f"threshold must lie in [0, 1], got {self.threshold}.")
        if not 0.0 <= float(self.borderline_band) < 0.5:
            raise WeightsError(f"borderline_band must lie in [0, 0.5), got {self.borderline_band}.")

    @property
    def synthetic_only(self) -> bool:
        """Whether every training and validation study was synthetic."""
        datasets = self.training_data.get("datasets") or {}
        return bool(datasets) and all(SYNTHETIC_DATASET in str(name) for name in datasets)

    def caveats(self) -> tuple[str, ...]:
        """Sentences every result scored with this model must carry (no semicolons:
        reports join them with "; ").

        A model trained on synthetic studies only, or at an input shape other than
        the standard one, says so wherever its numbers appear.
        """
        notes = []
        if self.synthetic_only:
            notes.append(
                "this model was trained on synthetic studies only (ctscreen synth or the "
                "demo), so its probabilities on real CT are not validated"
            )
        standard = PreprocessConfig().shape
        if tuple(self.preprocess.shape) != tuple(standard):
            shape = "x".join(map(str, self.preprocess.shape))
            notes.append(
                f"this model takes a {shape} input, not the standard "
                f"{'x'.join(map(str, standard))}: it sees less detail and localises coarsely"
            )
        return tuple(notes)

    def is_borderline(self, probability: float, threshold: float) -> bool:
        """Whether ``probability`` lies within :attr:`borderline_band` of ``threshold``."""
        return abs(float(probability) - float(threshold)) < float(self.borderline_band)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("preprocess"), dict):
            kwargs["preprocess"] = PreprocessConfig.from_dict(kwargs["preprocess"])
        if "class_names" in kwargs:
            kwargs["class_names"] = tuple(kwargs["class_names"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> ModelCard:
        import dataclasses

        return dataclasses.replace(self, **changes)


def failed_check(card: ModelCard) -> str | None:
    """Why the card's INT8 graph failed its recorded check, or None (passed, or none recorded)."""
    check = card.quantization.get("check") if card.quantization else None
    if not isinstance(check, dict) or check.get("passed", True):
        return None
    return str(check.get("summary") or "failed its recorded check against fp32")


def passed_check(card: ModelCard) -> bool:
    """True when the card's INT8 graph passed a recorded check against fp32."""
    check = card.quantization.get("check") if card.quantization else None
    return isinstance(check, dict) and check.get("passed") is True


def format_interval(low: float, high: float, digits: int = 4) -> str:
    """A confidence interval as text, saying so when it is undefined or has no width.

    A stratified bootstrap keeps each class's count, so when every study of a class
    gets the same decision (or the set is tiny) all resamples give one value: that is
    no interval at all, and ``0.5000 – 0.5000`` would read as certainty.

    Example:
        >>> format_interval(0.81, 0.97)
        '0.8100 – 0.9700'
        >>> format_interval(0.5, 0.5)
        'none (every resample gives 0.5000)'
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return "undefined"
    if high - low < 0.5 * 10.0**-digits:
        return f"none (every resample gives {low:.{digits}f})"
    return f"{low:.{digits}f} – {high:.{digits}f}"


@dataclass(frozen=True)
class Int8Graph:
    """An INT8 OpenVINO graph: the IR's xml and bin, as bytes.

    A quantized checkpoint carries it (``ctscreen quantize`` makes it,
    :mod:`ctscreen.backends.openvino_int8` runs it); it lives here, beside the model card,
    so that neither reading weights nor a bundle without PyTorch needs a backend.

    Attributes:
        xml: the graph (``model.xml``).
        weights: the constants (``model.bin``), INT8 weights included.
    """

    xml: bytes
    weights: bytes

    @property
    def sha256(self) -> str:
        """SHA-256 over both files (names the graph in the export cache)."""
        digest = hashlib.sha256(self.xml)
        digest.update(self.weights)
        return digest.hexdigest()
