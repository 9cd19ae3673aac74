"""INT8 ahead of time: quantize a checkpoint from calibration studies and check it against fp32.

``ctscreen quantize model.pth --calibration DIR --check DIR -o model-int8.pth``:

1. reads the calibration studies (a folder of studies or archives read exactly as
   ``predict`` reads them, or a training cache folder of ``.npy`` entries made
   with the model's preprocessing);
2. quantizes the network with NNCF (:func:`ctscreen.backends.quantize_openvino`),
   keeping the parts named by ``keep`` in floating point;
3. scores the check studies (read as ``predict`` reads them) with PyTorch fp32 and
   with the INT8 graph: the largest |p - p_fp32|, ROC-AUC of both where
   ``labels.csv`` gives labels, and every decision that flips at the model's
   threshold, with its fp32 probability;
4. writes a copy of the checkpoint that carries the INT8 graph and, in its model
   card, what calibrated it and the check (:data:`MAX_DP`, :data:`MAX_AUC_DROP`).

A checkpoint whose check failed is still written (to look at), but ``auto``
never picks its INT8 graph.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import PreprocessConfig, SelectionConfig
from .errors import ConfigError
from .explain import sigmoid

log = logging.getLogger(__name__)

#: The check: no probability may move further than this from fp32 ...
MAX_DP = 0.01
#: ... and ROC-AUC (where labels exist) may not drop by more than this.
MAX_AUC_DROP = 0.005
#: Calibration studies used at most (the first ones, in sorted order).
DEFAULT_CALIBRATION_LIMIT = 64
#: ``keep="auto"`` tries these in order until the check passes. Measured on the three
#: demo models (README): keeping layer4 (1/8 of the input's resolution) never moved the
#: largest error, keeping layer1 (the stage at the highest resolution, after the stem)
#: brought it from 0.016-0.027 to 0.004-0.005 on two of them; layer2 is the next step.
AUTO_KEEP: tuple[tuple[str, ...], ...] = (
    ("stem", "head"),
    ("stem", "layer1", "head"),
    ("stem", "layer1", "layer2", "head"),
)


@dataclass(frozen=True)
class StudySet:
    """Network inputs read from one folder.

    Attributes:
        arrays: inputs ``[D, H, W]`` float32 in [0, 1].
        names: where each came from (study location or cache entry).
        study_uids: StudyInstanceUID of each ("" for cache entries).
        kind: ``studies`` (read as ``predict`` reads them) or ``cache`` (``.npy`` entries).
        source: the folder.
        failed: studies that could not be read, with the reason.
    """

    arrays: list[np.ndarray]
    names: list[str]
    study_uids: list[str]
    kind: str
    source: Path
    failed: list[str] = field(default_factory=list)

    def digest(self) -> str:
        """SHA-256 over the inputs (what calibrated a graph, exactly)."""
        h = hashlib.sha256()
        for a in self.arrays:
            h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        return h.hexdigest()


def _study_inputs(folder: Path) -> list[Path]:
    """The inputs of a folder of studies: its zip archives, or the folder itself."""
    archives = sorted(p for p in folder.rglob("*.zip") if p.is_file())
    return archives or [folder]


def read_studies(
    folder: Path | str,
    config: PreprocessConfig,
    *,
    limit: int | None = None,
    selection: SelectionConfig | None = None,
) -> StudySet:
    """Network inputs from ``folder``: cache entries (``*.npy``) or studies.

    A folder holding ``.npy`` files is a training cache (``ctscreen cache``): its
    entries are loaded as they are (they must have the model's shape). Any other
    folder is read as ``predict`` reads it (each zip archive in it, or the folder
    of DICOM itself), with the model's preprocessing.

    Args:
        folder: the folder.
        config: the model card's preprocessing.
        limit: keep at most this many (the first, in sorted order).
        selection: series selection (default: as ``predict``).

    Raises:
        ConfigError: the folder does not exist or gives no input of the model's shape.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of studies or cache entries.")
    entries = sorted(folder.rglob("*.npy"))
    if entries:
        return _read_cache(folder, entries[:limit], config)
    from .pipeline import ReadSettings, prepare_inputs

    settings = ReadSettings(config=config, selection=selection or SelectionConfig())
    arrays, names, uids, failed = [], [], [], []
    for item in prepare_inputs(_study_inputs(folder), settings):
        if item.array is None:
            failed.append(f"{item.location}: {item.error}")
            continue
        arrays.append(item.array)
        names.append(item.location)
        uids.append(item.study_uid)
        if limit is not None and len(arrays) >= limit:
            break
    if not arrays:
        raise ConfigError(f"no study in {folder} could be read ({'; '.join(failed[:3])}).")
    return StudySet(arrays, names, uids, "studies", folder, failed)


def _read_cache(folder: Path, entries: list[Path], config: PreprocessConfig) -> StudySet:
    from .data.cache import load_entry

    arrays = [load_entry(e) for e in entries]
    wrong = [e for e, a in zip(entries, arrays, strict=True) if a.shape != tuple(config.shape)]
    if wrong:
        raise ConfigError(
            f"cache entry {wrong[0]} is {load_entry(wrong[0]).shape}, not the model's "
            f"{tuple(config.shape)}; pass the cache folder made with this model's preprocessing."
        )
    return StudySet(
        arrays, [str(e.relative_to(folder)) for e in entries], [""] * len(arrays), "cache", folder
    )


def read_labels(folder: Path) -> dict[str, int]:
    """StudyInstanceUID -> label from ``folder/labels.csv`` (as ``ctscreen synth`` writes it);
    empty when there is no such file."""
    path = Path(folder) / "labels.csv"
    if not path.is_file():
        return {}
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"study_uid", "label"} <= set(frame.columns):
        raise ConfigError(f"{path} needs the columns study_uid and label.")
    return dict(zip(frame["study_uid"], frame["label"].astype(int), strict=True))


