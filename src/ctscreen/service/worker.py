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
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import WeightsError
from ..report import ResultRow, result_rows
from ..results import StudyResult
from .child import WorkerConfig, child_main
from .messages import Fatal, JobDone, JobFailed, Ready, Rows, ScoreJob
from .store import DONE, FAILED, TIMEOUT, Job, JobStore

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the study-time histogram that ``/metrics`` exports.
STUDY_SECONDS_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


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
        #: called with a job's id after the worker is done with it (the retention sweep)
        self.on_job_end: Callable[[str], None] | None = None
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
                    message = Fatal(
                        f"the scoring process stopped while loading the model "
                        f"({_exit_description(process.exitcode)})."
                    )
                if isinstance(message, Ready):
                    self.run_info = message.run_info
                    self._ready.set()
                    log.info("scoring process %d ready", process.pid)
                    return True
                if self._stop.is_set():
                    return False  # stopped while loading: not a fault of the model
                self.fatal = message.sentence if isinstance(message, Fatal) else str(message)
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
                if self.on_job_end is not None:
                    self.on_job_end(job.id)  # never raises (Retention.job_ended)

    def _run(self, job: Job) -> None:
        conn, process = self._conn, self._process
        assert conn is not None and process is not None
        self.store.start(job.id)
        self.current_job = job.id
        paths = [str(p) for p in self.store.input_paths(job)]
        names = [f.name for f in job.inputs]
        report_dir = str(self.store.job_dir(job.id) / "report")
        try:
            conn.send(ScoreJob(job.id, tuple(paths), tuple(names), job.mode, report_dir))
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
            crashed = False
            try:
                ready = conn.poll(min(remaining, 0.5))
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                if self._stop.is_set():
                    self.store.release(job.id)
                    return
                message, crashed = None, True  # the pipe broke: the child died
            if message is None and not crashed and process.is_alive():
                continue
            if isinstance(message, Rows):
                self.store.add_rows(job.id, message.input_index, message.rows)
                for row in message.rows:
                    self.stats.observe(row)
                last_index = message.input_index
                deadline = time.monotonic() + self.study_timeout
            elif isinstance(message, JobDone):
                self.store.finish(job.id, DONE)
                return
            elif isinstance(message, JobFailed):
                self.store.finish(job.id, FAILED, message.sentence)
                return
            else:  # the child died (or answered what it never sends)
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
