"""The scoring child of ``ctscreen serve``: one process that loads the model once and
scores one job at a time (started and watched by :class:`~ctscreen.service.worker.Worker`).

Scoring in a separate process is what makes the per-study limit real: a thread stuck
in C code (a decoder, a forward pass) cannot be stopped, a process can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import CtscreenError
from ..report import result_rows
from ..results import StudyResult
from .messages import Fatal, JobDone, JobFailed, Ready, Rows, ScoreJob

log = logging.getLogger(__name__)


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
    The messages are those of :mod:`ctscreen.service.messages`.
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
        conn.send(Fatal(exc.message))
        return
    conn.send(Ready(run_info))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if not isinstance(message, ScoreJob):
            return
        try:
            _score_job(conn, screener, message, config, run_info)
        except CtscreenError as exc:
            conn.send(JobFailed(message.job_id, exc.message))
            continue
        conn.send(JobDone(message.job_id))


def _score_job(
    conn: Connection,
    screener: Any,
    job: ScoreJob,
    config: WorkerConfig,
    run_info: dict[str, Any],
) -> None:
    """Score one job's inputs, sending each study's rows as soon as they exist."""
    from ..html_report import ReportWriter

    job_id, paths, names, mode, report_dir = (
        job.job_id,
        job.paths,
        job.names,
        job.mode,
        job.report_dir,
    )
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
        conn.send(Rows(job_id, current, result_rows(shown, mode=mode)))
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
