"""Preprocessing cache: decode and preprocess every study once, train from disk.

Decoding a DICOM series and resizing it costs seconds per study; an epoch reads
every study, so training straight from the sources spends most of its time
decoding. The cache stores each preprocessed volume once::

    cache_dir/
      <config hash>/                 one folder per PreprocessConfig (+ format version)
        config.json                  the PreprocessConfig the entries were made with
        manifest.json                one record per study: file, status, error sentence
        <entry hash>.npy             uint8 [D, H, W], value = round(255 * x)

Keys: the folder is named by a hash of the preprocessing configuration, so a
different window or shape never reuses entries; the file is named by a hash of
``study_key`` and ``path`` as written in the registry. Source files that change
in place are not detected: pass ``rebuild=True`` (``ctscreen cache --rebuild``).

Storage: the network input lies in [0, 1]; it is stored as uint8 (``round(255 x)``),
4x smaller than float32 (3.5 MB instead of 14 MB at 96x192x192). The largest
rounding error is 1/510 of the window, 2.9 HU for the default 1500 HU lung window,
below the noise of any CT scan (about 10-20 HU), and the mean absolute error is a
quarter of that.

Every entry is written to a temporary file in the same folder and moved into
place with ``os.replace``, so an interrupted build never leaves a truncated entry.
Studies are read the way ``ctscreen predict`` reads them (the same discovery,
series choice, volume checks and chest check), so a study ``predict`` refuses (a
head CT, no eligible series) is refused here too. A study that fails or is
refused is recorded in the manifest and the report with ``predict``'s sentence and
does not stop the build.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import PreprocessConfig
from ..errors import CtscreenError, DatasetError, InputError
from ..fileio import write_atomic, write_text_atomic
from .registry import PATH_TYPES

log = logging.getLogger(__name__)

#: Bump when the on-disk format or the preprocessing code changes meaning.
CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.json"
REQUIRED_COLUMNS: tuple[str, ...] = ("study_key", "path", "path_type")
_QUANT = 255.0


@dataclass(frozen=True)
class CacheFailure:
    """A study that could not be cached.

    Attributes:
        study_key: registry key of the study.
        path: its source path.
        code: the error code (``CtscreenError.code`` or the exception type).
        message: one sentence saying what went wrong.
    """

    study_key: str
    path: str
    code: str
    message: str


@dataclass(frozen=True)
class CacheReport:
    """What :func:`build_cache` did.

    Attributes:
        root: the folder of this preprocessing configuration.
        n_total: studies asked for.
        n_reused: entries that already existed and were not decoded again.
        n_built: entries decoded and written now.
        failures: studies that failed (now or, unless retried, in an earlier run).
        seconds: wall time of the build.
    """

    root: Path
    n_total: int
    n_reused: int
    n_built: int
    failures: tuple[CacheFailure, ...]
    seconds: float

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def failed_keys(self) -> frozenset[str]:
        return frozenset(f.study_key for f in self.failures)


def _normalise(value: Any) -> Any:
    """Numbers as floats, recursively, so that -600 and -600.0 hash alike."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def config_hash(config: PreprocessConfig) -> str:
    """A short stable hash of a preprocessing configuration (and the cache format).

    Equal configurations give equal hashes whether a number was written as an
    int or a float (``-600`` and ``-600.0``).
    """
    payload = {"format": CACHE_FORMAT_VERSION, "preprocess": _normalise(config.to_dict())}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_root(cache_dir: Path | str, config: PreprocessConfig) -> Path:
    """The folder holding the entries of ``config`` inside ``cache_dir``."""
    return Path(cache_dir) / config_hash(config)


def entry_name(study_key: str, path: str) -> str:
    """File name of a study's entry: a hash of its key and source path."""
    digest = hashlib.sha256(f"{study_key}\0{path}".encode()).hexdigest()[:24]
    return f"{digest}.npy"


def entry_path(cache_dir: Path | str, config: PreprocessConfig, study_key: str, path: str) -> Path:
    """Where the entry of one study under ``config`` lives (it may not exist yet)."""
    return cache_root(cache_dir, config) / entry_name(str(study_key), str(path))


