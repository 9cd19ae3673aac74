"""How long the service keeps patient data: uploads, then results.

* **Uploads** (the studies as sent, with patient names and IDs) are removed
  ``keep_uploads`` seconds after their job ended; the default ``0`` removes them as
  soon as the job is scored. A job of the DICOM node keeps its received instances
  until its answer left the outbox (sent, or failed for good), so that nothing it
  still has to answer is lost. The job's record keeps each file's name, size and
  SHA-256.
* **Results** (rows, tables, the HTML report, the SR and key images) are removed
  ``keep_results`` seconds after the job ended (``inf``: kept until deleted); the job is
  then marked expired and the API answers 410 for its table and report.

A sweep runs when the service starts, after every job, and every ``interval``
seconds; each removal is an entry of the audit trail (:mod:`ctscreen.service.audit`).
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass, field

from .audit import RESULTS_EXPIRED, SYSTEM, UPLOADS_REMOVED, AuditTrail
from .store import FINAL_STATUSES, JobStore

log = logging.getLogger(__name__)

DAY = 86400.0


@dataclass(frozen=True)
class RetentionPolicy:
    """How long uploads and results are kept.

    Attributes:
        keep_uploads: seconds after a job ended that its uploaded files are kept (0: none).
        keep_results: seconds after a job ended that its results are kept (``math.inf``:
            until deleted).
        interval: seconds between two sweeps.
    """

    keep_uploads: float = 0.0
    keep_results: float = 30 * DAY
    interval: float = 60.0


@dataclass
class Swept:
    """What one sweep removed: job ids."""

    uploads: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)


def _final_jobs(store: JobStore, column: str, ended_before: float) -> list[str]:
    marks = ",".join("?" * len(FINAL_STATUSES))
    return [
        job_id
        for (job_id,) in store._query(
            f"SELECT id FROM jobs WHERE status IN ({marks}) AND {column} IS NULL "
            "AND finished <= ? ORDER BY finished",
            (*FINAL_STATUSES, ended_before),
        )
    ]


def answer_pending(store: JobStore, job_id: str) -> bool:
    """The job is the DICOM node's and its answer has not left the outbox yet."""
    tables = {name for (name,) in store._query("SELECT name FROM sqlite_master")}
    if "node_jobs" not in tables:
        return False
    found = store._query(
        "SELECT 1 FROM node_jobs n WHERE n.job_id = ? AND (n.state != 'outbox' OR EXISTS "
        "(SELECT 1 FROM outbox o WHERE o.job_id = n.job_id AND o.state = 'pending'))",
        (job_id,),
    )
    return bool(found)


def remove_uploads(store: JobStore, job_id: str) -> None:
    """Remove a job's uploaded files; its record keeps their names, sizes and hashes."""
    shutil.rmtree(store.job_dir(job_id) / "uploads", ignore_errors=True)
    with store._transaction() as db:
        db.execute("UPDATE jobs SET uploads_removed = ? WHERE id = ?", (time.time(), job_id))


def expire(store: JobStore, job_id: str) -> None:
    """Remove a job's results (rows, tables, report, DICOM answers) and its uploads, and
    mark it expired; its record (inputs' names, sizes, hashes; times) stays."""
    shutil.rmtree(store.job_dir(job_id), ignore_errors=True)
    now = time.time()
    with store._transaction() as db:
        db.execute("DELETE FROM rows WHERE job_id = ?", (job_id,))
        db.execute(
            "UPDATE jobs SET expired = ?, uploads_removed = COALESCE(uploads_removed, ?) "
            "WHERE id = ?",
            (now, now, job_id),
        )


def sweep(
    store: JobStore, policy: RetentionPolicy, audit: AuditTrail, *, now: float | None = None
) -> Swept:
    """Remove what the policy no longer keeps; returns what was removed."""
    now = time.time() if now is None else now
    swept = Swept()
    if policy.keep_results != math.inf:
        for job_id in _final_jobs(store, "expired", now - policy.keep_results):
            expire(store, job_id)
            swept.expired.append(job_id)
            audit.record(
                RESULTS_EXPIRED,
                actor=SYSTEM,
                role="system",
                job_id=job_id,
                detail=f"--keep-results {policy.keep_results:g} s",
            )
        if swept.expired:
            # the all-jobs tables written for downloads hold rows of the expired jobs
            shutil.rmtree(store.data_dir / "results", ignore_errors=True)
    for job_id in _final_jobs(store, "uploads_removed", now - policy.keep_uploads):
        if answer_pending(store, job_id):
            continue
        remove_uploads(store, job_id)
        swept.uploads.append(job_id)
        audit.record(
            UPLOADS_REMOVED,
            actor=SYSTEM,
            role="system",
            job_id=job_id,
            detail=f"--keep-uploads {policy.keep_uploads:g} s",
        )
    if swept.uploads or swept.expired:
        log.info(
            "retention: uploads of %d job(s) removed, results of %d job(s) expired",
            len(swept.uploads),
            len(swept.expired),
        )
    return swept


class Retention:
    """A thread that sweeps at start, every ``policy.interval`` seconds and when woken
    (:meth:`job_ended`, which the worker calls after each job)."""

    def __init__(self, store: JobStore, policy: RetentionPolicy, audit: AuditTrail) -> None:
        self.store = store
        self.policy = policy
        self.audit = audit
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> Swept:
        """One sweep now (one at a time)."""
        with self._lock:
            return sweep(self.store, self.policy, self.audit)

    def job_ended(self, job_id: str) -> None:
        """Remove a just-ended job's uploads now when nothing keeps them."""
        del job_id  # the sweep finds it, and any other job now due
        self._safe_sweep()

    def _safe_sweep(self) -> None:
        try:
            self.sweep()
        except Exception:  # noqa: BLE001 - the next sweep tries again
            log.exception("retention sweep failed; trying again later")

    def start(self) -> None:
        if self._thread is None:
            self._safe_sweep()
            self._thread = threading.Thread(target=self._loop, name="ctscreen-retention")
            self._thread.daemon = True
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.policy.interval):
            self._safe_sweep()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
