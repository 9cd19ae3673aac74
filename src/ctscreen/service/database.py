"""The SQLite plumbing the service's stores share: one WAL connection behind a lock."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError


class Database:
    """One SQLite connection in WAL mode, shared by threads behind a re-entrant lock.

    Args:
        path: the database file (its folder is created).
        schema: SQL run once on open (``CREATE TABLE IF NOT EXISTS ...``).
        what: how to name the database in the error sentence.

    Raises:
        ConfigError: the file cannot be created or opened.
    """

    def __init__(self, path: Path, schema: str, *, what: str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(schema)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"cannot open {what} {self.path} ({exc}); choose a --data folder you can write to."
            ) from exc
        self._lock = threading.RLock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An ``IMMEDIATE`` transaction: committed when the block ends, rolled back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