def quantize(x: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 ``round(255 x)`` (values outside [0, 1] are clipped)."""
    return np.rint(np.clip(x, 0.0, 1.0) * _QUANT).astype(np.uint8)


def dequantize(q: np.ndarray) -> np.ndarray:
    """uint8 entry -> float32 in [0, 1]."""
    return q.astype(np.float32) * np.float32(1.0 / _QUANT)


def save_entry(path: Path | str, x: np.ndarray) -> None:
    """Write one preprocessed volume (float [0, 1]) as a uint8 ``.npy``, atomically."""
    q = quantize(x)
    write_atomic(path, lambda tmp: np.save(tmp, q, allow_pickle=False))


def load_entry(path: Path | str) -> np.ndarray:
    """Read one entry back as float32 in [0, 1].

    Raises:
        DatasetError: the entry is missing or damaged.
    """
    try:
        q = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DatasetError(
            f"cache entry {path} is missing; run `ctscreen cache` again with the same settings."
        ) from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(
            f"cache entry {path} is damaged; delete it and run `ctscreen cache` again."
        ) from exc
    if q.dtype != np.uint8 or q.ndim != 3:
        raise DatasetError(
            f"cache entry {path} is not a uint8 3D volume; delete it and run "
            "`ctscreen cache` again."
        )
    return dequantize(q)


def decode_study(path: str | Path, path_type: str, config: PreprocessConfig) -> np.ndarray:
    """Read one study from its source and preprocess it (the slow path the cache saves).

    The study goes the way ``ctscreen predict`` reads an input
    (:func:`ctscreen.pipeline.prepare_one_study`: discover, select, volume, chest
    check, preprocess), so a study ``predict`` refuses is refused here with the
    same sentence and code.

    Args:
        path: DICOM study folder/zip or NIfTI file.
        path_type: ``"dicom"`` or ``"nifti"``.
        config: preprocessing.

    Returns:
        float32 ``config.shape`` in [0, 1].

    Raises:
        InputError: an unknown ``path_type``.
        CtscreenError: the study cannot be read or is refused (its ``code`` says why,
            as in ``predict``'s table).
    """
    from ..pipeline import prepare_one_study

    if path_type not in PATH_TYPES:
        raise InputError(f"unknown path_type {path_type!r}; use one of {', '.join(PATH_TYPES)}.")
    item = prepare_one_study(path, config=config, nifti=path_type == "nifti")
    if item.array is None:
        raise CtscreenError(item.error, code=item.error_code or None)
    for warning in item.warnings:
        log.info("%s: %s", path, warning)
    return item.array


def check_columns(frame: pd.DataFrame, columns: Iterable[str] = REQUIRED_COLUMNS) -> None:
    """Raise a DatasetError naming the registry columns that are missing."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"the registry lacks the column(s) {', '.join(missing)}; build it with "
            "`ctscreen registry`."
        )


@dataclass(frozen=True)
class _Task:
    study_key: str
    path: str
    path_type: str
    target: str
    config: PreprocessConfig


def _init_worker() -> None:
    """Keep each worker process to one torch thread (the pool already runs in parallel)."""
    import torch

    torch.set_num_threads(1)


def _run_task(task: _Task) -> tuple[str, str | None, str | None, float]:
    """Decode, preprocess and store one study; never raises for a bad study.

    Returns:
        ``(study_key, error_code, error_message, seconds)``; code and message are
        None on success.
    """
    start = time.perf_counter()
    try:
        x = decode_study(task.path, task.path_type, task.config)
        if tuple(x.shape) != tuple(task.config.shape):
            raise DatasetError(
                f"preprocessing gave shape {tuple(x.shape)} instead of {task.config.shape}."
            )
        save_entry(task.target, x)
    except CtscreenError as exc:
        return task.study_key, exc.code, exc.message, time.perf_counter() - start
    except (OSError, ValueError, MemoryError) as exc:
        # Unexpected but study-local failures (unreadable file, odd array) are
        # recorded so that one broken study never stops a build of thousands.
        message = f"{type(exc).__name__}: {exc}"
        return task.study_key, type(exc).__name__, message, time.perf_counter() - start
    return task.study_key, None, None, time.perf_counter() - start


def read_manifest(root: Path | str) -> dict[str, dict[str, Any]]:
    """The manifest records of a cache folder, keyed by entry file name (empty if none)."""
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(
            f"cache manifest {path} is damaged; delete it and run `ctscreen cache` again."
        ) from exc
    return {rec["file"]: rec for rec in data.get("entries", [])}


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=False, allow_nan=True)
    write_text_atomic(path, text)


def _write_manifest(root: Path, records: dict[str, dict[str, Any]]) -> None:
    entries = sorted(records.values(), key=lambda r: str(r["study_key"]))
    _write_json(root / MANIFEST_NAME, {"format": CACHE_FORMAT_VERSION, "entries": entries})


