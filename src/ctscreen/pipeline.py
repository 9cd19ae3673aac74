"""The reading stage: inputs -> studies -> the chosen series -> network input.

For every input (zip archive, folder, DICOM file or NIfTI file) this module
discovers the studies, selects the series to score, builds its canonical
volume and preprocesses it, yielding one :class:`PreparedStudy` per study (or
per eligible series). It never runs the network: :class:`ctscreen.Screener`
does, while the next studies are read here in a background thread
(:func:`prefetched`), so decoding overlaps the forward pass with a bounded
queue and memory stays bounded by a few studies whatever the number of inputs.

Every study in gives an item out: an input or a study that cannot be read
becomes an item with ``error`` set (a sentence saying why) and the run goes on.
"""

from __future__ import annotations

import logging
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

from .chest import require_chest
from .config import PreprocessConfig, SelectionConfig
from .dicom.discover import Series, Study, discover
from .dicom.header import StudyHeader
from .dicom.select import Candidate, select_series
from .dicom.volume import build_volume
from .errors import CtscreenError, SeriesSelectionError, VolumeError
from .nifti import read_nifti
from .preprocess import preprocess
from .volume import Volume

log = logging.getLogger(__name__)

#: Failures no rule foresaw (odd DICOM reaching a library bug, a full disk while
#: unzipping, memory). They end that study with an error, never the run.
UNEXPECTED = (
    ArithmeticError,
    AttributeError,
    IndexError,
    KeyError,
    LookupError,
    MemoryError,
    OSError,
    RecursionError,
    RuntimeError,
    TypeError,
    ValueError,
)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def error_sentence(exc: BaseException, where: str) -> str:
    """The failure text for ``exc``: the library's own sentence, or one that says
    what happened and what to do for an error nobody foresaw."""
    if isinstance(exc, CtscreenError):
        return exc.message
    log.error("unexpected error on %s", where, exc_info=exc)
    return (
        f"unexpected error while reading this study ({type(exc).__name__}: {exc}); the other "
        "studies were processed; please report it with the log (--log-level DEBUG)."
    )


def error_code(exc: BaseException) -> str:
    """The stable code of ``exc``: the library's own, or the exception's type name."""
    return exc.code if isinstance(exc, CtscreenError) else type(exc).__name__


def is_nifti(path: Path) -> bool:
    """True for a file whose name ends in ``.nii`` or ``.nii.gz``."""
    return path.name.lower().endswith(NIFTI_SUFFIXES) and path.is_file()


@dataclass
class PreparedStudy:
    """One study (or series) read and preprocessed, or the reason it could not be.

    Attributes:
        input_path: the input as given.
        location: where the study was found (the task's ``path_to_study``).
        study_uid: StudyInstanceUID ("" when unknown).
        series_uid: the chosen series ("" when none could be chosen).
        reason: why this series was chosen and the others were not.
        warnings: model, input, study and volume warnings, in that order.
        array: the network input ``[D, H, W]`` float32 in [0, 1]; None on failure.
        geometry: the volume without voxels; None on failure.
        volume: the volume with its HU voxels, only when asked for (``keep_volume``).
        error: why the study failed ("" when ``array`` is set).
        error_code: the failure's stable code (``CtscreenError.code``, the exception
            type for an unforeseen error, ``TIMEOUT``; "" when ``array`` is set).
        seconds: time spent reading and preprocessing it.
        timings: ``read_s`` and ``preprocess_s``.
        header: the study's Patient/Study values and the scored series' instances
            (for the DICOM results); None when no DICOM header was read.
    """

    input_path: str
    location: str
    study_uid: str
    series_uid: str = ""
    reason: str = ""
    warnings: tuple[str, ...] = ()
    array: np.ndarray | None = None
    geometry: Volume | None = None
    volume: Volume | None = None
    error: str = ""
    error_code: str = ""
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    header: StudyHeader | None = None


def series_header(series: Series) -> StudyHeader | None:
    """The first instance's cleaned Patient/Study values, with the series' instances."""
    first = series.first.study_header
    if first is None:
        return None
    instances = tuple(
        (i.sop_class_uid, i.sop_instance_uid, max(i.number_of_frames, 1)) for i in series.instances
    )
    return first.with_instances(
        series.series_uid, instances, rows=series.first.rows, columns=series.first.columns
    )


