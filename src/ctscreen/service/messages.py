"""The messages between the service's worker thread and its scoring child, as types.

They cross a ``multiprocessing`` pipe (pickled), so they hold plain values only. The
parent sends :class:`ScoreJob` and :class:`Stop`; the child answers once with
:class:`Ready` or :class:`Fatal`, then per job with a :class:`Rows` for each finished
study and a :class:`JobDone` or :class:`JobFailed` at its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..report import ResultRow


@dataclass(frozen=True)
class ScoreJob:
    """Score one job's inputs (parent to child).

    Attributes:
        job_id: the job.
        paths: its stored inputs, in order.
        names: the client's names of those inputs (what rows and sentences show).
        mode: ``study`` or ``slice`` rows.
        report_dir: where its HTML report (and, for a DICOM node job, its answer) goes.
    """

    job_id: str
    paths: tuple[str, ...]
    names: tuple[str, ...]
    mode: str
    report_dir: str | None


@dataclass(frozen=True)
class Stop:
    """End the child (parent to child)."""


@dataclass(frozen=True)
class Ready:
    """The model is loaded (child to parent, once); ``run_info`` as ``Screener.run_info``."""

    run_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fatal:
    """The model cannot be loaded (child to parent, once): one sentence saying why."""

    sentence: str


@dataclass(frozen=True)
class Rows:
    """The rows of one finished study of input ``input_index`` of job ``job_id``."""

    job_id: str
    input_index: int
    rows: list[ResultRow]


@dataclass(frozen=True)
class JobDone:
    """Job ``job_id`` is scored (every study has its rows)."""

    job_id: str


@dataclass(frozen=True)
class JobFailed:
    """Job ``job_id`` could not be scored: one sentence saying why."""

    job_id: str
    sentence: str


ToChild = ScoreJob | Stop
FromChild = Ready | Fatal | Rows | JobDone | JobFailed