def build_cache(
    frame: pd.DataFrame,
    cache_dir: Path | str,
    config: PreprocessConfig,
    *,
    workers: int = 1,
    progress: bool = True,
    retry_failed: bool = False,
    rebuild: bool = False,
) -> CacheReport:
    """Decode and preprocess every study of a registry frame once, into the cache.

    Entries that already exist are reused without decoding. Studies recorded as
    failed in an earlier run are skipped (and reported again) unless
    ``retry_failed``.

    Args:
        frame: registry rows (``study_key``, ``path``, ``path_type``).
        cache_dir: the cache folder (created when missing).
        config: preprocessing applied to every study.
        workers: processes decoding in parallel (1 decodes in this process).
            Workers are started with the ``spawn`` method, safe with torch and
            on every platform.
        progress: draw a tqdm bar on stderr.
        retry_failed: try again the studies that failed before.
        rebuild: decode every study again, overwriting existing entries.

    Returns:
        A :class:`CacheReport`.

    Raises:
        DatasetError: the frame lacks required columns or has duplicate keys.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    check_columns(frame)
    keys = frame["study_key"].astype(str)
    if keys.duplicated().any():
        dup = keys[keys.duplicated()].iloc[0]
        raise DatasetError(f"study_key {dup!r} appears twice in the registry; keys must be unique.")
    root = cache_root(cache_dir, config)
    root.mkdir(parents=True, exist_ok=True)
    described = {"format": CACHE_FORMAT_VERSION, "preprocess": config.to_dict()}
    _write_json(root / CONFIG_NAME, described)
    records = read_manifest(root)

    tasks: list[_Task] = []
    reused = 0
    failures: list[CacheFailure] = []
    for row in frame.itertuples(index=False):
        key, src = str(row.study_key), str(row.path)
        name = entry_name(key, src)
        target = root / name
        if target.exists() and not rebuild:
            reused += 1
            records[name] = {
                **records.get(name, {}),
                "study_key": key,
                "path": src,
                "file": name,
                "status": "ok",
                "code": None,
                "message": None,
            }
            continue
        previous = records.get(name)
        if previous and previous.get("status") == "failed" and not (retry_failed or rebuild):
            failures.append(CacheFailure(key, src, str(previous["code"]), str(previous["message"])))
            continue
        tasks.append(_Task(key, src, str(row.path_type), str(target), config))

    built = 0
    by_key = {t.study_key: t for t in tasks}
    bar = tqdm(
        total=len(tasks),
        desc="caching studies",
        unit="study",
        disable=not progress or not tasks,
        dynamic_ncols=True,
    )

    def record(result: tuple[str, str | None, str | None, float]) -> None:
        nonlocal built
        key, code, message, seconds = result
        task = by_key[key]
        name = Path(task.target).name
        if code is None:
            built += 1
            records[name] = {
                "study_key": key,
                "path": task.path,
                "file": name,
                "status": "ok",
                "code": None,
                "message": None,
                "seconds": round(seconds, 3),
            }
        else:
            log.warning("cannot cache study %s (%s): %s", key, task.path, message)
            failures.append(CacheFailure(key, task.path, str(code), str(message)))
            records[name] = {
                "study_key": key,
                "path": task.path,
                "file": name,
                "status": "failed",
                "code": code,
                "message": message,
                "seconds": round(seconds, 3),
            }
        bar.update(1)

    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                record(_run_task(task))
        else:
            context = multiprocessing.get_context("spawn")
            pool = cf.ProcessPoolExecutor(
                max_workers=min(workers, len(tasks)), mp_context=context, initializer=_init_worker
            )
            try:
                futures = [pool.submit(_run_task, task) for task in tasks]
                for future in cf.as_completed(futures):
                    record(future.result())
            except BaseException:
                # Ctrl-C: drop the queued studies instead of decoding them all first
                # (the context manager's shutdown would wait for every one).
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        bar.close()
        # Written even when interrupted, so finished entries and failures are kept.
        _write_manifest(root, records)

    report = CacheReport(
        root=root,
        n_total=len(frame),
        n_reused=reused,
        n_built=built,
        failures=tuple(sorted(failures, key=lambda f: f.study_key)),
        seconds=time.perf_counter() - start,
    )
    log.info(
        "cache %s: %d studies, %d reused, %d built, %d failed (%.1f s)",
        root,
        report.n_total,
        report.n_reused,
        report.n_built,
        report.n_failed,
        report.seconds,
    )
    return report
