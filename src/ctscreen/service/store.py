"""The persistent job store of the screening service (and of any other front end).

One folder holds everything::

    DATA/ctscreen.db              SQLite (WAL): jobs, their inputs, their result rows
    DATA/jobs/<id>/uploads/NNNN.upload   uploaded files, under generated names only
    DATA/jobs/<id>/...            anything else a front end keeps per job (reports)

A job is a list of inputs (uploaded files: zip archives or DICOM files) scored
together. Its status moves ``queued -> running -> done | failed | timeout``;
rows arrive while it runs, so a client sees each study as soon as it is scored.
A job left ``running`` by a process that died is put back in the queue by
:meth:`JobStore.recover`, so a restart loses nothing.

Nothing a client sends becomes a path: job ids are random (128 bits) and checked
against their pattern before they touch the filesystem, uploads are stored as
``NNNN.upload`` and the client's file name is kept as display text only.

The store is safe to use from several threads of one process (one connection
behind a lock) and from several processes (SQLite's own locking, WAL).
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..report import ResultRow, row_from_json, row_to_json
from ..results import FAILURE
from .database import Database
from .store_schema import SCHEMA, upgrade

log = logging.getLogger(__name__)

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
TIMEOUT = "timeout"
#: Every job status, in lifecycle order.
JOB_STATUSES: tuple[str, ...] = (QUEUED, RUNNING, DONE, FAILED, TIMEOUT)
#: Statuses a job does not leave.
FINAL_STATUSES: tuple[str, ...] = (DONE, FAILED, TIMEOUT)
#: A job re-queued after this many starts that never finished is failed instead.
MAX_ATTEMPTS = 3

DB_NAME = "ctscreen.db"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{22}$")


def new_job_id() -> str:
    """A random, unguessable job id (128 bits, URL-safe, 22 characters)."""
    return secrets.token_urlsafe(16)


def stored_name(index: int) -> str:
    """The generated file name of a job's ``index``-th upload (``0003.upload``).

    The suffix makes the name unlike anything inside a study, so that it can be
    replaced by the client's file name in the sentences the library writes.
    """
    return f"{index:04d}.upload"


def is_job_id(text: str) -> bool:
    """True when ``text`` has the shape of a job id (so it is safe in a path)."""
    return bool(_ID_PATTERN.match(text))


@dataclass(frozen=True)
class InputFile:
    """One uploaded file of a job.

    Attributes:
        index: position in the job (rows keep this order).
        name: the client's file name, display text only (never a path).
        stored: the file's name in the job's upload folder (generated).
        size: bytes.
        sha256: the hex SHA-256 of its bytes ("" when not known); kept with the name
            and size after the file itself is removed (``--keep-uploads``).
    """

    index: int
    name: str
    stored: str
    size: int
    sha256: str = ""


@dataclass(frozen=True)
class Job:
    """A job as stored.

    Attributes:
        id: the job id.
        status: one of :data:`JOB_STATUSES`.
        mode: ``study``, ``series`` or ``slice`` (rows per study, series or slice).
        created, started, finished: Unix times (None until reached).
        message: why a job failed or timed out ("" otherwise).
        attempts: how many times a worker started it.
        inputs: the uploaded files, in order.
        rows_done: result rows stored so far.
        failures: how many of them are Failure rows.
        inputs_done: inputs whose every study has a row (known once a later input
            produced a row, or the job ended).
        uploads_removed: when its uploaded files were removed (None: still kept).
        expired: when its results were removed (None: still kept); see
            :mod:`ctscreen.service.retention`.
    """

    id: str
    status: str
    mode: str
    created: float
    started: float | None
    finished: float | None
    message: str
    attempts: int
    inputs: tuple[InputFile, ...]
    rows_done: int
    failures: int
    inputs_done: int
    uploads_removed: float | None = None
    expired: float | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


class JobStore(Database):
    """Jobs, their uploads and their result rows in one data folder.

    Example:
        >>> store = JobStore(Path("data"))  # doctest: +SKIP
        >>> job_id = new_job_id()
        >>> folder = store.upload_dir(job_id)  # write the uploads there as stored_name(i)
        >>> store.add_job(job_id, [InputFile(0, "norma.zip", stored_name(0), 1234)], mode="study")
    """

    def __init__(self, data_dir: Path) -> None:
        """Open (or create) the store in ``data_dir``.

        Raises:
            ConfigError: the folder cannot be created or the database cannot be opened.
        """
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the job store in {self.data_dir} ({exc.strerror or exc}); "
                "choose a --data folder you can write to."
            ) from exc
        super().__init__(self.data_dir / DB_NAME, SCHEMA, what="the job store")
        with self._lock:
            upgrade(self._db)

    # ------------------------------------------------------------------ plumbing

    def job_dir(self, job_id: str) -> Path:
        """The job's own folder.

        Raises:
            ValueError: ``job_id`` is not a job id (so it never becomes a path).
        """
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs_dir / job_id

    def upload_dir(self, job_id: str) -> Path:
        """The folder the job's uploads go to (created)."""
        folder = self.job_dir(job_id) / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def input_paths(self, job: Job) -> list[Path]:
        """Where the job's uploaded files lie, in input order."""
        folder = self.job_dir(job.id) / "uploads"
        return [folder / f.stored for f in job.inputs]

    def check_writable(self) -> None:
        """Raise ``sqlite3.Error`` or ``OSError`` when the store cannot be written now."""
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
        probe = self.data_dir / ".probe"
        probe.write_bytes(b"")
        probe.unlink()

    # ------------------------------------------------------------------ jobs

    def add_job(self, job_id: str, inputs: Sequence[InputFile], *, mode: str = "study") -> Job:
        """Queue a job whose uploads already lie in :meth:`upload_dir`."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, status, mode, created) VALUES (?, ?, ?, ?)",
                (job_id, QUEUED, mode, time.time()),
            )
            db.executemany(
                "INSERT INTO inputs (job_id, idx, name, stored, size, sha256) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(job_id, f.index, f.name, f.stored, f.size, f.sha256) for f in inputs],
            )
        log.info("job %s queued with %d inputs", job_id, len(inputs))
        job = self.get(job_id)
        assert job is not None
        return job

    def discard_upload(self, job_id: str) -> None:
        """Remove the files of a job that was never added (an upload that failed)."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def get(self, job_id: str) -> Job | None:
        """The job, or None when there is no such job."""
        if not is_job_id(job_id):
            return None
        jobs = self._jobs("WHERE j.id = ?", (job_id,))
        return jobs[0] if jobs else None

    def list_jobs(self, *, limit: int = 100) -> list[Job]:
        """The newest ``limit`` jobs, newest first."""
        return self._jobs("ORDER BY j.created DESC LIMIT ?", (limit,))

    def _jobs(self, where: str, params: Sequence[object]) -> list[Job]:
        sql = f"""
            SELECT j.id, j.status, j.mode, j.created, j.started, j.finished, j.message,
                   j.attempts, j.uploads_removed, j.expired,
                   (SELECT COUNT(*) FROM rows r WHERE r.job_id = j.id),
                   (SELECT COUNT(*) FROM rows r WHERE r.job_id = j.id AND r.status = ?),
                   (SELECT MAX(input_idx) FROM rows r WHERE r.job_id = j.id)
            FROM jobs j {where}
        """
        with self._lock:
            found = self._db.execute(sql, (FAILURE, *params)).fetchall()
            inputs: dict[str, list[InputFile]] = {}
            if found:
                marks = ",".join("?" * len(found))
                for job_id, idx, name, stored, size, digest in self._db.execute(
                    f"SELECT job_id, idx, name, stored, size, sha256 FROM inputs "
                    f"WHERE job_id IN ({marks}) ORDER BY job_id, idx",
                    [r[0] for r in found],
                ):
                    inputs.setdefault(job_id, []).append(InputFile(idx, name, stored, size, digest))
        jobs = []
        for (
            job_id,
            status,
            mode,
            created,
            started,
            finished,
            message,
            attempts,
            uploads_removed,
            expired,
            n_rows,
            n_failures,
            last_input,
        ) in found:
            files = tuple(inputs.get(job_id, ()))
            if status == DONE:
                inputs_done = len(files)
            else:
                inputs_done = 0 if last_input is None else int(last_input)
            jobs.append(
                Job(
                    id=job_id,
                    status=status,
                    mode=mode,
                    created=created,
                    started=started,
                    finished=finished,
                    message=message,
                    attempts=attempts,
                    inputs=files,
                    rows_done=n_rows,
                    failures=n_failures,
                    inputs_done=inputs_done,
                    uploads_removed=uploads_removed,
                    expired=expired,
                )
            )
        return jobs

    def next_queued(self) -> Job | None:
        """The oldest queued job, or None."""
        jobs = self._jobs("WHERE j.status = ? ORDER BY j.created LIMIT 1", (QUEUED,))
        return jobs[0] if jobs else None

    def count_by_status(self) -> dict[str, int]:
        """Jobs per status (every status present, 0 when none)."""
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for status, n in self._query("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            counts[status] = n
        return counts

    def start(self, job_id: str) -> None:
        """Mark a job running (its earlier rows, from an interrupted attempt, are dropped)."""
        with self._transaction() as db:
            db.execute("DELETE FROM rows WHERE job_id = ?", (job_id,))
            db.execute(
                "UPDATE jobs SET status = ?, started = ?, attempts = attempts + 1 WHERE id = ?",
                (RUNNING, time.time(), job_id),
            )

    def add_rows(self, job_id: str, input_index: int, rows: Iterable[ResultRow]) -> None:
        """Store the rows of one scored study (or series) of a running job."""
        with self._transaction() as db:
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM rows WHERE job_id = ?", (job_id,)
            ).fetchone()
            db.executemany(
                "INSERT INTO rows (job_id, seq, input_idx, status, seconds, record) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        job_id,
                        seq + i,
                        input_index,
                        row.processing_status,
                        float(row.time_of_processing),
                        row_to_json(row),
                    )
                    for i, row in enumerate(rows)
                ],
            )

    def finish(self, job_id: str, status: str, message: str = "") -> None:
        """End a job with a final status and, for failed or timeout, a sentence why."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status!r}")
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, message = ? WHERE id = ?",
                (status, time.time(), message, job_id),
            )
        log.info("job %s %s%s", job_id, status, f": {message}" if message else "")

    def release(self, job_id: str) -> None:
        """Put a running job back in the queue, as if never started (an orderly shutdown)."""
        with self._transaction() as db:
            db.execute("DELETE FROM rows WHERE job_id = ?", (job_id,))
            db.execute(
                "UPDATE jobs SET status = ?, started = NULL, attempts = MAX(attempts - 1, 0) "
                "WHERE id = ? AND status = ?",
                (QUEUED, job_id, RUNNING),
            )

    def recover(self) -> list[str]:
        """Put jobs left ``running`` by a process that died back in the queue.

        A job that was started :data:`MAX_ATTEMPTS` times without finishing is
        failed instead (it would otherwise take the worker down forever). Upload
        folders of jobs that were never added (the server died during an upload)
        are removed.

        Returns:
            The ids of the re-queued jobs.
        """
        requeued: list[str] = []
        with self._transaction() as db:
            for job_id, attempts in db.execute(
                "SELECT id, attempts FROM jobs WHERE status = ?", (RUNNING,)
            ).fetchall():
                if attempts >= MAX_ATTEMPTS:
                    db.execute(
                        "UPDATE jobs SET status = ?, finished = ?, message = ? WHERE id = ?",
                        (
                            FAILED,
                            time.time(),
                            f"the service stopped {attempts} times while scoring this job; "
                            "it was not started again. Check the server log.",
                            job_id,
                        ),
                    )
                else:
                    db.execute("DELETE FROM rows WHERE job_id = ?", (job_id,))
                    db.execute("UPDATE jobs SET status = ? WHERE id = ?", (QUEUED, job_id))
                    requeued.append(job_id)
            known = {r[0] for r in db.execute("SELECT id FROM jobs").fetchall()}
        for folder in self.jobs_dir.iterdir():
            if folder.is_dir() and folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
        if requeued:
            log.warning("re-queued %d job(s) left running: %s", len(requeued), ", ".join(requeued))
        return requeued

    def delete(self, job_id: str) -> bool:
        """Remove a job, its rows and its files. Returns False when there was no such job."""
        if not is_job_id(job_id):
            return False
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return bool(deleted)

    # ------------------------------------------------------------------ rows

    def rows(self, job_id: str) -> list[ResultRow]:
        """The job's result rows, in input order."""
        return [
            row_from_json(text)
            for (text,) in self._query(
                "SELECT record FROM rows WHERE job_id = ? ORDER BY seq", (job_id,)
            )
        ]

    def all_rows(self) -> list[ResultRow]:
        """Every job's rows, oldest job first."""
        return [
            row_from_json(text)
            for (text,) in self._query(
                "SELECT r.record FROM rows r JOIN jobs j ON j.id = r.job_id "
                "ORDER BY j.created, r.seq"
            )
        ]
