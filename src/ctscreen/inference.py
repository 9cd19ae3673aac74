"""Inputs in, one result row per study (or series, or slice) out.

The work is a two-stage pipeline. A reader thread discovers each input,
selects the series, decodes and preprocesses it; the main thread runs the
network. The queue between them holds at most ``prefetch`` studies, so memory
stays bounded by a few studies whatever the number of inputs, and decoding the
next study overlaps the forward pass of the current one (PyTorch releases the
GIL while it computes).

Every study in gives a row out: an input or a study that cannot be processed
becomes a ``Failure`` row with a sentence saying why, and the run goes on.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends import Backend, make_backend
from .config import PreprocessConfig, SelectionConfig
from .dicom.discover import Study, discover
from .dicom.select import Candidate, select_series
from .dicom.volume import build_volume
from .errors import ConfigError, CtscreenError, SeriesSelectionError
from .explain import localization_box, slice_scores
from .preprocess import preprocess
from .report import FAILURE, SUCCESS, ResultRow
from .volume import Volume
from .weights import LoadedModel

log = logging.getLogger(__name__)

MODES = ("study", "series", "slice")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# --------------------------------------------------------------------------- scoring


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete precision for ``device``.

    ``auto`` means bf16 where the hardware computes it natively (CUDA with bf16
    support, or a CPU with AVX512-BF16/AMX), else fp32.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


@dataclass
class Scorer:
    """Runs the network on preprocessed arrays.

    Attributes:
        loaded: the checkpoint (model, card, warnings).
        device: where the network runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; the stem and the head stay fp32).
        backend: ``torch`` (default), ``openvino``, ``onnxruntime`` or ``auto`` (see
            :mod:`ctscreen.backends`);
            a backend that cannot load or run falls back to PyTorch with one warning.
        cache_dir: where an exported graph is kept; default beside the weights, or
            the user cache when that folder is read-only.
        engine: the backend in use (``engine.name``, ``engine.precision`` say which).
    """

    loaded: LoadedModel
    device: torch.device
    precision: str = "fp32"
    backend: str = "torch"
    cache_dir: Path | None = None
    bias: float = field(init=False)
    engine: Backend = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.loaded.model.to(self.device).eval()
        self.bias = float(self.loaded.model.fc.bias.detach().float().cpu()[0])
        self.engine = make_backend(
            self.loaded.model,
            device=self.device,
            backend=self.backend,
            precision=self.precision,
            weights_sha256=self.loaded.sha256,
            weights_path=self.loaded.path,
            shape=tuple(self.config.shape),
            cache_root=self.cache_dir,
        )

    @property
    def config(self) -> PreprocessConfig:
        return self.loaded.card.preprocess

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[B]`` and activation maps ``[B, d', h', w']`` for ``batch [B, D, H, W]``.

        Raises:
            ConfigError: ``batch`` does not have the model card's input shape.
        """
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.config.shape):
            raise ConfigError(
                f"the model takes [B, {', '.join(map(str, self.config.shape))}] but got "
                f"{list(batch.shape)}; preprocess with the model card's settings."
            )
        return self.engine.run(np.ascontiguousarray(batch, dtype=np.float32)[:, None])


# --------------------------------------------------------------------------- jobs

#: Failures no rule foresaw (odd DICOM reaching a library bug, a full disk while
#: unzipping, memory). They end that study with a Failure row, never the run.
_UNEXPECTED = (
    ArithmeticError,
    AttributeError,
    IndexError,
    KeyError,
    LookupError,
    MemoryError,
    OSError,
    RuntimeError,
    TypeError,
    ValueError,
)


def error_sentence(exc: BaseException, where: str) -> str:
    """The Failure text for ``exc``: the library's own sentence, or one that says
    what happened and what to do for an error nobody foresaw."""
    if isinstance(exc, CtscreenError):
        return exc.message
    log.error("unexpected error on %s", where, exc_info=exc)
    return (
        f"unexpected error while reading this study ({type(exc).__name__}: {exc}); the other "
        "studies were processed; please report it with the log (--log-level DEBUG)."
    )


