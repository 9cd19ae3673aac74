"""Patient-grouped, label-stratified train/validation split of a registry.

Rows of one patient always land on the same side. A row's group is
``"<dataset>:<patient_id>"``; patient ids are only compared inside one dataset because
anonymised ids such as ``patient_001`` repeat across datasets. A row without a patient
id is its own group.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, DatasetError
from ..fileio import write_text_atomic
from .registry import LABELS, validate_registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitResult:
    """A train/validation split of registry study keys.

    Attributes:
        train_keys: study keys for training, in registry order.
        val_keys: study keys for validation, in registry order.
        summary: plain-type description (method, seed, counts per label and split,
            group counts), fit for JSON and the model card.
    """

    train_keys: tuple[str, ...]
    val_keys: tuple[str, ...]
    summary: dict[str, Any]


def split_groups(frame: pd.DataFrame) -> pd.Series:
    """Return the split group of every registry row.

    Args:
        frame: registry frame with ``study_key``, ``dataset`` and ``patient_id``.

    Returns:
        Group names aligned with ``frame``: ``"<dataset>:<patient_id>"``, or
        ``"study:<study_key>"`` when the patient id is empty.
    """
    patient = frame["patient_id"].fillna("").astype(str).str.strip()
    by_patient = "patient:" + frame["dataset"].astype(str) + ":" + patient
    by_study = "study:" + frame["study_key"].astype(str)
    return by_patient.where(patient != "", by_study)


def _fold_score(
    val_mask: np.ndarray, labels: np.ndarray, target: float
) -> tuple[int, float, float]:
    """Lower is better: missing classes, then size error, then class-ratio error."""
    n = len(labels)
    classes = np.unique(labels)
    missing = sum(
        int(not (labels[val_mask] == c).any()) + int(not (labels[~val_mask] == c).any())
        for c in classes
    )
    size_error = abs(val_mask.sum() / n - target)
    ratio_error = abs(labels[val_mask].mean() - labels.mean()) if val_mask.any() else 1.0
    return missing, round(size_error, 6), round(float(ratio_error), 6)


def _kfold_val_mask(
    labels: np.ndarray, groups: np.ndarray, *, n_splits: int, seed: int, target: float
) -> tuple[np.ndarray, int]:
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    best: tuple[tuple[int, float, float], int, np.ndarray] | None = None
    with warnings.catch_warnings():
        # A class smaller than n_splits only means some folds lack it; the fold score
        # below prefers folds that hold every class, so the warning adds nothing.
        warnings.simplefilter("ignore", UserWarning)
        folds = list(splitter.split(np.zeros(len(labels)), labels, groups))
    for i, (_, val_idx) in enumerate(folds):
        mask = np.zeros(len(labels), dtype=bool)
        mask[val_idx] = True
        if mask.all() or not mask.any():
            continue
        score = _fold_score(mask, labels, target)
        if best is None or score < best[0]:
            best = (score, i, mask)
    if best is None:
        raise ValueError("every fold is empty or holds everything")
    return best[2], best[1]


def _shuffle_val_mask(
    labels: np.ndarray, groups: np.ndarray, *, seed: int, target: float
) -> np.ndarray:
    """Greedy grouped split for sets too small for k-fold: add shuffled groups to val
    while they bring the per-class val counts closer to ``target`` times the totals."""
    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    rng.shuffle(names)
    classes = np.unique(labels)
    wanted = np.array([target * (labels == c).sum() for c in classes])
    have = np.zeros(len(classes))
    mask = np.zeros(len(labels), dtype=bool)
    for name in names:
        rows = groups == name
        adds = np.array([(labels[rows] == c).sum() for c in classes])
        if np.abs(have + adds - wanted).sum() < np.abs(have - wanted).sum():
            if (mask | rows).all():
                continue
            mask |= rows
            have += adds
    if not mask.any():
        mask |= groups == names[0]
    return mask


def split_registry(frame: pd.DataFrame, *, val_fraction: float = 0.2, seed: int = 0) -> SplitResult:
    """Split a registry into train and validation keys, grouped by patient.

    Uses scikit-learn's ``StratifiedGroupKFold`` with ``n_splits = round(1 /
    val_fraction)`` (at least 2), ``shuffle=True`` and ``random_state=seed``; of its
    folds, the one that holds every class on both sides and comes closest to
    ``val_fraction`` and to the overall class ratio becomes validation. When there are
    fewer groups than folds (tiny sets), a seeded greedy grouped split is used instead.
    The result depends only on the rows, ``val_fraction`` and ``seed``.

    Args:
        frame: registry frame (validated; ``study_key`` must be unique).
        val_fraction: wanted share of studies in validation, in (0, 1).
        seed: random seed.

    Returns:
        The split; no group (patient) appears on both sides.

    Raises:
        ConfigError: ``val_fraction`` is outside (0, 1).
        DatasetError: the registry is invalid or has fewer than 2 groups.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction}.")
    clean = validate_registry(frame, where="registry to split")
    groups = split_groups(clean).to_numpy()
    labels = clean["label"].to_numpy(dtype=np.int64)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise DatasetError(
            f"the registry holds {n_groups} patient group(s); a split needs at least 2 "
            "patients (or studies without a patient id)."
        )
    n_splits = max(2, round(1.0 / val_fraction))
    method, fold = "stratified_group_kfold", None
    mask = None
    if n_groups >= n_splits:
        try:
            mask, fold = _kfold_val_mask(
                labels, groups, n_splits=n_splits, seed=seed, target=val_fraction
            )
        except ValueError as exc:
            log.info("stratified group k-fold not usable (%s); using grouped shuffle", exc)
    if mask is None:
        method = "grouped_shuffle"
        mask = _shuffle_val_mask(labels, groups, seed=seed, target=val_fraction)
    keys = clean["study_key"].to_numpy()
    train_keys = tuple(str(k) for k in keys[~mask])
    val_keys = tuple(str(k) for k in keys[mask])
    summary = _summary(
        labels,
        groups,
        mask,
        method=method,
        n_splits=n_splits if fold is not None else None,
        fold=fold,
        seed=seed,
        val_fraction=val_fraction,
    )
    log.info(
        "split %d studies: %d train, %d val (%s)", len(keys), len(train_keys), len(val_keys), method
    )
    return SplitResult(train_keys, val_keys, summary)


