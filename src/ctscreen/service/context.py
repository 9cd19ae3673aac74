"""What every route of the app works with, handed to it as a FastAPI dependency."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request

from .. import __version__
from .audit import AuditTrail
from .roles import Principal
from .store import Job, JobStore, is_job_id
from .worker import Worker

if TYPE_CHECKING:
    from .app import ServiceSettings
    from .dicom_node import DicomNode


@dataclass(frozen=True)
class ServiceContext:
    """The job store, the worker, the settings, the DICOM node (None when off), the
    audit trail, and who sent the request from where."""

    store: JobStore
    worker: Worker
    settings: ServiceSettings
    node: DicomNode | None
    audit: AuditTrail
    principal: Principal | None = None
    address: str = ""

    def run_info(self) -> dict[str, Any]:
        """What the tables' run sheet and the page say about the model and the service."""
        info: dict[str, Any] = {"service": "ctscreen serve", "ctscreen_version": __version__}
        info.update(self.worker.run_info)
        info.update(self.settings.extra_run_info)
        info["note"] = "research tool, not for clinical use"
        return info

    def record(self, action: str, *, job_id: str = "", detail: str = "") -> None:
        """An entry of the audit trail for what the requester just did."""
        who = self.principal
        self.audit.record(
            action,
            actor=who.name if who else "",
            role=who.role if who else "",
            job_id=job_id,
            address=self.address,
            detail=detail,
        )

    def threshold(self) -> float | None:
        """The model's decision threshold (None until the model is loaded)."""
        value = self.worker.run_info.get("threshold")
        return None if value is None else float(value)

    def job(self, job_id: str) -> Job:
        """The job ``job_id``.

        Raises:
            HTTPException: 404, no such job.
        """
        job = self.store.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (it may have been deleted).")
        return job

    def results_of(self, job_id: str) -> Job:
        """The job ``job_id``, whose results are still kept.

        Raises:
            HTTPException: 404, no such job; 410, its results were removed
                (``--keep-results``); 409, it is not done yet.
        """
        job = self.job(job_id)
        if job.expired is not None:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(job.expired))
            raise HTTPException(
                410,
                f"job {job.id} has expired: its results were removed on {when}, as the "
                "server keeps them (--keep-results); its record remains in the job list.",
            )
        if not job.final:
            raise HTTPException(409, f"job {job.id} is {job.status}; its results come when done.")
        return job

    def dicom_node(self) -> DicomNode:
        """The DICOM node.

        Raises:
            HTTPException: 404, the node is off.
        """
        if self.node is None:
            raise HTTPException(
                404, "the DICOM node is off; start ctscreen serve with --dicom-port to use it."
            )
        return self.node


def service_context(request: Request) -> ServiceContext:
    """The context of the app serving ``request``."""
    state = request.app.state
    return ServiceContext(
        state.store,
        state.worker,
        state.settings,
        state.node,
        state.audit,
        getattr(request.state, "principal", None),
        request.client.host if request.client else "",
    )


#: A route's parameter of this type receives the :class:`ServiceContext`.
Context = Annotated[ServiceContext, Depends(service_context)]