@dataclass(frozen=True)
class PredictOptions:
    """What to produce.

    Attributes:
        mode: ``study`` (one row per study), ``series`` (one per eligible series)
            or ``slice`` (one per slice of the scored series).
        threshold: decision threshold; None uses the model card's.
        selection: series selection rules.
        localize: fill ``pathology_localization`` for studies called pathological.
        prefetch: studies decoded ahead of the network (bounds memory); at least
            ``batch_size`` are, so that the next batch decodes while one is scored.
        batch_size: studies per forward pass. 1 on the CPU (a bigger batch is not
            faster there and holds more memory); a few on a GPU, where one study
            leaves most of the device idle.
        readers: inputs read at once by reader threads (1: one after another). More
            than 1 helps where the network outruns reading (a GPU) and cores are
            free; each reader holds the studies of one input.
    """

    mode: str = "study"
    threshold: float | None = None
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    localize: bool = True
    prefetch: int = 2
    batch_size: int = 1
    readers: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        if self.batch_size < 1:
            raise ConfigError(f"the batch size must be at least 1, not {self.batch_size}.")
        if self.readers < 1:
            raise ConfigError(f"the number of readers must be at least 1, not {self.readers}.")


@dataclass
class _Job:
    """One unit for the network, or a failure that skips it."""

    input_path: str
    location: str
    study_uid: str
    series_uid: str = ""
    reason: str = ""
    warnings: tuple[str, ...] = ()
    array: np.ndarray | None = None
    volume_meta: Volume | None = None
    error: str = ""
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def _volume_meta(volume: Volume) -> Volume:
    """The volume without its voxels (kept for localisation and per-slice rows)."""
    return Volume(
        hu=np.broadcast_to(np.float32(np.nan), volume.shape),  # right shape, no memory
        spacing=volume.spacing,
        affine=volume.affine,
        slices=volume.slices,
        warnings=volume.warnings,
        source=volume.source,
    )


def _study_jobs(
    study: Study,
    *,
    input_path: str,
    options: PredictOptions,
    config: PreprocessConfig,
    share_seconds: float,
    input_warnings: tuple[str, ...],
    model_warnings: tuple[str, ...] = (),
) -> Iterator[_Job]:
    start = time.perf_counter()
    base = dict(input_path=input_path, location=study.location, study_uid=study.study_uid)
    notes = model_warnings + input_warnings + study.warnings
    try:
        selection = select_series(study.series, options.selection)
    except SeriesSelectionError as exc:
        yield _Job(
            **base,
            error=exc.message,
            warnings=notes,
            seconds=share_seconds + time.perf_counter() - start,
        )
        return
    candidates: Sequence[Candidate] = (
        selection.chosen if options.mode == "series" else selection.chosen[:1]
    )
    rejected = selection.rejection_summary()
    for rank, candidate in enumerate(candidates):
        t0 = time.perf_counter()
        reason = (
            selection.reason if rank == 0 else f"eligible series {rank + 1} of {len(candidates)}"
        )
        if rejected:
            reason += f"; {rejected}"
        try:
            volume = build_volume(candidate.series)
            t1 = time.perf_counter()
            array = preprocess(volume, config)
            t2 = time.perf_counter()
        except (CtscreenError, *_UNEXPECTED) as exc:
            yield _Job(
                **base,
                series_uid=candidate.series_uid,
                reason=reason,
                warnings=notes,
                error=error_sentence(exc, study.location),
                seconds=share_seconds + time.perf_counter() - start,
            )
            continue
        share = share_seconds if rank == 0 else 0.0
        select_seconds = (t0 - start) if rank == 0 else 0.0
        yield _Job(
            **base,
            series_uid=candidate.series_uid,
            reason=reason,
            warnings=notes + volume.warnings,
            array=array,
            volume_meta=_volume_meta(volume),
            seconds=share + select_seconds + (t2 - t0),
            timings={"read_s": share + select_seconds + (t1 - t0), "preprocess_s": t2 - t1},
        )
        del volume


def _input_jobs(
    input_path: Path,
    *,
    options: PredictOptions,
    config: PreprocessConfig,
    model_warnings: tuple[str, ...],
) -> Iterator[_Job]:
    """Discover, select, decode and preprocess one input, study by study."""
    shown = str(input_path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctscreen-") as tmp:
        try:
            found = discover(input_path, work_dir=Path(tmp) / "extract")
        except (CtscreenError, *_UNEXPECTED) as exc:
            yield _Job(
                input_path=shown,
                location=shown,
                study_uid="",
                error=error_sentence(exc, shown),
                warnings=model_warnings,
                seconds=time.perf_counter() - start,
            )
            return
        share = (time.perf_counter() - start) / len(found.studies)
        for study in found.studies:
            yield from _study_jobs(
                study,
                input_path=shown,
                options=options,
                config=config,
                share_seconds=share,
                input_warnings=found.warnings,
                model_warnings=model_warnings,
            )


def iter_jobs(
    inputs: Sequence[Path],
    *,
    options: PredictOptions,
    config: PreprocessConfig,
    model_warnings: tuple[str, ...] = (),
) -> Iterator[_Job]:
    """Discover, select, decode and preprocess every input, in input order.

    With ``options.readers`` above 1, that many inputs are read at once in
    threads (decoding and resizing release the GIL; header parsing takes turns),
    each input's studies are kept until their turn comes, and at most
    ``readers`` inputs are in flight.
    """

    def one(path: Path) -> Iterator[_Job]:
        return _input_jobs(path, options=options, config=config, model_warnings=model_warnings)

    if options.readers <= 1 or len(inputs) <= 1:
        for input_path in inputs:
            yield from one(input_path)
        return
    with ThreadPoolExecutor(options.readers, thread_name_prefix="ctscreen-read") as pool:
        pending: deque[Future[list[_Job]]] = deque()
        upcoming = iter(inputs)
        for input_path in upcoming:
            pending.append(pool.submit(lambda p=input_path: list(one(p))))
            if len(pending) >= options.readers:
                break
        while pending:
            jobs = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(lambda p=following: list(one(p))))
            yield from jobs