@dataclass(frozen=True)
class Flip:
    """A check study whose decision differs between fp32 and INT8."""

    name: str
    p_fp32: float
    p_int8: float


@dataclass(frozen=True)
class CheckResult:
    """INT8 against PyTorch fp32 on the check studies.

    Attributes:
        n_studies: studies scored.
        max_dp: largest |p_int8 - p_fp32|.
        median_dp: median |p_int8 - p_fp32|.
        threshold: the model's decision threshold.
        flips: studies whose decision differs, with both probabilities.
        auc_fp32: ROC-AUC of fp32 where labels exist (both classes), else None.
        auc_int8: ROC-AUC of INT8, likewise.
        n_labelled: studies with a label.
        passed: ``max_dp <= MAX_DP`` and (no AUC or ``auc_fp32 - auc_int8 <= MAX_AUC_DROP``).
        summary: one line saying so.
        largest: the study that moved most, with both probabilities (None without studies).
    """

    n_studies: int
    max_dp: float
    median_dp: float
    threshold: float
    flips: list[Flip]
    auc_fp32: float | None
    auc_int8: float | None
    n_labelled: int
    passed: bool
    summary: str
    largest: Flip | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flips"] = [asdict(f) for f in self.flips]
        d["largest"] = None if self.largest is None else asdict(self.largest)
        return d


def _probabilities(run: Any, arrays: Sequence[np.ndarray]) -> np.ndarray:
    batches = (np.ascontiguousarray(a, np.float32)[None, None] for a in arrays)
    logits = np.concatenate([run(x)[0] for x in batches])
    return sigmoid(logits)


