"""The scoring worker: one long-lived child process, watched by a thread of the server.

The child loads the model once (a :class:`ctscreen.Screener`) and scores one job
at a time, sending each finished study's rows back as soon as it has them. The
parent (:class:`Worker`, a thread) writes those rows to the :class:`JobStore` and
enforces the per-study time limit: when no study finishes within
``study_timeout`` seconds, it kills the child, records the job as ``timeout``
with a sentence saying which input was being read, starts a fresh child and
goes on with the next job. A child that crashes (a segfault in a decoder, the
kernel's OOM killer) is recorded the same way, as ``failed``: neither ever
takes the server down.

Scoring in a separate process is what makes the limit real: a thread stuck in C
code (a decoder, a forward pass) cannot be stopped, a process can.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import CtscreenError, WeightsError
from ..report import ResultRow, result_rows
from ..results import StudyResult
from .store import DONE, FAILED, TIMEOUT, Job, JobStore

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the study-time histogram that ``/metrics`` exports.
STUDY_SECONDS_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class WorkerConfig:
    """How the child builds its :class:`ctscreen.Screener` (plain values: it is pickled).

    Attributes:
        weights: the checkpoint.
        device, backend, precision, threshold, min_slices, localize, batch_size,
            readers: as for ``ctscreen predict`` (see :class:`ctscreen.Screener`).
        report_pictures: draw the score curve and key slices into each job's HTML
            report (as ``predict --report``); off, the report has the cards only.
        log_level: the child's logging level (its log goes to stderr, like the server's).
    """

    weights: str
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    threshold: float | None = None
    min_slices: int = 16
    localize: bool = True
    batch_size: int | None = None
    readers: int | None = None
    report_pictures: bool = True
    log_level: str = "WARNING"


# --------------------------------------------------------------------------- child


def _die_with_parent() -> None:
    """End this process when the server dies, even by SIGKILL (it must not score on alone)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch() -> None:  # where prctl is missing (not Linux)
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="ctscreen-parent-watch", daemon=True).start()


def child_main(conn: Connection, config: WorkerConfig, scratch: str | None = None) -> None:
    """The child process: load the model, then score jobs sent over ``conn``.

    Every temporary file of the child (unpacked archives) goes under ``scratch``,
    a folder the parent removes when the child ends, also when it was killed.

    Messages in: ``("job", job_id, [paths], [names], mode, report_dir)``, ``("stop",)``.
    Messages out: ``("ready", run_info)`` or ``("fatal", sentence)`` once, then per
    job ``("rows", job_id, input_index, [ResultRow])`` for each study and
    ``("done", job_id)`` or ``("error", job_id, sentence)``.
    """
    _die_with_parent()
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = scratch
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    from .. import (
        Screener,
        html_report,  # noqa: F401 - matplotlib loads now, not in a job's time
    )

    try:
        screener = Screener(
            config.weights,
            device=config.device,
            backend=config.backend,
            precision=config.precision,
            threshold=config.threshold,
            mode="study",
            min_slices=config.min_slices,
            localize=config.localize,
            batch_size=config.batch_size,
            readers=config.readers,
        )
        run_info = dict(screener.run_info())
    except CtscreenError as exc:
        conn.send(("fatal", exc.message))
        return
    conn.send(("ready", run_info))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] != "job":
            return
        _, job_id, paths, names, mode, report_dir = message
        try:
            _score_job(conn, screener, job_id, paths, names, mode, report_dir, config, run_info)
        except CtscreenError as exc:
            conn.send(("error", job_id, exc.message))
            continue
        conn.send(("done", job_id))