def _prefetched(jobs: Iterator[_Job], depth: int) -> Iterator[_Job]:
    """Run ``jobs`` in a reader thread, at most ``depth`` finished jobs ahead."""
    if depth <= 0:
        yield from jobs
        return
    box: queue.Queue[object] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for job in jobs:
                while not stop.is_set():
                    try:
                        box.put(job, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # hand any crash to the consumer, never lose it
            box.put(exc)
            return
        finally:
            close = getattr(jobs, "close", None)
            if close is not None:
                close()  # removes the work area of an input left half-read
        box.put(done)

    worker = threading.Thread(target=produce, name="ctscreen-reader", daemon=True)
    worker.start()
    try:
        while True:
            item = box.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join(timeout=5)


# --------------------------------------------------------------------------- rows


def _failure_row(job: _Job) -> ResultRow:
    return ResultRow(
        path_to_study=job.location,
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        processing_status=FAILURE,
        time_of_processing=round(job.seconds, 3),
        error=job.error,
        warnings=job.warnings,
        series_reason=job.reason,
        input_path=job.input_path,
    )


def _rows_for(
    job: _Job,
    logit: float,
    cam: np.ndarray,
    *,
    scorer: Scorer,
    options: PredictOptions,
    threshold: float,
    model_seconds: float,
) -> list[ResultRow]:
    probability = float(1.0 / (1.0 + np.exp(-logit)))
    label = int(probability >= threshold)
    volume = job.volume_meta
    assert volume is not None
    box = localization_box(cam, volume) if (options.localize and label == 1) else None
    seconds = round(job.seconds + model_seconds, 3)
    common = dict(
        path_to_study=job.location,
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        processing_status=SUCCESS,
        time_of_processing=seconds,
        warnings=job.warnings,
        series_reason=job.reason,
        n_slices=volume.shape[0],
        input_path=job.input_path,
    )
    if options.mode != "slice":
        return [
            ResultRow(
                **common,
                probability_of_pathology=round(probability, 6),
                pathology=label,
                pathology_localization=box,
                extras={
                    k: round(v, 3) for k, v in (job.timings | {"model_s": model_seconds}).items()
                },
            )
        ]
    scores = slice_scores(cam, scorer.bias, volume.shape[0])
    rows = []
    for index, (ref, score) in enumerate(zip(volume.slices, scores, strict=True)):
        rows.append(
            ResultRow(
                **common,
                probability_of_pathology=round(float(score), 6),
                pathology=int(score >= threshold),
                pathology_localization=box,
                extras={
                    "slice_index": index,
                    "instance_number": ref.instance_number,
                    "sop_instance_uid": ref.sop_instance_uid,
                    "frame": ref.frame,
                    "study_probability": round(probability, 6),
                    "study_pathology": label,
                },
            )
        )
    return rows


@dataclass(frozen=True, eq=False)
class StudyVisual:
    """What a visual report needs of one scored series, handed over right after its forward pass.

    The arrays belong to the run: a consumer renders what it needs during the
    callback and keeps no reference to them, so memory stays bounded by one study.

    Attributes:
        rows: the rows made for this series (one, or one per slice in per-slice mode).
        probability: the study probability (also in per-slice mode).
        pathology: 1 when ``probability`` reaches ``threshold``, else 0.
        threshold: the decision threshold of the run.
        image: the network input, float32 ``[D', H', W']`` in [0, 1] (the model
            card's HU window, canonical orientation, resized to the card's shape).
        cam: the class activation map ``[d', h', w']`` in logit units (bias excluded).
        bias: the bias of the network head, so that ``cam.mean() + bias`` is the logit.
        volume: the scored volume's geometry (shape, spacing, affine; no voxels).
        window: ``(level, width)`` in HU that maps ``image`` to [0, 1].
    """

    rows: tuple[ResultRow, ...]
    probability: float
    pathology: int
    threshold: float
    image: np.ndarray
    cam: np.ndarray
    bias: float
    volume: Volume
    window: tuple[float, float]

    @property
    def box(self) -> tuple[float, ...] | None:
        """The localisation box of the rows (LPS mm), or None."""
        return self.rows[0].pathology_localization if self.rows else None


@dataclass
class RunStats:
    """Counts and stage timings of one run."""

    studies: int = 0
    failures: int = 0
    model_seconds: float = 0.0
    wall_seconds: float = 0.0
    outputs: list[dict[str, object]] = field(default_factory=list)


def _batches(jobs: Iterator[_Job], size: int) -> Iterator[list[_Job]]:
    """``jobs`` in order, grouped so that each group holds at most ``size`` scorable jobs.

    A failed job travels with the group it arrived in, so rows keep their order.
    """
    group: list[_Job] = []
    scorable = 0
    for job in jobs:
        group.append(job)
        scorable += job.array is not None
        if scorable >= size:
            yield group
            group, scorable = [], 0
    if group:
        yield group


def default_batch_size(device: torch.device) -> int:
    """Studies per forward pass on ``device``: 1 on the CPU, 4 on a GPU."""
    return 4 if device.type == "cuda" else 1


def default_readers(device: torch.device) -> int:
    """Reader threads for ``device``: 1 on the CPU; on a GPU one per 4 cores, at most 4."""
    if device.type != "cuda":
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) // 4))


