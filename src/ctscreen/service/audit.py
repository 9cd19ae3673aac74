"""The audit trail: who did what to which job or study, when, and from which address.

One append-only table, ``audit``, in the service's one database (``DATA/ctscreen.db``);
SQLite triggers refuse every ``UPDATE`` and ``DELETE`` of it, so that not even the
service itself rewrites the past. Entries name jobs, StudyInstanceUIDs, AE titles and
token names, never a patient's name or ID.

Actions recorded (:data:`ACTIONS`): uploads, result and report downloads, deletes,
logins, the retention sweep's removals, and the DICOM node's associations (accepted
or refused), studies received and results sent.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import asdict, astuple, dataclass, fields

from .database import Database

log = logging.getLogger(__name__)

UPLOAD = "upload"
DOWNLOAD = "download"
DELETE = "delete"
LOGIN = "login"
RETRY = "outbox-retry"
UPLOADS_REMOVED = "uploads-removed"
RESULTS_EXPIRED = "results-expired"
ASSOCIATION = "dicom-association"
ASSOCIATION_REFUSED = "dicom-association-refused"
STUDY_RECEIVED = "dicom-study-received"
RESULTS_SENT = "dicom-results-sent"
#: Every action the trail records.
ACTIONS: tuple[str, ...] = (
    UPLOAD,
    DOWNLOAD,
    DELETE,
    LOGIN,
    RETRY,
    UPLOADS_REMOVED,
    RESULTS_EXPIRED,
    ASSOCIATION,
    ASSOCIATION_REFUSED,
    STUDY_RECEIVED,
    RESULTS_SENT,
)
#: The actor of what the service does by itself (the retention sweep).
SYSTEM = "ctscreen"

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    job_id TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


@dataclass(frozen=True)
class AuditEntry:
    """One line of the trail.

    Attributes:
        id: its sequence number.
        time: Unix time.
        actor: the token's name, the calling AE title, or ``ctscreen`` (the service).
        role: ``viewer``, ``operator``, ``admin``, ``dicom`` or ``system``.
        action: one of :data:`ACTIONS`.
        job_id, study_uid: what it concerned ("" when nothing).
        address: the client's IP address (and port for DICOM).
        detail: a short note (a format, a file count, a reason).
    """

    id: int
    time: float
    actor: str
    role: str
    action: str
    job_id: str
    study_uid: str
    address: str
    detail: str


#: The CSV export's columns, in order.
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(AuditEntry))


class AuditTrail:
    """The ``audit`` table of the service's database (its connection and lock).

    Args:
        db: the service's database (a :class:`~ctscreen.service.store.JobStore`).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        with db._lock:
            db._db.executescript(SCHEMA)

    def record(
        self,
        action: str,
        *,
        actor: str,
        role: str,
        job_id: str = "",
        study_uid: str = "",
        address: str = "",
        detail: str = "",
    ) -> None:
        """Append one entry. A failure to write is logged, never raised: the action it
        records has happened already."""
        try:
            with self.db._transaction() as db:
                db.execute(
                    "INSERT INTO audit (time, actor, role, action, job_id, study_uid, address, "
                    "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), actor, role, action, job_id, study_uid, address, detail),
                )
        except Exception:  # noqa: BLE001 - auditing must not undo the action it records
            log.exception("cannot write the audit entry %s of %s", action, actor)

    def entries(self, *, limit: int = 1000, since: float = 0.0) -> list[AuditEntry]:
        """The newest ``limit`` entries from ``since`` on, oldest first."""
        found = self.db._query(
            "SELECT id, time, actor, role, action, job_id, study_uid, address, detail "
            "FROM audit WHERE time >= ? ORDER BY id DESC LIMIT ?",
            (since, limit),
        )
        return [AuditEntry(*row) for row in reversed(found)]


def entries_json(entries: list[AuditEntry]) -> list[dict[str, object]]:
    """Entries as JSON objects."""
    return [asdict(e) for e in entries]


def entries_csv(entries: list[AuditEntry]) -> str:
    """Entries as CSV text with a header line (times as Unix seconds)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    writer.writerows([_cell(v) for v in astuple(e)] for e in entries)
    return out.getvalue()


def _cell(value: object) -> object:
    """A value safe to open in a spreadsheet (text that looks like a formula is quoted)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value