def without_voxels(volume: Volume) -> Volume:
    """The volume's geometry and slice list, without its voxels (no memory for them)."""
    return Volume(
        hu=np.broadcast_to(np.float32(np.nan), volume.shape),
        spacing=volume.spacing,
        affine=volume.affine,
        slices=volume.slices,
        warnings=volume.warnings,
        source=volume.source,
    )


def _prepared(
    volume: Volume,
    config: PreprocessConfig,
    *,
    started: float,
    keep_volume: bool = False,
    **fields: object,
) -> PreparedStudy:
    """Preprocess ``volume`` into a :class:`PreparedStudy` (``started``: when reading began)."""
    t1 = time.perf_counter()
    array = preprocess(volume, config)
    t2 = time.perf_counter()
    warnings = tuple(fields.pop("warnings", ())) + volume.warnings  # type: ignore[arg-type]
    return PreparedStudy(
        **fields,  # type: ignore[arg-type]
        warnings=warnings,
        array=array,
        geometry=without_voxels(volume),
        volume=volume if keep_volume else None,
        seconds=t2 - started,
        timings={"read_s": t1 - started, "preprocess_s": t2 - t1},
    )


def prepare_study(
    study: Study,
    *,
    input_path: str,
    config: PreprocessConfig,
    selection: SelectionConfig,
    all_series: bool = False,
    share_seconds: float = 0.0,
    warnings: tuple[str, ...] = (),
    keep_volume: bool = False,
) -> Iterator[PreparedStudy]:
    """Select, build and preprocess the series of one discovered study.

    Args:
        study: the study as :func:`ctscreen.dicom.discover.discover` grouped it.
        input_path: the input it came from (for the table).
        config: the model card's preprocessing.
        selection: series selection rules.
        all_series: one item per eligible series instead of the chosen one only.
        share_seconds: this study's share of the input's discovery time.
        warnings: model and input warnings to put before the study's own.
        keep_volume: keep the HU volume on each item (for pictures at full resolution).
    """
    start = time.perf_counter() - share_seconds
    base = dict(input_path=input_path, location=study.location, study_uid=study.study_uid)
    notes = warnings + study.warnings
    study_header = series_header(study.series[0]) if study.series else None
    try:
        chosen = select_series(study.series, selection)
    except SeriesSelectionError as exc:
        yield PreparedStudy(
            **base,
            error=exc.message,
            error_code=exc.code,
            warnings=notes,
            seconds=time.perf_counter() - start,
            header=study_header,
        )
        return
    candidates: Sequence[Candidate] = chosen.chosen if all_series else chosen.chosen[:1]
    rejected = chosen.rejection_summary()
    for rank, candidate in enumerate(candidates):
        if rank > 0:
            start = time.perf_counter()
        reason = chosen.reason if rank == 0 else f"eligible series {rank + 1} of {len(candidates)}"
        if rejected:
            reason += f"; {rejected}"
        fields = dict(
            base,
            location=study.location_of([candidate.series]),
            series_uid=candidate.series_uid,
            reason=reason,
            warnings=notes,
            header=series_header(candidate.series),
        )
        try:
            volume = build_volume(candidate.series)
            chest_notes = require_chest(
                volume, candidate.series.first.region_tags, where=volume.source
            )
            item = _prepared(
                volume,
                config,
                started=start,
                keep_volume=keep_volume,
                **(fields | {"warnings": notes + chest_notes}),
            )
        except (CtscreenError, *UNEXPECTED) as exc:
            item = PreparedStudy(
                **fields,  # type: ignore[arg-type]
                error=error_sentence(exc, study.location),
                error_code=error_code(exc),
                seconds=time.perf_counter() - start,
            )
        yield item


