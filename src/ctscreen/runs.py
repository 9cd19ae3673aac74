"""A scoring run into a result table that loses nothing finished.

:func:`score_to_table` is what ``ctscreen predict`` (and any service that writes
tables) runs around :meth:`ctscreen.Screener.score`:

* the output path is checked before the first study is read
  (:func:`check_output_path`): a known suffix, a folder that exists and can be
  written, and an existing table replaced only when asked;
* every row is appended to a journal beside the table as soon as its study is
  done (``results.xlsx.journal.jsonl``, flushed and synced), so a run that is
  killed, interrupted or stalls leaves every finished row on disk;
* Ctrl-C or SIGTERM stops the run, writes the partial table from what is done,
  and removes the run's temporary folders;
* ``resume=True`` reads the journal of an unfinished run, keeps the inputs it
  finished and scores only the rest.

A finished run removes its journal; the table is then the record.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from .errors import ConfigError, cannot_write
from .interrupts import (
    deferred_interrupts,
    interruptible,
    raise_if_stop_requested,
    stop_requests,
)
from .report import OutputFormat, ResultRow, result_rows, rows_to_frame, run_info_path, write_table
from .results import StudyResult

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """What a table run needs of a scorer: :class:`ctscreen.Screener` in this process,
    or :class:`ctscreen.engines.ray_engine.RayScorer` on a Ray cluster."""

    def score(
        self,
        inputs: Sequence[Path | str],
        *,
        keep_image: bool = False,
        keep_volume: bool = False,
    ) -> Generator[StudyResult, None, None]:
        """One result per study of ``inputs``, in input order."""
        ...

    def run_info(self) -> dict[str, Any]:
        """Plain facts about the scorer for the table's ``run`` sheet."""
        ...


JOURNAL_SUFFIX = ".journal.jsonl"


def journal_path(output: Path) -> Path:
    """Where the journal of a run writing ``output`` lives: ``<output>.journal.jsonl``."""
    return output.with_name(output.name + JOURNAL_SUFFIX)


def input_key(path: Path | str) -> str:
    """How an input is named in the journal: its absolute path."""
    return os.path.abspath(str(path))


