"""The DICOM node's tables in the service's database, and the upgrade of older ones.

Databases made by earlier releases are brought forward in place: columns added since
are added (``ALTER TABLE``), and the node's own file of the first release
(``DATA/dicom-node.db``) is copied into the service's database once and renamed
``dicom-node.db.migrated``, so that no received study, job or unsent result is lost.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

#: The node's own database file of the first release (merged into the service's).
OLD_DB_NAME = "dicom-node.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS incoming (
    study_uid TEXT PRIMARY KEY,
    folder TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    first REAL NOT NULL,
    last REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    receiving INTEGER NOT NULL DEFAULT 0,
    aborted TEXT NOT NULL DEFAULT '',
    header TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS node_jobs (
    job_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    outcome TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS refused (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    calling_ae TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL
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

#: Columns added since the first release, for databases made by it.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("incoming", "header", "TEXT NOT NULL DEFAULT ''"),
    ("node_jobs", "outcome", "TEXT NOT NULL DEFAULT ''"),
    ("node_jobs", "reason", "TEXT NOT NULL DEFAULT ''"),
)


def create_tables(db: sqlite3.Connection) -> None:
    """Create the node's tables, and add the columns an older database lacks."""
    db.executescript(_SCHEMA)
    for table, column, kind in ADDED_COLUMNS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def merge_old_database(db: sqlite3.Connection, old: Path) -> bool:
    """Copy the tables of a first-release ``dicom-node.db`` into ``db``, once; the old
    file is then renamed ``*.migrated``. Returns whether there was one to merge."""
    if not old.is_file():
        return False
    db.execute("ATTACH DATABASE ? AS old", (str(old),))
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("incoming", "node_jobs", "outbox"):
                columns = [row[1] for row in db.execute(f"PRAGMA old.table_info({table})")]
                if not columns:
                    continue
                names = ", ".join(columns)
                db.execute(
                    f"INSERT OR IGNORE INTO main.{table} ({names}) SELECT {names} FROM old.{table}"
                )
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            raise
    finally:
        db.execute("DETACH DATABASE old")
    for suffix in ("", "-wal", "-shm"):
        part = old.with_name(old.name + suffix)
        if part.exists():
            part.rename(part.with_name(part.name + ".migrated"))
    log.warning("the DICOM node's database %s was merged into the service's", old)
    return True