def prepare_input(
    input_path: Path,
    *,
    config: PreprocessConfig,
    selection: SelectionConfig,
    all_series: bool = False,
    warnings: tuple[str, ...] = (),
    work_root: Path | None = None,
    keep_volume: bool = False,
    nifti: bool | None = None,
    one_study: bool = False,
) -> Iterator[PreparedStudy]:
    """Discover, select, decode, check and preprocess one input, study by study.

    A zip archive is extracted into a temporary folder that is removed once its
    studies have been yielded (or the iterator is closed). A NIfTI file is one
    study. Every refusal (no DICOM, no eligible series, a volume that cannot be
    stacked, not a chest CT) becomes an item with ``error`` set.

    Args:
        nifti: read ``input_path`` as a NIfTI file (True) or as DICOM (False);
            None decides by the name (``.nii``/``.nii.gz``).
        one_study: the input must hold exactly one study (a registry entry); one
            holding several gives a single failure item.
    """
    shown = str(input_path)
    start = time.perf_counter()

    def failed(exc: BaseException) -> PreparedStudy:
        return PreparedStudy(
            input_path=shown,
            location=shown,
            study_uid="",
            error=error_sentence(exc, shown),
            error_code=error_code(exc),
            warnings=warnings,
            seconds=time.perf_counter() - start,
        )

    if is_nifti(input_path) if nifti is None else nifti:
        try:
            volume = read_nifti(input_path)
            chest_notes = require_chest(volume, where=shown)
            item = _prepared(
                volume,
                config,
                started=start,
                keep_volume=keep_volume,
                input_path=shown,
                location=shown,
                study_uid="",
                reason="NIfTI file (one volume)",
                warnings=warnings + chest_notes,
            )
        except (CtscreenError, *UNEXPECTED) as exc:
            item = failed(exc)
        yield item
        return
    with tempfile.TemporaryDirectory(prefix="ctscreen-", dir=work_root) as tmp:
        try:
            found = discover(input_path, work_dir=Path(tmp) / "extract")
        except (CtscreenError, *UNEXPECTED) as exc:
            yield failed(exc)
            return
        if one_study and len(found.studies) != 1:
            yield failed(
                VolumeError(
                    f"{input_path} holds {len(found.studies)} studies; point the registry "
                    "at one study."
                )
            )
            return
        share = (time.perf_counter() - start) / len(found.studies)
        for study in found.studies:
            yield from prepare_study(
                study,
                input_path=shown,
                config=config,
                selection=selection,
                all_series=all_series,
                share_seconds=share,
                warnings=warnings + found.warnings,
                keep_volume=keep_volume,
            )


#: Default time limit for one study (discovery of its input included), in seconds:
#: the task allows 10 minutes per study.
STUDY_TIMEOUT_S = 600.0


def timeout_item(input_path: Path, limit: float, warnings: tuple[str, ...]) -> PreparedStudy:
    """The failure item of an input whose next study did not arrive within ``limit`` s."""
    shown = str(input_path)
    return PreparedStudy(
        input_path=shown,
        location=shown,
        study_uid="",
        error=(
            f"reading {input_path.name} took longer than the time limit of {limit:g} s per "
            "study, so it was stopped and the run went on; check the input (a damaged or "
            "enormous file) or raise the limit (--study-timeout)."
        ),
        error_code="TIMEOUT",
        warnings=warnings,
        seconds=limit,
    )


