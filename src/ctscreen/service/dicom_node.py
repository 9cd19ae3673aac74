"""The DICOM node of ``ctscreen serve``: studies arrive by C-STORE, results leave by C-STORE.

* **Receiver** (pynetdicom SCP): Verification (C-ECHO) and storage. Every storage
  SOP class is accepted at association time, so that a PACS sending a whole study
  (CT images plus a dose report or a localizer) keeps its association; an
  instance of anything but CT Image or Enhanced CT Image storage is answered with
  success but not kept (a refusal such as ``0x0122`` makes a PACS like Orthanc fail
  the whole study's send job, so the CT images after it would never come), and is
  listed among the refused instances with its reason. Accepted instances are
  written to disk as they arrive, under ``DATA/dicom-in/<generated>/<sha1 of the
  SOPInstanceUID>.dcm`` (a re-sent instance replaces itself; nothing the sender
  chose becomes a path).
* **Stable-study watcher**: a study is complete once no instance of it arrived for
  ``stable_seconds`` (a PACS "stable study" rule); it then becomes a job of the
  service's :class:`~ctscreen.service.store.JobStore`, scored by the service's
  worker like any upload. A study an association was aborted in the middle of
  (or the service stopped while receiving) is scored with a warning in its row
  and its SR naming the instance numbers that are missing.
* **Outbox** (:mod:`ctscreen.service.sender`): every study is answered. The SR
  and key images the scoring child wrote (:mod:`ctscreen.outputs.dicom`), or a
  "not screened" SR saying why when the study could not be scored (also when the
  child died or timed out, built here from the header kept at receipt), go back
  to the calling AE (its address from ``--allow-ae AET@HOST:PORT``) or to each
  ``--send-to``, retried with backoff until delivered. What is not the full answer
  is a ``failed`` outbox item with its reason, in the API, the page and ``/metrics``.
* **Refusals**: an instance refused at C-STORE (unreadable UIDs, not CT) is listed
  with the calling AE and the UIDs it had.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ..dicom.discover import CT_SOP_CLASSES
from ..errors import ConfigError
from ..fileio import write_bytes_atomic
from ..outputs.dicom import NodeJob
from .node_answers import (
    earlier_reports,
    header_from_json,
    header_json,
    job_answer,
    missing_instances,
)
from .node_settings import NodeSettings
from .node_store import Incoming, NodeStore, Refusal
from .sender import Outbox
from .store import InputFile, JobStore, new_job_id, stored_name

log = logging.getLogger(__name__)

#: The SOP classes the node scores; every other storage class is refused per instance.
ACCEPTED_SOP_CLASSES: frozenset[str] = CT_SOP_CLASSES
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
INCOMING_DIR = "dicom-in"
#: A study whose association stays open (idle) is taken after this many stable periods.
OPEN_WAIT = 3
#: Every transfer syntax pynetdicom knows, for CT (a PACS may send JPEG, JPEG 2000, RLE...).
_CT_TRANSFER_SYNTAXES: list[str] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]


def _instance_name(sop_instance_uid: str) -> str:
    return hashlib.sha1(sop_instance_uid.encode("ascii", "replace")).hexdigest() + ".dcm"


class DicomNode:
    """The receiver, the stable-study watcher and the outbox, started and stopped together.

    Example:
        >>> settings = NodeSettings(port=11112)
        >>> node = DicomNode(Path("data"), settings, wake=worker.wake)  # doctest: +SKIP
        >>> node.start()  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: Path,
        settings: NodeSettings,
        *,
        wake: Callable[[], None] = lambda: None,
        run_info: Callable[[], dict[str, Any]] = dict,
        poll: float = 0.5,
    ) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.incoming_dir = self.data_dir / INCOMING_DIR
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        # The service's one database; the node's tables sit beside the jobs (SQLite WAL).
        self.jobs = JobStore(self.data_dir)
        self.node_store = NodeStore(self.jobs)
        self.wake = wake
        self.run_info = run_info
        self.poll = poll
        self.outbox = Outbox(
            self.node_store,
            self.jobs,
            answer=lambda job_id: job_answer(self.jobs, job_id, self.run_info()),
            route=settings.route,
            calling_ae=settings.ae_title,
            retry_base=settings.retry_base,
            retry_max=settings.retry_max,
        )
        self._server: Any = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._assoc_studies: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Recover what a stopped service left, then listen, watch and send.

        Raises:
            ConfigError: the DICOM port cannot be opened.
        """
        interrupted = self.node_store.recover_incoming()
        if interrupted:
            log.warning("%d studies were being received when the service stopped", len(interrupted))
        ae = AE(ae_title=self.settings.ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            syntaxes = (
                _CT_TRANSFER_SYNTAXES
                if context.abstract_syntax in ACCEPTED_SOP_CLASSES
                else context.transfer_syntax
            )
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.maximum_associations = 16
        ae.require_called_aet = True  # a PACS calling another AE title is misconfigured
        if self.settings.allowed_aes:
            ae.require_calling_aet = list(self.settings.allowed_aes)
        elif self.settings.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "the DICOM port accepts studies from any AE on the network; restrict it with "
                "--allow-ae (the PACS's AE title) or a firewall"
            )
        handlers = [
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        try:
            self._server = ae.start_server(
                (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for DICOM on {self.settings.host}:{self.settings.port} "
                f"({exc.strerror or exc}); choose another --dicom-port."
            ) from exc
        self._watcher = threading.Thread(target=self._watch, name="ctscreen-stable", daemon=True)
        self._watcher.start()
        self.outbox.assign_destinations()
        self.outbox.start()
        where = ", ".join(str(d) for d in self.settings.send_to) or (
            "the calling AE"
            + (
                f" ({', '.join(str(p) for p in self.settings.peers)})"
                if self.settings.peers
                else ""
            )
        )
        log.warning(
            "DICOM node %s on %s:%d (stable after %g s; results to %s)",
            self.settings.ae_title,
            self.settings.host,
            self.settings.port,
            self.settings.stable_seconds,
            where,
        )

    def stop(self) -> None:
        """Stop listening, watching and sending (what is pending stays on disk)."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        self.outbox.stop()
        self.jobs.close()

    def status(self, limit: int = 100) -> dict[str, Any]:
        """The node as ``GET /api/v1/dicom`` shows it: its settings, the studies being
        received, the outbox's counts and its newest ``limit`` items (Unix times)."""
        oldest = self.node_store.oldest_pending()
        settings = self.settings
        return {
            "ae_title": settings.ae_title,
            "port": settings.port,
            "send_to": [str(d) for d in settings.send_to],
            "peers": [str(d) for d in settings.peers],
            "stable_seconds": settings.stable_seconds,
            "studies": self.node_store.study_counts(),
            "recent_studies": self.node_store.studies(limit),
            "refused": {
                "by_reason": self.node_store.refusal_counts(),
                "items": [asdict(r) for r in self.node_store.refusals(limit)],
            },
            # The folder and the file's full path are the server's business, not the API's.
            "incoming": [
                {k: v for k, v in asdict(s).items() if k != "folder"}
                for s in self.node_store.incoming()
            ],
            "outbox": {
                **self.node_store.outbox_counts(),
                "oldest_pending_seconds": None
                if oldest is None
                else round(time.time() - oldest, 1),
            },
            "items": [
                {k: v for k, v in asdict(i).items() if k != "path"} | {"file": Path(i.path).name}
                for i in self.node_store.outbox(limit)
            ],
        }

    def retry_now(self) -> int:
        """Send every pending result at the outbox's next round instead of after its
        backoff; returns how many were waiting."""
        return self.node_store.retry_now()

    # ------------------------------------------------------------------ receiver

    def _refuse(self, event: Any, status: int, reason: str, **uids: str) -> int:
        """Record a refused instance (listed in the API and counted in /metrics)."""
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        log.warning("refused an instance from %s: %s (%s)", calling_ae, reason, uids or "no UIDs")
        try:
            self.node_store.refuse(
                Refusal(
                    time=time.time(),
                    calling_ae=calling_ae,
                    study_uid=uids.get("study_uid", ""),
                    sop_instance_uid=uids.get("sop_instance_uid", ""),
                    sop_class_uid=uids.get("sop_class_uid", ""),
                    reason=reason,
                )
            )
        except Exception:  # noqa: BLE001 - a refusal must be answered even if not recorded
            log.exception("cannot record the refusal")
        return status

    def _on_store(self, event: Any) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if sop_class not in ACCEPTED_SOP_CLASSES:
            # Success, not 0x0122: a refusal fails the sender's whole study job.
            return self._refuse(
                event,
                STATUS_SUCCESS,
                "not CT image storage: received and not kept (ctscreen scores CT only)",
                sop_class_uid=sop_class,
                sop_instance_uid=sop_uid,
            )
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
            return self._refuse(
                event,
                STATUS_CANNOT_UNDERSTAND,
                f"the dataset cannot be decoded ({type(exc).__name__})",
                sop_class_uid=sop_class,
                sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
            )
        if not study_uid or not sop_uid:
            return self._refuse(
                event,
                STATUS_CANNOT_UNDERSTAND,
                "no StudyInstanceUID or SOPInstanceUID in the dataset",
                study_uid=study_uid,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
            )
        if str(ds.get("SOPClassUID", sop_class)) != sop_class:
            return self._refuse(
                event,
                STATUS_DATASET_MISMATCH,
                "the dataset's SOPClassUID differs from the C-STORE request's",
                study_uid=study_uid,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
            )
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            folder_name = self.node_store.receive(
                study_uid, calling_ae, secrets.token_hex(12), header=header_json(ds, sop_class)
            )
            with self._lock:
                first_here = study_uid not in self._assoc_studies.setdefault(id(event.assoc), set())
                self._assoc_studies[id(event.assoc)].add(study_uid)
            if first_here:
                self.node_store.association_opened(study_uid)
            write_bytes_atomic(
                self.incoming_dir / folder_name / _instance_name(sop_uid),
                event.encoded_dataset(include_meta=True),
            )
        except OSError as exc:
            log.error("cannot store an instance of study %s: %s", study_uid, exc)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    def _end_association(self, event: Any, aborted: str) -> None:
        with self._lock:
            studies = self._assoc_studies.pop(id(event.assoc), set())
        for study_uid in studies:
            self.node_store.association_closed(study_uid, aborted=aborted)
            if aborted:
                log.warning("study %s: %s", study_uid, aborted)

    def _on_released(self, event: Any) -> None:
        self._end_association(event, "")

    def _on_aborted(self, event: Any) -> None:
        ae = str(event.assoc.requestor.ae_title).strip()
        self._end_association(event, f"the association from {ae} was aborted while sending it")

    def _on_closed(self, event: Any) -> None:
        # A connection that closed without release or abort (the peer died) is an abort too.
        ae = str(event.assoc.requestor.ae_title).strip()
        self._end_association(
            event, f"the association from {ae} ended without a release (aborted or cut off)"
        )

    # ------------------------------------------------------------------ watcher

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.settings.stable_seconds
                for study in self.node_store.stable(wait):
                    quiet = time.time() - study.last
                    if study.receiving and not study.aborted and quiet < OPEN_WAIT * wait:
                        continue  # its association is still open: more may come
                    self.make_job(study)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one study
                log.exception("stable-study watcher round failed; trying again")
            self._stop.wait(self.poll)

    def make_job(self, study: Incoming) -> str:
        """Turn a complete (stable) study into a queued job; returns its id.

        The instances are hard-linked into the job's upload folder before the job
        is added and removed from ``dicom-in`` only after: a crash in between
        leaves the study where it was, to be made a job again.

        A study answered before (a series that came after it was scored) is scored
        again with every instance received for it, and its new SR names the earlier
        ones as predecessors, so that the PACS shows which answer supersedes which.
        """
        source = self.incoming_dir / study.folder
        job_id = new_job_id()
        target = self.jobs.upload_dir(job_id) / stored_name(0)
        target.mkdir(parents=True, exist_ok=True)
        earlier = self.node_store.jobs_of_study(study.study_uid)
        # the instances just received first, so that a re-sent one replaces its old copy
        folders = [source] + [self.jobs.upload_dir(j) / stored_name(0) for j in reversed(earlier)]
        size = 0
        for folder in folders:
            for path in sorted(folder.glob("*.dcm")):
                try:
                    os.link(path, target / path.name)
                except FileExistsError:
                    continue  # re-sent: the newest copy is already there
                except OSError:
                    shutil.copy2(path, target / path.name)
                size += path.stat().st_size
        previous = tuple(str(p) for j in earlier for p in earlier_reports(self.jobs, j))
        warnings: tuple[str, ...] = ()
        if study.aborted:
            missing = missing_instances(target)
            warnings = (
                f"possibly incomplete study: {study.aborted} and it was not sent again; "
                + (missing or "no instance numbers to check")
                + ".",
            )
        header = header_from_json(study.header)
        NodeJob(study.study_uid, study.calling_ae, warnings, header, previous).write(
            self.jobs.job_dir(job_id)
        )
        name = f"DICOM study {study.study_uid} from {study.calling_ae}"
        self.jobs.add_job(job_id, [InputFile(0, name, stored_name(0), size)], mode="study")
        self.node_store.to_job(study, job_id)
        shutil.rmtree(source, ignore_errors=True)
        log.info(
            "study %s from %s complete (%d instances): job %s%s%s",
            study.study_uid,
            study.calling_ae,
            study.instances,
            job_id,
            " (possibly incomplete)" if warnings else "",
            f" (supersedes {len(previous)} earlier report(s))" if previous else "",
        )
        self.wake()
        return job_id


__all__ = ["ACCEPTED_SOP_CLASSES", "DicomNode", "NodeSettings"]