def compare(
    p_fp32: np.ndarray,
    p_int8: np.ndarray,
    *,
    names: Sequence[str],
    labels: Sequence[int | None],
    threshold: float,
) -> CheckResult:
    """The check of INT8 probabilities against fp32 ones (see :class:`CheckResult`)."""
    dp = np.abs(np.asarray(p_int8) - np.asarray(p_fp32))
    flips = [
        Flip(names[i], float(p_fp32[i]), float(p_int8[i]))
        for i in np.flatnonzero((p_int8 >= threshold) != (p_fp32 >= threshold))
    ]
    known = [i for i, y in enumerate(labels) if y is not None]
    y = [int(labels[i]) for i in known]  # type: ignore[arg-type]
    auc_fp32 = auc_int8 = None
    if len(set(y)) == 2:
        from sklearn.metrics import roc_auc_score

        auc_fp32 = float(roc_auc_score(y, p_fp32[known]))
        auc_int8 = float(roc_auc_score(y, p_int8[known]))
    max_dp = float(dp.max()) if dp.size else 0.0
    top = int(np.argmax(dp)) if dp.size else None
    largest = None if top is None else Flip(names[top], float(p_fp32[top]), float(p_int8[top]))
    auc_ok = auc_fp32 is None or auc_fp32 - auc_int8 <= MAX_AUC_DROP  # type: ignore[operator]
    passed = bool(max_dp <= MAX_DP and auc_ok)
    summary = f"max |p - p_fp32| {max_dp:.4f} (limit {MAX_DP}"
    summary += f"; at p_fp32 {largest.p_fp32:.4f})" if largest is not None else ")"
    if auc_fp32 is not None:
        summary += (
            f", ROC-AUC {auc_fp32:.4f} fp32 vs {auc_int8:.4f} INT8 (drop limit {MAX_AUC_DROP})"
        )
    summary += f", {len(flips)} decisions flipped over {len(dp)} studies"
    summary = ("passed: " if passed else "FAILED: ") + summary
    return CheckResult(
        n_studies=len(dp),
        max_dp=max_dp,
        median_dp=float(np.median(dp)) if dp.size else 0.0,
        threshold=float(threshold),
        flips=flips,
        auc_fp32=auc_fp32,
        auc_int8=auc_int8,
        n_labelled=len(known),
        passed=passed,
        summary=summary,
        largest=largest,
    )


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize_checkpoint`` did."""

    out: Path
    check: CheckResult | None
    record: dict[str, Any]


def quantize_checkpoint(
    weights: Path | str,
    *,
    calibration: Path | str,
    out: Path | str,
    check: Path | str | None = None,
    keep: Sequence[str] | str | None = None,
    limit: int = DEFAULT_CALIBRATION_LIMIT,
) -> QuantizeResult:
    """Quantize ``weights`` to INT8, check it, and write ``out`` carrying the graph.

    Args:
        weights: the fp32 checkpoint.
        calibration: folder of calibration studies or cache entries (see :func:`read_studies`).
        out: the checkpoint to write (same weights; card and INT8 graph added).
        check: folder of check studies (``labels.csv`` inside gives ROC-AUC); None: no check.
        keep: parts kept in floating point (default
            :data:`ctscreen.backends.DEFAULT_KEEP`), or ``"auto"``: with a check,
            each set of :data:`AUTO_KEEP` in turn until the check passes (the
            last one tried is written when none passes); without, the first.
        limit: calibration studies used at most.

    Raises:
        WeightsError: the checkpoint cannot be loaded or ``out`` written.
        ConfigError: NNCF missing, no readable calibration study, or a bad ``keep``.
    """
    import tempfile

    import torch

    from .backends import (
        DEFAULT_KEEP,
        TorchBackend,
        load_openvino_int8,
        nncf_version,
        openvino_version,
        quantize_openvino,
    )
    from .weights import load_checkpoint, save_checkpoint

    if keep == "auto":
        tries = AUTO_KEEP if check is not None else AUTO_KEEP[:1]
    else:
        tries = (tuple(DEFAULT_KEEP if keep is None else keep),)
    loaded = load_checkpoint(weights, device="cpu")
    config = loaded.card.preprocess
    shape = tuple(config.shape)
    calib = read_studies(calibration, config, limit=limit)
    log.info("calibrating on %d %s from %s", len(calib.arrays), calib.kind, calib.source)
    scored = None
    if check is not None:
        checked = read_studies(check, config)
        truth = read_labels(Path(check))
        reference = TorchBackend(loaded.model, torch.device("cpu"), "fp32")
        scored = (checked, _probabilities(reference.run, checked.arrays))
    attempts: list[dict[str, Any]] = []
    for kept in tries:
        graph = quantize_openvino(loaded.model, shape=shape, calibration=calib.arrays, keep=kept)
        result = None
        if scored is not None:
            checked, p_fp32 = scored
            with tempfile.TemporaryDirectory(prefix="ctscreen-quantize-") as tmp:
                int8 = load_openvino_int8(
                    loaded.model,
                    graph,
                    weights_sha256=loaded.sha256,
                    weights_path=None,
                    shape=shape,
                    cache_root=Path(tmp),
                )
                p_int8 = _probabilities(int8.run, checked.arrays)
            result = compare(
                p_fp32,
                p_int8,
                names=checked.names,
                labels=[truth.get(uid) for uid in checked.study_uids],
                threshold=loaded.card.threshold,
            )
            attempts.append({"kept_in_floating_point": list(kept), "summary": result.summary})
            log.info("keeping %s in floating point: %s", ", ".join(kept), result.summary)
        if result is None or result.passed:
            break
    record: dict[str, Any] = {
        "method": "NNCF post-training quantization (MIXED preset), OpenVINO INT8",
        "kept_in_floating_point": list(kept),
        "calibration": {
            "source": str(Path(calibration).resolve()),
            "kind": calib.kind,
            "n_studies": len(calib.arrays),
            "sha256": calib.digest(),
        },
        "from_weights_sha256": loaded.sha256,
        "nncf": nncf_version(),
        "openvino": openvino_version(),
        "int8_graph_sha256": graph.sha256,
    }
    if result is not None:
        record["check"] = {"source": str(Path(check).resolve()), **result.to_dict()}  # type: ignore[arg-type]
    if len(attempts) > 1:
        record["attempts"] = attempts
    card = loaded.card.replace(quantization=record)
    save_checkpoint(Path(out), loaded.model, card, int8_graph=graph)
    return QuantizeResult(Path(out), result, record)


def iter_report(result: QuantizeResult) -> Iterator[str]:
    """Lines telling what was calibrated and what the check found."""
    cal = result.record["calibration"]
    for attempt in result.record.get("attempts", [])[:-1]:
        yield f"kept {', '.join(attempt['kept_in_floating_point'])}: {attempt['summary']}"
    yield (
        f"INT8 graph calibrated on {cal['n_studies']} {cal['kind']} from {cal['source']}; "
        f"kept in floating point: {', '.join(result.record['kept_in_floating_point']) or '-'}"
    )
    check = result.check
    if check is None:
        yield "no check studies given (--check): auto will judge INT8 by its phantom gate only"
    else:
        yield check.summary
        for flip in check.flips:
            yield f"  flipped: {flip.name}  p_fp32 {flip.p_fp32:.6f} -> p_int8 {flip.p_int8:.6f}"
    yield f"wrote {result.out}"