def _score_job(
    conn: Connection,
    screener: Any,
    job_id: str,
    paths: Sequence[str],
    names: Sequence[str],
    mode: str,
    report_dir: str | None,
    config: WorkerConfig,
    run_info: dict[str, Any],
) -> None:
    """Score one job's inputs, sending each study's rows as soon as they exist."""
    from ..html_report import ReportWriter

    report = None
    if report_dir is not None:
        pre = screener.config
        try:
            report = ReportWriter(Path(report_dir), window=(pre.window_level, pre.window_width))
        except CtscreenError as exc:
            log.warning("job %s gets no HTML report: %s", job_id, exc.message)
    index_of = {p: i for i, p in enumerate(paths)}
    current = 0
    pictures = report is not None and config.report_pictures
    dicom = _dicom_outputs(report_dir, screener, run_info)  # hook: DICOM node jobs only
    keep_image = pictures or dicom is not None
    for result in screener.score([Path(p) for p in paths], keep_image=keep_image):
        current = index_of.get(str(result.input_path), current)
        if dicom is not None:
            result = dicom.annotate(result)
        shown = display_result(result, paths[current], names[current])
        conn.send(("rows", job_id, current, result_rows(shown, mode=mode)))
        if dicom is not None:
            dicom.add(result)
        if report is not None:
            try:
                report.add(shown if pictures else shown.without_maps())
            except CtscreenError as exc:
                log.warning("job %s: report stopped: %s", job_id, exc.message)
                report = None
    if report is not None:
        try:
            report.finish(run_info={**run_info, "service": "ctscreen serve", "job": job_id})
        except CtscreenError as exc:
            log.warning("job %s gets no HTML report: %s", job_id, exc.message)


def _dicom_outputs(report_dir: str | None, screener: Any, run_info: dict[str, Any]) -> Any:
    """The DICOM node's result writer when this job came from the node, else None."""
    if report_dir is None:
        return None
    job_dir = Path(report_dir).parent
    if not (job_dir / "dicom-node.json").is_file():
        return None  # not a node job: highdicom is not even imported
    from ..outputs.dicom import JobOutputs

    pre = screener.config
    return JobOutputs.for_job(
        job_dir, run_info=run_info, window=(pre.window_level, pre.window_width)
    )


def display_result(result: StudyResult, stored: str, name: str) -> StudyResult:
    """The result with the upload's stored path replaced by the client's file name.

    ``location`` of an upload reads ``<DATA>/jobs/<id>/uploads/0003.upload/folder`` and
    sentences name ``0003.upload``; the client knows the file as ``norma_anon.zip``.
    """
    stored_name = Path(stored).name

    def shown(text: str) -> str:
        return text.replace(stored, name).replace(stored_name, name)

    return replace(
        result,
        input_path=shown(str(result.input_path)),
        location=shown(result.location),
        error=shown(result.error),
        warnings=tuple(shown(w) for w in result.warnings),
    )


# --------------------------------------------------------------------------- parent


def _failure_rows(name: str, error: str, *, seconds: float = 0.0) -> list[ResultRow]:
    """The Failure row of an input the service had to stop (built like every other row)."""
    return result_rows(StudyResult(input_path=name, location=name, error=error, seconds=seconds))


def _exit_description(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"it was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"it was killed by signal {-code}"
    return f"it exited with code {code}"


@dataclass
class WorkerStats:
    """Counters for ``/metrics`` since this server started."""

    studies: dict[str, int] = field(default_factory=lambda: {"Success": 0, "Failure": 0})
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(STUDY_SECONDS_BUCKETS))
    seconds_sum: float = 0.0
    seconds_count: int = 0
    child_starts: int = 0
    timeouts: int = 0
    crashes: int = 0

    def observe(self, row: ResultRow) -> None:
        self.studies[row.processing_status] = self.studies.get(row.processing_status, 0) + 1
        seconds = float(row.time_of_processing)
        self.seconds_sum += seconds
        self.seconds_count += 1
        for i, bound in enumerate(STUDY_SECONDS_BUCKETS):
            if seconds <= bound:
                self.bucket_counts[i] += 1


class _JobEnded(Exception):
    """The child can no longer be used for this job (killed, crashed)."""


