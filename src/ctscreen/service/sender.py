"""Sending results to the PACS: C-STORE to each destination AE, from a persistent outbox.

:class:`Outbox` is a thread. It moves the answer of every finished node job (its
SR and key images, or a "not screened" SR) into the outbox
(:class:`~ctscreen.service.node_store.NodeStore`), once per destination, with a
failed item for each problem, and sends what is due, one association per job and
destination. A destination that is down, refuses the
association or answers a C-STORE with a failure status leaves the files pending,
to be tried again after ``retry_base * 2**(attempts-1)`` seconds, at most
``retry_max`` apart, for as long as it takes: nothing is dropped.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
)

from ..errors import ConfigError, CtscreenError
from .node_store import NodeStore, OutboxItem
from .store import FINAL_STATUSES, JobStore

log = logging.getLogger(__name__)

_DESTINATION = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
#: C-STORE statuses that mean "stored": success and the warning classes.
_STORED = {0x0000, 0x0001, 0x0107, 0x0116} | set(range(0xB000, 0xB100))
_RESULT_CLASSES = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)


class SendError(CtscreenError):
    """Results could not be delivered to the destination (this time)."""

    code = "DICOM_SEND"


@dataclass(frozen=True)
class Destination:
    """A DICOM application entity to send results to."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str, *, option: str = "--send-to") -> Destination:
    """``AET@HOST:PORT`` as a :class:`Destination`.

    Raises:
        ConfigError: ``text`` does not have that shape (``option`` names it).
    """
    match = _DESTINATION.match(text.strip())
    port = int(match["port"]) if match else 0
    if match is None or not 0 < port < 65536 or not match["aet"].strip():
        raise ConfigError(
            f"{option} {text!r} is not AET@HOST:PORT (e.g. PACS@10.0.0.5:104; the AE title "
            "has at most 16 characters)."
        )
    return Destination(match["aet"].strip(), match["host"], port)