def with_deadline(
    make: Callable[[], Iterator[PreparedStudy]],
    *,
    input_path: Path,
    limit: float | None,
    warnings: tuple[str, ...] = (),
) -> Iterator[PreparedStudy]:
    """The items of ``make()``, each due within ``limit`` seconds of the one before.

    The items are made in a daemon thread. When one is late, a failure item says
    so and the input is abandoned: Python cannot stop a thread, so it is told to
    stop at its next item and its work area lies under the run's work root, which
    the run removes. Items that arrived before the deadline are kept.
    """
    if limit is None or limit <= 0:
        yield from make()
        return
    box: queue.Queue[object] = queue.Queue(maxsize=1)  # one study ahead bounds memory
    done = object()
    stop = threading.Event()

    def offer(obj: object) -> bool:
        """Put ``obj`` in the box unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                box.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        items = make()
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as exc:  # handed to the consumer
            offer(exc)
            return
        finally:
            items.close()
        offer(done)

    worker = threading.Thread(target=produce, name=f"ctscreen-read-{input_path.name}", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = box.get(timeout=limit)
            except queue.Empty:
                log.error("%s: no study within %g s; input abandoned", input_path, limit)
                yield timeout_item(input_path, limit, warnings)
                return
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()


@dataclass(frozen=True, kw_only=True)
class ReadSettings:
    """Everything the reading stage needs to turn an input into network inputs; no model.

    :meth:`ctscreen.Screener.read_settings` gives the settings of a loaded model, so
    a process that only reads (a Ray reading task) prepares studies exactly as the
    scorer would.

    Attributes:
        config: the model card's preprocessing (HU window, input shape).
        selection: series selection rules.
        all_series: one item per eligible series instead of the chosen one only.
        warnings: model warnings that every item carries first.
        study_timeout: seconds an input may take per study before it becomes a
            failure item (None: no limit).
        keep_volume: keep the HU volume on each item (for pictures at full resolution).
    """

    config: PreprocessConfig
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    all_series: bool = False
    warnings: tuple[str, ...] = ()
    study_timeout: float | None = None
    keep_volume: bool = False


def prepare(
    input_path: Path | str, settings: ReadSettings, *, work_root: Path | None = None
) -> Iterator[PreparedStudy]:
    """The reading stage for one input: its studies, read and preprocessed, in order.

    Every study in gives an item out (an unreadable one has ``error`` set), and an
    input whose next study takes longer than ``settings.study_timeout`` gives a
    failure item (:func:`with_deadline`). Temporary folders go under ``work_root``.

    Example:
        >>> settings = ReadSettings(config=PreprocessConfig())
        >>> [item.error for item in prepare("missing.zip", settings)]  # doctest: +SKIP
    """
    path = Path(input_path)

    def make() -> Iterator[PreparedStudy]:
        return prepare_input(
            path,
            config=settings.config,
            selection=settings.selection,
            all_series=settings.all_series,
            warnings=settings.warnings,
            work_root=work_root,
            keep_volume=settings.keep_volume,
        )

    return with_deadline(
        make, input_path=path, limit=settings.study_timeout, warnings=settings.warnings
    )


def prepare_inputs(
    inputs: Sequence[Path],
    settings: ReadSettings,
    *,
    readers: int = 1,
    work_root: Path | None = None,
) -> Iterator[PreparedStudy]:
    """:func:`prepare` for every input, in input order.

    With ``readers`` above 1, that many inputs are read at once in threads
    (decoding and resizing release the GIL; header parsing takes turns), each
    input's studies are kept until their turn comes, and at most ``readers``
    inputs are in flight. Temporary folders go under ``work_root``.
    """

    def one(path: Path) -> Iterator[PreparedStudy]:
        return prepare(path, settings, work_root=work_root)

    if readers <= 1 or len(inputs) <= 1:
        for input_path in inputs:
            yield from one(input_path)
        return
    with ThreadPoolExecutor(readers, thread_name_prefix="ctscreen-read") as pool:
        pending: deque[Future[list[PreparedStudy]]] = deque()
        upcoming = iter(inputs)
        for input_path in upcoming:
            pending.append(pool.submit(lambda p=input_path: list(one(p))))
            if len(pending) >= readers:
                break
        while pending:
            items = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(lambda p=following: list(one(p))))
            yield from items


def prepare_one_study(
    path: Path | str,
    *,
    config: PreprocessConfig,
    nifti: bool,
    selection: SelectionConfig | None = None,
    keep_volume: bool = False,
) -> PreparedStudy:
    """One registry entry (one study), read exactly as ``predict`` reads an input.

    The path is that of :func:`prepare_input`: discover, select the series
    :class:`ctscreen.Screener` would score, build its volume, check that it is a
    chest CT, preprocess. So training refuses every study ``predict`` refuses, with
    the same sentence (``error``) and code (``error_code``).

    Args:
        path: a DICOM study folder or zip, or a NIfTI file.
        config: preprocessing.
        nifti: read ``path`` as a NIfTI file instead of DICOM.
        selection: series selection rules (None: the defaults, as ``predict``).
        keep_volume: keep the HU volume on the item.

    Returns:
        The item: ``array`` set, or ``error`` saying why the study was refused
        (also when the path holds several studies).
    """
    items = prepare_input(
        Path(path),
        config=config,
        selection=selection or SelectionConfig(),
        keep_volume=keep_volume,
        nifti=nifti,
        one_study=True,
    )
    try:
        return next(items)
    finally:
        items.close()  # removes the work area of an extracted zip


def prefetched(items: Iterator[PreparedStudy], depth: int) -> Iterator[PreparedStudy]:
    """Run ``items`` in a reader thread, at most ``depth`` finished items ahead."""
    if depth <= 0:
        yield from items
        return
    box: queue.Queue[object] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # hand any crash to the consumer, never lose it
            box.put(exc)
            return
        finally:
            close = getattr(items, "close", None)
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


def batches(items: Iterator[PreparedStudy], size: int) -> Iterator[list[PreparedStudy]]:
    """``items`` in order, grouped so that each group holds at most ``size`` scorable ones.

    A failed item travels with the group it arrived in, so results keep their order.
    """
    group: list[PreparedStudy] = []
    scorable = 0
    for item in items:
        group.append(item)
        scorable += item.array is not None
        if scorable >= size:
            yield group
            group, scorable = [], 0
    if group:
        yield group