class Worker:
    """A thread that feeds queued jobs to the scoring child and enforces the time limit.

    Example:
        >>> worker = Worker(store, WorkerConfig("model.pth"), study_timeout=600)  # doctest: +SKIP
        >>> worker.start(); worker.wait_ready(300)  # doctest: +SKIP
    """

    def __init__(
        self,
        store: JobStore,
        config: WorkerConfig,
        *,
        study_timeout: float = 600.0,
        load_timeout: float = 600.0,
        idle_poll: float = 1.0,
    ) -> None:
        self.store = store
        self.config = config
        self.study_timeout = float(study_timeout)
        self.load_timeout = float(load_timeout)
        self.idle_poll = idle_poll
        self.stats = WorkerStats()
        self.run_info: dict[str, Any] = {}
        self.fatal = ""
        self.current_job: str | None = None
        self._ready = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._context = multiprocessing.get_context("spawn")
        #: the children's temporary folders (one each), inside the service's data folder
        self.scratch_root = store.data_dir / "tmp"
        self._scratch: Path | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the thread (it starts the child and then takes queued jobs); once only."""
        if self._thread is not None:
            return
        # No child runs yet: what is there was left by a server that was killed.
        shutil.rmtree(self.scratch_root, ignore_errors=True)
        self._thread = threading.Thread(target=self._loop, name="ctscreen-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tell the thread a job was queued (it also looks every ``idle_poll`` seconds)."""
        self._wake.set()

    def wait_ready(self, timeout: float) -> None:
        """Block until the model is loaded.

        Raises:
            WeightsError: the child could not load the model, or took longer than ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.fatal:
                raise WeightsError(self.fatal)
            if time.monotonic() > deadline:
                raise WeightsError(
                    f"the model did not load within {timeout:.0f} s; check the weight file "
                    "and the log."
                )

    def stop(self) -> None:
        """Stop the thread and the child. A job being scored goes back to the queue
        (:meth:`JobStore.release`); should the process die first, it stays ``running``
        and the next start re-queues it (:meth:`JobStore.recover`)."""
        self._stop.set()
        self._wake.set()
        self._kill_child()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def ready(self) -> bool:
        """The model is loaded and the child is alive."""
        process = self._process
        return self._ready.is_set() and process is not None and process.is_alive()

    @property
    def alive(self) -> bool:
        """The thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ child

    def _spawn_child(self) -> bool:
        """Start a child and wait for its model; False when it cannot load one."""
        parent_conn, child_conn = self._context.Pipe()
        self._scratch = self.scratch_root / f"child-{self.stats.child_starts + 1}"
        process = self._context.Process(
            target=child_main,
            args=(child_conn, self.config, str(self._scratch)),
            name="ctscreen-scorer",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self._process, self._conn = process, parent_conn
        self.stats.child_starts += 1
        deadline = time.monotonic() + self.load_timeout
        while not self._stop.is_set():
            try:
                arrived = parent_conn.poll(0.2)
            except (OSError, EOFError):  # closed by stop()
                return False
            if arrived:
                try:
                    message = parent_conn.recv()
                except (OSError, EOFError):
                    if self._stop.is_set():
                        return False
                    process.join(timeout=5)
                    message = (
                        "fatal",
                        f"the scoring process stopped while loading the model "
                        f"({_exit_description(process.exitcode)}).",
                    )
                if message[0] == "ready":
                    self.run_info = message[1]
                    self._ready.set()
                    log.info("scoring process %d ready", process.pid)
                    return True
                if self._stop.is_set():
                    return False  # stopped while loading: not a fault of the model
                self.fatal = str(message[1])
                log.error("the model could not be loaded: %s", self.fatal)
                self._kill_child()
                return False
            if not process.is_alive() and not self._stop.is_set():
                process.join(timeout=5)
                self.fatal = (
                    "the scoring process stopped while loading the model "
                    f"({_exit_description(process.exitcode)}); see the log."
                )
                self._kill_child()
                return False
            if time.monotonic() > deadline:
                self.fatal = f"the model did not load within {self.load_timeout:.0f} s."
                self._kill_child()
                return False
        return False

    def _kill_child(self) -> None:
        self._ready.clear()
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is not None and process.is_alive():
            process.kill()
        if process is not None:
            process.join(timeout=10)
        if conn is not None:
            conn.close()
        if self._scratch is not None and (process is None or not process.is_alive()):
            # what a killed child had unpacked (a finished child left nothing)
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    # ------------------------------------------------------------------ jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._process is None:
                if self.fatal or not self._spawn_child():
                    # A model that cannot load will not load on the next try either;
                    # /readyz reports it and the queue waits.
                    self._stop.wait(self.idle_poll)
                    continue
            job = self.store.next_queued()
            if job is None:
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - the worker thread must outlive any one job
                log.exception("job %s could not be run", job.id)
                with contextlib.suppress(Exception):
                    self.store.finish(
                        job.id, FAILED, "the service hit an unexpected error; see the server log."
                    )
                self._kill_child()
            finally:
                self.current_job = None

    def _run(self, job: Job) -> None:
        conn, process = self._conn, self._process
        assert conn is not None and process is not None
        self.store.start(job.id)
        self.current_job = job.id
        paths = [str(p) for p in self.store.input_paths(job)]
        names = [f.name for f in job.inputs]
        report_dir = str(self.store.job_dir(job.id) / "report")
        try:
            conn.send(("job", job.id, paths, names, job.mode, report_dir))
        except (OSError, ValueError):
            if self._stop.is_set():
                self.store.release(job.id)
                return
            raise
        log.info("job %s started (%d inputs)", job.id, len(paths))
        last_index: int | None = None
        deadline = time.monotonic() + self.study_timeout
        while True:
            if self._stop.is_set():
                self.store.release(job.id)  # scored again, from the start, after a restart
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stats.timeouts += 1
                self._kill_child()
                self._end_early(
                    job,
                    paths,
                    last_index,
                    TIMEOUT,
                    f"no study finished within {self.study_timeout:g} s (the per-study time "
                    "limit), so scoring was stopped",
                )
                return
            try:
                ready = conn.poll(min(remaining, 0.5))
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                if self._stop.is_set():
                    self.store.release(job.id)
                    return
                message = ("crash",)
            if message is None:
                if process.is_alive():
                    continue
                message = ("crash",)
            kind = message[0]
            if kind == "rows":
                _, _, index, rows = message
                self.store.add_rows(job.id, index, rows)
                for row in rows:
                    self.stats.observe(row)
                last_index = index
                deadline = time.monotonic() + self.study_timeout
            elif kind == "done":
                self.store.finish(job.id, DONE)
                return
            elif kind == "error":
                self.store.finish(job.id, FAILED, str(message[2]))
                return
            else:  # the child died
                process.join(timeout=5)  # reap it, so that its exit status is known
                code = process.exitcode
                self.stats.crashes += 1
                self._kill_child()
                self._end_early(
                    job,
                    paths,
                    last_index,
                    FAILED,
                    f"the scoring process stopped ({_exit_description(code)})",
                )
                return

    def _end_early(
        self, job: Job, paths: Sequence[str], last_index: int | None, status: str, why: str
    ) -> None:
        """Record Failure rows for the inputs left without rows, then end the job."""
        stuck = 0 if last_index is None else min(last_index + 1, len(paths) - 1)
        if last_index is not None and last_index + 1 >= len(paths):
            stuck = last_index  # the last input has more studies than were scored
        name = job.inputs[stuck].name
        self.store.add_rows(
            job.id,
            stuck,
            _failure_rows(
                name,
                f"{why} while reading {name}; the service went on with the next job.",
                seconds=self.study_timeout if status == TIMEOUT else 0.0,
            ),
        )
        for index in range(stuck + 1, len(paths)):
            other = job.inputs[index].name
            self.store.add_rows(
                job.id,
                index,
                _failure_rows(
                    other,
                    f"not scored: {name}, earlier in this job, was stopped; upload {other} "
                    "again in a job of its own.",
                ),
            )
        self.store.finish(job.id, status, f"{why} while reading {name}.")