def backoff(attempts: int, *, base: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failed try: doubling from ``base``,
    capped at ``maximum``."""
    return float(min(base * 2 ** max(attempts - 1, 0), maximum))


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> list[int]:
    """C-STORE ``paths`` to ``destination`` over one association (over TLS with ``tls``,
    the destination's certificate checked for its host name).

    Returns:
        The C-STORE status of each file, in order.

    Raises:
        SendError: the association could not be established or broke off.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    datasets = [pydicom.dcmread(p) for p in paths]
    classes = {str(ds.SOPClassUID) for ds in datasets} | {str(c) for c in _RESULT_CLASSES}
    for sop_class in sorted(classes):
        ae.add_requested_context(sop_class)
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=None if tls is None else (tls, destination.host),
    )
    if not assoc.is_established:
        reason = "rejected the association" if assoc.is_rejected else "could not be reached"
        raise SendError(f"{destination} {reason}")
    statuses: list[int] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if "Status" not in status:  # no answer: aborted or timed out
                raise SendError(f"{destination} did not answer the C-STORE (association lost)")
            statuses.append(int(status.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


@dataclass(frozen=True)
class JobAnswer:
    """What a finished node job answers, for the outbox.

    Attributes:
        paths: the answer's files (SR, key images, or a "not screened" SR).
        outcome: ``screened`` or ``not_screened``.
        reason: why it was not screened ("" when it was).
        problems: sentences for the outbox's failed items (why the answer is missing
            or is not the full one).
    """

    paths: list[Path]
    outcome: str
    reason: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Route:
    """Where a study's answer goes: ``destinations`` (``AET@HOST:PORT``), or, when
    none is known, ``missing``, the sentence saying what to configure."""

    destinations: list[str]
    missing: str = ""


class Outbox:
    """The thread that delivers node jobs' answers (see the module docstring).

    Args:
        node_store: the outbox's tables.
        job_store: the jobs (a node job's answer is queued once the job has ended).
        answer: the answer of an ended node job (builds what the scoring child could not).
        route: where the answer to a study sent by a calling AE goes.
        calling_ae: our AE title when sending.
        retry_base, retry_max: backoff (seconds).
        poll: seconds between rounds.
        on_sent: called with the job id, the destination and how many files it took.
        tls: send over TLS with this context (None: plain DICOM).
    """

    def __init__(
        self,
        node_store: NodeStore,
        job_store: JobStore,
        *,
        answer: Callable[[str], JobAnswer],
        route: Callable[[str], Route],
        calling_ae: str,
        retry_base: float = 10.0,
        retry_max: float = 300.0,
        poll: float = 0.5,
        on_sent: Callable[[str, str, int], None] = lambda job_id, where, n: None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        self.on_sent = on_sent
        self.node_store = node_store
        self.job_store = job_store
        self.answer = answer
        self.route = route
        self.calling_ae = calling_ae
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ctscreen-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.collect()
                self.send_due()
            except Exception:  # noqa: BLE001 - the outbox must outlive any one fault
                log.exception("outbox round failed; trying again")
            self._stop.wait(self.poll)

    def collect(self) -> None:
        """Move the answers of node jobs that ended into the outbox."""
        for job_id in self.node_store.jobs_scoring():
            job = self.job_store.get(job_id)
            if job is not None and job.status not in FINAL_STATUSES:
                continue
            known = self.node_store.node_job(job_id)
            calling_ae = known[1] if known else ""
            answer = self.answer(job_id)
            route = self.route(calling_ae)
            self.node_store.queue_results(
                job_id,
                answer.paths,
                destinations=route.destinations,
                outcome=answer.outcome,
                reason=answer.reason,
                problems=answer.problems,
                no_destination=route.missing,
            )
            log.info(
                "job %s (%s, %s): %d result file(s) queued for %s%s",
                job_id,
                "gone" if job is None else job.status,
                answer.outcome,
                len(answer.paths),
                ", ".join(route.destinations) or "no destination yet",
                f"; {len(answer.problems)} problem(s)" if answer.problems else "",
            )

    def assign_destinations(self) -> None:
        """Give the pending items that wait for a destination the one now known."""
        waiting = self.node_store.without_destination()
        by_job: dict[str, list[int]] = {}
        for item in self.node_store.outbox(limit=1_000_000):
            if item.id in waiting:
                by_job.setdefault(item.job_id, []).append(item.id)
        for job_id, ids in by_job.items():
            known = self.node_store.node_job(job_id)
            route = self.route(known[1] if known else "")
            if route.destinations:
                self.node_store.set_destination(ids, route.destinations[0])

    def send_due(self) -> None:
        """Send every due item, one association per job and destination."""
        by_target: dict[tuple[str, str], list[OutboxItem]] = {}
        for item in self.node_store.due():
            by_target.setdefault((item.job_id, item.destination), []).append(item)
        for (job_id, where), items in by_target.items():
            if self._stop.is_set():
                return
            present = []
            for item in items:
                if Path(item.path).is_file():
                    present.append(item)
                else:
                    log.warning("outbox: %s is gone (job deleted?); not sent", item.path)
                    self.node_store.mark_gone(item.id)
            if present:
                self._send_job(job_id, parse_destination(where), present)

    def _send_job(self, job_id: str, destination: Destination, items: list[OutboxItem]) -> None:
        where = str(destination)
        try:
            statuses = send_files(
                destination, [Path(i.path) for i in items], calling_ae=self.calling_ae, tls=self.tls
            )
        except (SendError, OSError, InvalidDicomError, ValueError, RuntimeError) as exc:
            message = exc.message if isinstance(exc, CtscreenError) else str(exc)
            for item in items:
                wait = backoff(item.attempts + 1, base=self.retry_base, maximum=self.retry_max)
                self.node_store.mark_failed(item.id, message, time.time() + wait, where)
            wait = backoff(items[0].attempts + 1, base=self.retry_base, maximum=self.retry_max)
            log.warning(
                "job %s: %d result(s) not sent to %s (%s); next try in %.0f s",
                job_id,
                len(items),
                where,
                message,
                wait,
            )
            return
        for item, status in zip(items, statuses, strict=True):
            if status in _STORED:
                self.node_store.mark_sent(item.id, where)
            else:
                wait = backoff(item.attempts + 1, base=self.retry_base, maximum=self.retry_max)
                self.node_store.mark_failed(
                    item.id, f"C-STORE status 0x{status:04X}", time.time() + wait, where
                )
                log.warning("job %s: %s refused %s (0x%04X)", job_id, where, item.path, status)
        log.info("job %s: results sent to %s", job_id, where)
        self.on_sent(job_id, where, sum(status in _STORED for status in statuses))