def predict(
    inputs: Sequence[Path],
    *,
    scorer: Scorer,
    options: PredictOptions | None = None,
    on_row: Callable[[ResultRow], None] | None = None,
    on_study: Callable[[StudyVisual], None] | None = None,
    stats: RunStats | None = None,
) -> list[ResultRow]:
    """Score every study of every input.

    Args:
        inputs: zip archives, folders or files, in the order given.
        scorer: the network and how to run it.
        options: output mode, threshold, selection rules, batch size.
        on_row: called with each row as soon as it exists (progress display).
        on_study: called once per scored series, right after its forward pass and
            before its rows reach ``on_row``, with the input, the activation map and
            the rows (visual report); not called for Failure rows.
        stats: filled with counts and timings when given.

    Returns:
        All rows, in input order then study order (whatever the batch size).
    """
    options = options or PredictOptions()
    threshold = scorer.loaded.card.threshold if options.threshold is None else options.threshold
    stats = stats if stats is not None else RunStats()
    start = time.perf_counter()
    rows: list[ResultRow] = []
    jobs = _prefetched(
        iter_jobs(
            inputs, options=options, config=scorer.config, model_warnings=scorer.loaded.warnings
        ),
        max(options.prefetch, options.batch_size),
    )
    for group in _batches(jobs, options.batch_size):
        scored = [job for job in group if job.array is not None]
        results: dict[int, tuple[float, np.ndarray]] = {}
        model_seconds = 0.0
        if scored:
            t0 = time.perf_counter()
            logits, cams = scorer.score(np.stack([job.array for job in scored]))
            batch_seconds = time.perf_counter() - t0
            stats.model_seconds += batch_seconds
            model_seconds = batch_seconds / len(scored)  # each study's share
            results = {
                id(job): (float(lg), cam) for job, lg, cam in zip(scored, logits, cams, strict=True)
            }
        for job in group:
            stats.studies += 1
            if job.array is None:
                stats.failures += 1
                new_rows = [_failure_row(job)]
            else:
                logit, cam = results[id(job)]
                new_rows = _rows_for(
                    job,
                    logit,
                    cam,
                    scorer=scorer,
                    options=options,
                    threshold=threshold,
                    model_seconds=model_seconds,
                )
                if on_study is not None:
                    on_study(_visual(job, new_rows, logit, cam, scorer=scorer, threshold=threshold))
            job.array = None  # the batch's inputs are not kept past their rows
            for row in new_rows:
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    stats.wall_seconds = time.perf_counter() - start
    return rows


def _visual(
    job: _Job,
    rows: list[ResultRow],
    logit: float,
    cam: np.ndarray,
    *,
    scorer: Scorer,
    threshold: float,
) -> StudyVisual:
    probability = float(1.0 / (1.0 + np.exp(-logit)))
    config = scorer.config
    assert job.array is not None and job.volume_meta is not None
    return StudyVisual(
        rows=tuple(rows),
        probability=probability,
        pathology=int(probability >= threshold),
        threshold=threshold,
        image=job.array,
        cam=cam,
        bias=scorer.bias,
        volume=job.volume_meta,
        window=(config.window_level, config.window_width),
    )
