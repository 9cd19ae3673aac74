"""What the DICOM node keeps across restarts: studies being received, its jobs, the outbox.

The node's tables live in the service's one database (``DATA/ctscreen.db``, beside
the ``jobs`` table of :class:`~ctscreen.service.store.JobStore`, over the same
connection)::

    incoming   a study whose instances are arriving (its folder under DATA/dicom-in/),
               with the cleaned header of its first instance
    node_jobs  a received study made into a job, whether it was screened and why not
    outbox     one result file (SR or key image) for one destination, with its attempts
               and next try; or a ``failed`` item saying why a study's answer is missing
               or incomplete
    refused    instances refused at C-STORE (unreadable, not CT), with the calling AE

A result stays in the outbox, on disk, until the destination confirmed it by a
successful C-STORE status; a restart, a destination that is down or refuses, all
leave it there to be tried again. A database of the previous release
(``DATA/dicom-node.db``) is copied in once and renamed ``dicom-node.db.migrated``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .database import Database
from .node_schema import OLD_DB_NAME, create_tables, merge_old_database

log = logging.getLogger(__name__)


#: node_jobs.state: scored by the worker (results not yet in the outbox).
SCORING = "scoring"
#: node_jobs.state: its results are in the outbox (or there were none).
QUEUED_OUT = "outbox"

#: node_jobs.outcome (once its results are in the outbox)
SCREENED = "screened"
NOT_SCREENED = "not_screened"

#: outbox.state
PENDING = "pending"
SENT = "sent"
GONE = "gone"  # the file disappeared (its job was deleted): nothing left to send
FAILED = "failed"  # an answer that could not be built (see last_error); never sent
STATES = (PENDING, SENT, GONE, FAILED)


@dataclass(frozen=True)
class Incoming:
    """A study being received.

    Attributes:
        study_uid: its StudyInstanceUID.
        folder: where its instances are written (a generated name).
        calling_ae: the AE title that sent its first instance.
        first, last: Unix times of its first and latest instance.
        instances: instances stored (a re-sent instance counts again).
        receiving: associations that sent it and are still open.
        aborted: why it may be incomplete ("" when not): an association aborted
            while sending it, or the service stopped during one.
    """

    study_uid: str
    folder: str
    calling_ae: str
    first: float
    last: float
    instances: int
    receiving: int
    aborted: str
    header: str = field(default="", repr=False)


@dataclass(frozen=True)
class OutboxItem:
    """One result file waiting to be sent (or sent)."""

    id: int
    job_id: str
    path: str
    state: str
    attempts: int
    next_try: float
    last_error: str
    destination: str


@dataclass(frozen=True)
class Refusal:
    """An instance refused at C-STORE."""

    time: float
    calling_ae: str
    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    reason: str


_INCOMING = "study_uid, folder, calling_ae, first, last, instances, receiving, aborted, header"


class NodeStore:
    """The node's tables in the job store's database (thread-safe: the job store's one
    connection and lock).

    Args:
        db: the service's database (a :class:`~ctscreen.service.store.JobStore`).

    Raises:
        ConfigError: the tables cannot be made.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._db = db._db
        self._lock = db._lock
        self._transaction = db._transaction
        self._query = db._query
        with self._lock:
            create_tables(self._db)
            merge_old_database(self._db, db.path.parent / OLD_DB_NAME)

    def close(self) -> None:
        """Nothing to close: the connection is the job store's."""

    # ------------------------------------------------------------------ incoming

    def receive(self, study_uid: str, calling_ae: str, new_folder: str, header: str = "") -> str:
        """Record one arriving instance of ``study_uid``; returns the study's folder
        (``new_folder`` when the study is new, which keeps ``header``, the JSON of
        its first instance's cleaned header)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT folder FROM incoming WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO incoming (study_uid, folder, calling_ae, first, last, instances, "
                    "header) VALUES (?, ?, ?, ?, ?, 1, ?)",
                    (study_uid, new_folder, calling_ae, now, now, header),
                )
                return new_folder
            db.execute(
                "UPDATE incoming SET last = ?, instances = instances + 1 WHERE study_uid = ?",
                (now, study_uid),
            )
            return str(row[0])

    def association_opened(self, study_uid: str) -> None:
        """An association started sending ``study_uid``."""
        with self._transaction() as db:
            db.execute(
                "UPDATE incoming SET receiving = receiving + 1 WHERE study_uid = ?", (study_uid,)
            )

    def association_closed(self, study_uid: str, *, aborted: str = "") -> None:
        """An association that sent ``study_uid`` ended: released (``aborted`` empty,
        which also clears an earlier abort: the study was sent again) or aborted."""
        with self._transaction() as db:
            db.execute(
                "UPDATE incoming SET receiving = MAX(receiving - 1, 0), aborted = ? "
                "WHERE study_uid = ?",
                (aborted, study_uid),
            )

    def recover_incoming(self) -> list[str]:
        """On start: studies an association was still sending when the service stopped
        are marked as possibly incomplete. Returns their UIDs."""
        with self._transaction() as db:
            uids = [
                r[0]
                for r in db.execute("SELECT study_uid FROM incoming WHERE receiving > 0").fetchall()
            ]
            db.execute(
                "UPDATE incoming SET receiving = 0, aborted = ? WHERE receiving > 0",
                ("the service stopped while an association was sending this study",),
            )
        return uids

    def stable(self, quiet_seconds: float) -> list[Incoming]:
        """Studies with no new instance for ``quiet_seconds``."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_INCOMING} FROM incoming WHERE last <= ? ORDER BY last",
                (time.time() - quiet_seconds,),
            ).fetchall()
        return [Incoming(*r) for r in rows]

    def incoming(self) -> list[Incoming]:
        """Every study being received."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_INCOMING} FROM incoming ORDER BY first").fetchall()
        return [Incoming(*r) for r in rows]

    def to_job(self, study: Incoming, job_id: str) -> None:
        """``study`` became job ``job_id``: it leaves ``incoming``."""
        with self._transaction() as db:
            db.execute("DELETE FROM incoming WHERE study_uid = ?", (study.study_uid,))
            db.execute(
                "INSERT INTO node_jobs (job_id, study_uid, calling_ae, state, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (job_id, study.study_uid, study.calling_ae, SCORING, time.time()),
            )

    # ------------------------------------------------------------------ jobs and outbox

    def jobs_scoring(self) -> list[str]:
        """Node jobs whose results are not yet in the outbox."""
        with self._lock:
            return [
                r[0]
                for r in self._db.execute(
                    "SELECT job_id FROM node_jobs WHERE state = ? ORDER BY created", (SCORING,)
                ).fetchall()
            ]

    def node_job(self, job_id: str) -> tuple[str, str] | None:
        """``(study_uid, calling_ae)`` of a node job, None for another job."""
        rows = self._query(
            "SELECT study_uid, calling_ae FROM node_jobs WHERE job_id = ?", (job_id,)
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def jobs_of_study(self, study_uid: str) -> list[str]:
        """The node jobs made from ``study_uid`` before, oldest first."""
        rows = self._query(
            "SELECT job_id FROM node_jobs WHERE study_uid = ? ORDER BY created", (study_uid,)
        )
        return [str(r[0]) for r in rows]

    def queue_results(
        self,
        job_id: str,
        paths: list[Path],
        *,
        destinations: list[str],
        outcome: str,
        reason: str = "",
        problems: Sequence[str] = (),
        no_destination: str = "",
    ) -> None:
        """Put a finished job's answer in the outbox, all at once, with its outcome.

        Args:
            paths: the answer's files; each is queued once per destination.
            destinations: where they go (``AET@HOST:PORT``); none: each file waits as
                a pending item with ``no_destination`` as its last error.
            outcome: :data:`SCREENED` or :data:`NOT_SCREENED`.
            reason: why the study was not screened ("" when it was).
            problems: sentences saying why the answer is missing or incomplete, each a
                ``failed`` item.
        """
        now = time.time()
        rows = [
            (job_id, str(p), PENDING, now, now, where, "" if where else no_destination)
            for p in paths
            for where in (destinations or [""])
        ]
        rows += [(job_id, "", FAILED, now, now, "", problem) for problem in problems]
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO outbox (job_id, path, state, next_try, created, destination, "
                "last_error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute(
                "UPDATE node_jobs SET state = ?, outcome = ?, reason = ? WHERE job_id = ?",
                (QUEUED_OUT, outcome, reason, job_id),
            )

    def set_destination(self, item_ids: list[int], destination: str) -> None:
        """Give items that had no destination one (the service was started with one)."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE outbox SET destination = ?, last_error = '' WHERE id = ?",
                [(destination, i) for i in item_ids],
            )

    def refuse(self, refusal: Refusal) -> None:
        """Record an instance refused at C-STORE."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO refused (time, calling_ae, study_uid, sop_instance_uid, "
                "sop_class_uid, reason) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    refusal.time,
                    refusal.calling_ae,
                    refusal.study_uid,
                    refusal.sop_instance_uid,
                    refusal.sop_class_uid,
                    refusal.reason,
                ),
            )

    def refusals(self, limit: int = 100) -> list[Refusal]:
        """The newest ``limit`` refused instances, newest first."""
        rows = self._query(
            "SELECT time, calling_ae, study_uid, sop_instance_uid, sop_class_uid, reason "
            "FROM refused ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [Refusal(*r) for r in rows]

    def refusal_counts(self) -> dict[str, int]:
        """Refused instances by reason."""
        return dict(self._query("SELECT reason, COUNT(*) FROM refused GROUP BY reason"))

    def study_counts(self) -> dict[str, int]:
        """Studies by what happened to them: ``received`` (made jobs), ``scoring``,
        ``screened``, ``not_screened``, ``answered`` (every file of its answer
        delivered: its SR, key images or "not screened" SR; a failed item says what
        it lacks), ``unanswered`` (the rest) and ``receiving``."""
        ((received,),) = self._query("SELECT COUNT(*) FROM node_jobs")
        ((scoring,),) = self._query("SELECT COUNT(*) FROM node_jobs WHERE state = ?", (SCORING,))
        outcomes = dict(self._query("SELECT outcome, COUNT(*) FROM node_jobs GROUP BY outcome"))
        ((answered,),) = self._query(
            "SELECT COUNT(*) FROM node_jobs j WHERE j.state = ? "
            "AND EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.job_id AND o.state = ?) "
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.job_id AND o.state = ?)",
            (QUEUED_OUT, SENT, PENDING),
        )
        ((receiving,),) = self._query("SELECT COUNT(*) FROM incoming")
        return {
            "receiving": int(receiving),
            "received": int(received),
            "scoring": int(scoring),
            "screened": int(outcomes.get(SCREENED, 0)),
            "not_screened": int(outcomes.get(NOT_SCREENED, 0)),
            "answered": int(answered),
            "unanswered": int(received) - int(answered),
        }

    def studies(self, limit: int = 100) -> list[dict[str, object]]:
        """The newest ``limit`` node jobs (studies), newest first, with their outcome and
        how many of their files are sent, pending and failed."""
        rows = self._query(
            "SELECT j.job_id, j.study_uid, j.calling_ae, j.state, j.created, j.outcome, "
            "j.reason, SUM(o.state = ?), SUM(o.state = ?), SUM(o.state = ?) "
            "FROM node_jobs j LEFT JOIN outbox o ON o.job_id = j.job_id "
            "GROUP BY j.job_id ORDER BY j.created DESC LIMIT ?",
            (SENT, PENDING, FAILED, limit),
        )
        keys = (
            "job_id",
            "study_uid",
            "calling_ae",
            "state",
            "created",
            "outcome",
            "reason",
            "sent",
            "pending",
            "failed",
        )
        return [
            {
                k: (v or 0) if k in ("sent", "pending", "failed") else v
                for k, v in zip(keys, r, strict=True)
            }
            for r in rows
        ]

    def due(self, now: float | None = None) -> list[OutboxItem]:
        """Pending outbox items whose next try has come, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, job_id, path, state, attempts, next_try, last_error, destination "
                "FROM outbox WHERE state = ? AND next_try <= ? AND destination != '' ORDER BY id",
                (PENDING, time.time() if now is None else now),
            ).fetchall()
        return [OutboxItem(*r) for r in rows]

    def outbox(self, limit: int = 100) -> list[OutboxItem]:
        """The newest ``limit`` outbox items, newest first."""
        rows = self._query(
            "SELECT id, job_id, path, state, attempts, next_try, last_error, destination "
            "FROM outbox ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [OutboxItem(*r) for r in rows]

    def outbox_counts(self) -> dict[str, int]:
        """Outbox items by state (every state present, 0 when none)."""
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._query("SELECT state, COUNT(*) FROM outbox GROUP BY state"))
        return counts

    def oldest_pending(self) -> float | None:
        """Unix time the oldest unsent result entered the outbox (None: nothing pending)."""
        ((created,),) = self._query("SELECT MIN(created) FROM outbox WHERE state = ?", (PENDING,))
        return None if created is None else float(created)

    def without_destination(self) -> list[int]:
        """Pending items that wait for a destination."""
        rows = self._query("SELECT id FROM outbox WHERE state = ? AND destination = ''", (PENDING,))
        return [int(r[0]) for r in rows]

    def retry_now(self) -> int:
        """Make every pending item due at once (an operator fixed the destination and
        does not want to wait for the backoff). Returns how many were waiting."""
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE outbox SET next_try = ? WHERE state = ? AND next_try > ?",
                (now, PENDING, now),
            )
            return cursor.rowcount

    def mark_sent(self, item_id: int, destination: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state = ?, sent = ?, destination = ?, last_error = '', "
                "attempts = attempts + 1 WHERE id = ?",
                (SENT, time.time(), destination, item_id),
            )

    def mark_gone(self, item_id: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state = ?, last_error = 'file removed' WHERE id = ?",
                (GONE, item_id),
            )

    def mark_failed(self, item_id: int, error: str, next_try: float, destination: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_try = ?, last_error = ?, "
                "destination = ? WHERE id = ?",
                (next_try, error, destination, item_id),
            )