def _summary(
    labels: np.ndarray,
    groups: np.ndarray,
    mask: np.ndarray,
    *,
    method: str,
    n_splits: int | None,
    fold: int | None,
    seed: int,
    val_fraction: float,
) -> dict[str, Any]:
    sides = {"train": ~mask, "val": mask}
    _, group_sizes = np.unique(groups, return_counts=True)
    return {
        "method": method,
        "n_splits": n_splits,
        "fold": fold,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "studies": {side: int(m.sum()) for side, m in sides.items()},
        "groups": {side: len(np.unique(groups[m])) for side, m in sides.items()},
        "counts": {
            side: {str(c): int((labels[m] == c).sum()) for c in LABELS} for side, m in sides.items()
        },
        "largest_group": int(group_sizes.max()),
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Render a split summary as short human-readable lines.

    Args:
        summary: :attr:`SplitResult.summary`.

    Returns:
        One line per split plus one describing the method.
    """
    lines = []
    for side in ("train", "val"):
        counts = summary["counts"][side]
        total = summary["studies"][side]
        pos = counts.get("1", 0)
        share = f"{pos / total:.1%}" if total else "n/a"
        lines.append(
            f"{side:5s} {total:6d} studies  {summary['groups'][side]:6d} patients  "
            f"normal(0)={counts.get('0', 0)}  pathology(1)={pos}  pathology share={share}"
        )
    how = summary["method"]
    if summary.get("n_splits"):
        how += f" (fold {summary['fold']} of {summary['n_splits']})"
    lines.append(
        f"method {how}, seed {summary['seed']}, largest patient group "
        f"{summary['largest_group']} studies"
    )
    return lines


def write_keys(keys: Iterable[str], path: str | os.PathLike[str]) -> Path:
    """Write study keys, one per line, atomically (temporary file + ``os.replace``).

    Args:
        keys: study keys (must not contain line breaks).
        path: target text file; parent folders are created.

    Returns:
        The path written.

    Raises:
        DatasetError: a key is empty or contains a line break.
    """
    path = Path(path)
    items = list(keys)
    for key in items:
        if not key or "\n" in key or "\r" in key:
            raise DatasetError(
                f"study key {key!r} cannot be written one per line; fix the registry."
            )
    write_text_atomic(path, "".join(f"{key}\n" for key in items))
    return path


def read_keys(path: str | os.PathLike[str]) -> list[str]:
    """Read study keys written by :func:`write_keys` (blank lines ignored).

    Args:
        path: the text file.

    Returns:
        The keys in file order.

    Raises:
        DatasetError: the file does not exist or lists a key twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"key file {path} does not exist; create it with `ctscreen split`.")
    keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    keys = [k for k in keys if k]
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise DatasetError(
                f"key file {path} lists {key!r} twice; rebuild it with `ctscreen split`."
            )
        seen.add(key)
    return keys