def check_output_path(path: Path | str, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Check, before anything is scored, that the result table can be written at ``path``.

    Args:
        path: the table to write (``.xlsx``, ``.csv``, ``.json`` or ``.parquet``).
        overwrite: an existing table (and journal) may be replaced.
        resume: the run continues an unfinished one, whose partial table may exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: an unknown suffix, a folder where the file should be, a parent
            that is missing, not a folder or not writable, or an existing table
            without ``overwrite``/``resume``.
        MissingExtraError: a ``.parquet`` table without pyarrow.
    """
    path = Path(path)
    OutputFormat.from_path(path).require_writer()
    if path.is_dir():
        raise ConfigError(
            f"the output {path} is a folder; name a file in it, e.g. {path / 'results.xlsx'}."
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise ConfigError(
            f"the folder {parent} of the output {path.name} does not exist; create it first."
        )
    if not parent.is_dir():
        raise ConfigError(f"the output's folder {parent} is not a folder; choose another path.")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise cannot_write(f"into {parent}", exc) from exc
    if path.exists() and not (overwrite or resume):
        raise ConfigError(
            f"{path} already exists; pass --overwrite to replace it, or choose another name."
        )
    return path


# --------------------------------------------------------------------------- journal


class Journal:
    """An append-only JSON-lines record of finished rows, one run at a time.

    Each line is ``{"input": key, "row": record}`` for a finished row, or
    ``{"input": key, "done": true}`` once every study of that input is done. A line
    cut short by a kill is ignored on reading. The file is locked while open, so
    two runs can never write the same table.
    """

    def __init__(self, path: Path, handle: IO[str], done: dict[str, list[dict[str, Any]]]):
        self.path = path
        self._handle = handle
        self.done = done

    @classmethod
    def open(cls, path: Path, *, resume: bool = False, overwrite: bool = False) -> Journal:
        """Open (or start) the journal at ``path``.

        Raises:
            ConfigError: another run holds it, or an unfinished run left it and
                neither ``resume`` nor ``overwrite`` says what to do with it.
        """
        if path.exists() and not (resume or overwrite):
            raise ConfigError(
                f"an unfinished run left its journal {path}; pass --resume to finish that run "
                "or --overwrite to start again."
            )
        done = read_journal(path) if (resume and path.exists()) else {}
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
        try:
            _lock(handle, path)
        except ConfigError:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()  # rewritten compactly: finished inputs only
        journal = cls(path, handle, done)
        for key, records in done.items():
            journal._write([{"input": key, "row": r} for r in records] + [_done(key)])
        return journal

    def record(self, key: str, rows: Sequence[ResultRow]) -> None:
        """Append the rows of one finished study (on disk when this returns)."""
        self._write([{"input": key, "row": _plain(row.to_record())} for row in rows])

    def finish_input(self, key: str) -> None:
        """Mark every study of input ``key`` as done."""
        self._write([_done(key)])

    def close(self, *, remove: bool) -> None:
        """Close the journal; ``remove`` deletes it (the run finished and wrote its table)."""
        self._handle.close()
        if remove:
            self.path.unlink(missing_ok=True)

    def _write(self, lines: list[dict[str, Any]]) -> None:
        """Append ``lines``, on disk when this returns.

        Raises:
            ConfigError: they cannot be written (a full disk): the run stops; what
                the journal holds already is read back by ``--resume`` (a line cut
                short is ignored).
        """
        try:
            self._handle.write(
                "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            )
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            raise cannot_write(
                f"the run's journal {self.path}",
                exc,
                then="then run the same command with --resume: the studies scored before "
                "this one are kept",
            ) from exc


def _done(key: str) -> dict[str, Any]:
    return {"input": key, "done": True}


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe cells: NaN becomes None, numpy scalars become Python numbers."""
    out: dict[str, Any] = {}
    for name, value in record.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[name] = value
    return out


def _lock(handle: IO[str], path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the journal still works
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise ConfigError(
            f"another ctscreen run is writing {path.name.removesuffix(JOURNAL_SUFFIX)} now; "
            "wait for it to finish or choose another output."
        ) from exc


def read_journal(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The rows of every input a journal marks done, by input key, in journal order.

    Lines that do not parse (a write cut short by a kill) and rows of inputs that
    were not finished are left out: those inputs are scored again.
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    finished: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("input"), str):
                continue
            key = entry["input"]
            if entry.get("done") is True:
                if key not in finished:
                    finished.append(key)
            elif isinstance(entry.get("row"), dict):
                rows.setdefault(key, []).append(entry["row"])
    return {key: rows.get(key, []) for key in finished}


# --------------------------------------------------------------------------- run


@dataclass
class RunOutcome:
    """What a table run did.

    Attributes:
        output: the table written.
        rows: every row of the table (resumed ones first in input order).
        studies: results in the table (resumed and new).
        failures: Failure results among them.
        resumed_inputs: inputs taken from the journal instead of being scored.
        interrupted: the run was stopped by Ctrl-C/SIGTERM; the table is partial and
            the journal stays for ``resume``.
        run_info: the facts written to the table's ``run`` sheet.
    """

    output: Path
    rows: list[ResultRow] = field(default_factory=list)
    studies: int = 0
    failures: int = 0
    resumed_inputs: int = 0
    interrupted: bool = False
    run_info: dict[str, Any] = field(default_factory=dict)


def score_to_table(
    screener: Scorer,
    inputs: Sequence[Path | str],
    *,
    output: Path | str,
    mode: str = "study",
    overwrite: bool = False,
    resume: bool = False,
    keep_image: bool = False,
    keep_volume: bool = False,
    on_result: Callable[[StudyResult], None] | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> RunOutcome:
    """Score ``inputs`` into the table at ``output``, journaling rows as they finish.

    Args:
        screener: the loaded model (a :class:`ctscreen.Screener`, or a scorer on Ray).
        inputs: zip archives, folders or files, in table order.
        output: the table (.xlsx, .csv or .json).
        mode: row layout, ``study``, ``series`` or ``slice`` (see
            :func:`ctscreen.report.result_rows`; the screener's mode must match).
        overwrite: replace an existing table and journal.
        resume: continue the unfinished run whose journal lies beside ``output``.
        keep_image: results carry the network input (for ``on_result`` pictures).
        keep_volume: results carry the HU volume (the report's native-resolution slices).
        on_result: called with each new result as it arrives (progress, HTML report).
        run_info: extra facts for the ``run`` sheet.

    Returns:
        What was done; ``interrupted`` is True when Ctrl-C or SIGTERM stopped it.

    Raises:
        ConfigError: the output cannot be written, or a journal is in the way.
    """
    start = time.perf_counter()
    out = check_output_path(output, overwrite=overwrite, resume=resume)
    journal = Journal.open(journal_path(out), resume=resume, overwrite=overwrite)
    if overwrite and not resume:
        run_info_path(out).unlink(missing_ok=True)
    keys = list(dict.fromkeys(input_key(p) for p in inputs))
    wanted = set(keys)
    rows_by_key: dict[str, list[ResultRow]] = {
        key: [ResultRow.from_record(r) for r in records]
        for key, records in journal.done.items()
        if key in wanted
    }
    outcome = RunOutcome(output=out, resumed_inputs=len(rows_by_key))
    for rows in rows_by_key.values():
        outcome.studies += len({(r.path_to_study, r.series_uid) for r in rows})
        outcome.failures += len({r.path_to_study for r in rows if r.processing_status != "Success"})
    if outcome.resumed_inputs:
        log.info("resuming: %d input(s) already scored in %s", outcome.resumed_inputs, journal.path)
    todo = [Path(p) for p in inputs if input_key(p) not in rows_by_key]
    results = screener.score(todo, keep_image=keep_image, keep_volume=keep_volume)
    current: str | None = None
    try:
        with stop_requests(), interruptible():
            for result in results:
                raise_if_stop_requested()  # a Ctrl-C Python dropped is acted on here
                key = input_key(result.input_path)
                rows = result_rows(result, mode)
                # A finished study is recorded whole (journal, table rows, counts): a
                # Ctrl-C meanwhile waits, so the partial table and the counts agree.
                with deferred_interrupts():
                    if current is not None and key != current:
                        journal.finish_input(current)
                    current = key
                    journal.record(key, rows)
                    rows_by_key.setdefault(key, []).extend(rows)
                    outcome.studies += 1
                    outcome.failures += not result.ok
                if on_result is not None:
                    on_result(result)
            if current is not None:
                journal.finish_input(current)
    except KeyboardInterrupt:
        outcome.interrupted = True
        log.warning(
            "interrupted: writing the %d finished row(s) to the partial table",
            sum(map(len, rows_by_key.values())),
        )
    finally:
        results.close()  # stops the readers and removes the run's temporary folders
    outcome.rows = [row for key in keys for row in rows_by_key.get(key, [])]
    outcome.run_info = screener.run_info() | {
        "mode": mode,
        "inputs": len(inputs),
        "resumed_inputs": outcome.resumed_inputs,
        "studies": outcome.studies,
        "failures": outcome.failures,
        "interrupted": outcome.interrupted,
        "wall_seconds": round(time.perf_counter() - start, 2),
        **(run_info or {}),
    }
    try:
        write_table(rows_to_frame(outcome.rows), out, run_info=outcome.run_info)
    except ConfigError as exc:
        journal.close(remove=False)  # the rows stay on disk for --resume
        raise ConfigError(
            f"{exc.message.removesuffix('.')}; the {len(outcome.rows)} row(s) are kept in "
            f"{journal.path}: run the same command with --resume to write the table "
            "without scoring again."
        ) from exc
    except BaseException:
        journal.close(remove=False)
        raise
    journal.close(remove=not outcome.interrupted)
    return outcome
