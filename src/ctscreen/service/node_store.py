"""What the DICOM node keeps across restarts: studies being received, its jobs, the outbox.

One SQLite file beside the job store (``DATA/dicom-node.db``, WAL)::

    incoming   a study whose instances are arriving (its folder under DATA/dicom-in/)
    node_jobs  a received study made into a job of the job store, and where its results are
    outbox     one result file (SR or key image) to send, with its attempts and next try

A result stays in the outbox, on disk, until the destination confirmed it by a
successful C-STORE status; a restart, a destination that is down or refuses, all
leave it there to be tried again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .database import Database

log = logging.getLogger(__name__)

DB_NAME = "dicom-node.db"

#: node_jobs.state: scored by the worker (results not yet in the outbox).
SCORING = "scoring"
#: node_jobs.state: its results are in the outbox (or there were none).
QUEUED_OUT = "outbox"

#: outbox.state
PENDING = "pending"
SENT = "sent"
GONE = "gone"  # the file disappeared (its job was deleted): nothing left to send

_SCHEMA = """
CREATE TABLE IF NOT EXISTS incoming (
    study_uid TEXT PRIMARY KEY,
    folder TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    first REAL NOT NULL,
    last REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    receiving INTEGER NOT NULL DEFAULT 0,
    aborted TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS node_jobs (
    job_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    sent REAL
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state, next_try);
"""


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


class NodeStore(Database):
    """The node's tables (thread-safe: one connection behind a lock)."""

    def __init__(self, data_dir: Path) -> None:
        """Open (or create) ``DATA/dicom-node.db``.

        Raises:
            ConfigError: it cannot be opened.
        """
        super().__init__(Path(data_dir) / DB_NAME, _SCHEMA, what="the DICOM node's store")

    # ------------------------------------------------------------------ incoming

    def receive(self, study_uid: str, calling_ae: str, new_folder: str) -> str:
        """Record one arriving instance of ``study_uid``; returns the study's folder
        (``new_folder`` when the study is new)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT folder FROM incoming WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO incoming (study_uid, folder, calling_ae, first, last, instances) "
                    "VALUES (?, ?, ?, ?, ?, 1)",
                    (study_uid, new_folder, calling_ae, now, now),
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
                "SELECT study_uid, folder, calling_ae, first, last, instances, receiving, aborted "
                "FROM incoming WHERE last <= ? ORDER BY last",
                (time.time() - quiet_seconds,),
            ).fetchall()
        return [Incoming(*r) for r in rows]

    def incoming(self) -> list[Incoming]:
        """Every study being received."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid, folder, calling_ae, first, last, instances, receiving, aborted "
                "FROM incoming ORDER BY first"
            ).fetchall()
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

    def queue_results(self, job_id: str, paths: list[Path]) -> None:
        """Put a finished job's result files in the outbox (all at once, with its state)."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO outbox (job_id, path, state, next_try, created) "
                "VALUES (?, ?, ?, ?, ?)",
                [(job_id, str(p), PENDING, now, now) for p in paths],
            )
            db.execute("UPDATE node_jobs SET state = ? WHERE job_id = ?", (QUEUED_OUT, job_id))

    def due(self, now: float | None = None) -> list[OutboxItem]:
        """Pending outbox items whose next try has come, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, job_id, path, state, attempts, next_try, last_error, destination "
                "FROM outbox WHERE state = ? AND next_try <= ? ORDER BY id",
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
        counts = dict.fromkeys((PENDING, SENT, GONE), 0)
        counts.update(self._query("SELECT state, COUNT(*) FROM outbox GROUP BY state"))
        return counts

    def oldest_pending(self) -> float | None:
        """Unix time the oldest unsent result entered the outbox (None: nothing pending)."""
        ((created,),) = self._query("SELECT MIN(created) FROM outbox WHERE state = ?", (PENDING,))
        return None if created is None else float(created)

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
