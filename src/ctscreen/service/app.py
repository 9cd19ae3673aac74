"""The HTTP layer of ``ctscreen serve``: a FastAPI app over the job store and the worker.

Routes (all but the health checks need a token when one is set; each needs a role,
:mod:`ctscreen.service.roles`):

- ``POST /api/v1/jobs``: multipart upload (field ``files``, one or more zip archives
  or DICOM files; optional field ``mode`` = ``study`` | ``slice``), streamed to
  disk under generated names with size and count caps; 202 ``{"id", "status"}``.
- ``GET /api/v1/jobs``, ``GET /api/v1/jobs/{id}``: status, progress and rows.
- ``GET /api/v1/jobs/{id}/result.{xlsx,csv,json}``, ``GET /api/v1/results.{...}``:
  the task's table (the seven required columns first, as ``ctscreen predict``).
- ``GET /api/v1/jobs/{id}/report``: the HTML report; ``DELETE /api/v1/jobs/{id}``.
- ``GET /api/v1/dicom``, ``POST /api/v1/dicom/outbox/retry``: the DICOM node.
- ``GET /api/v1/audit`` (admins; ``?format=csv``): the audit trail.
- ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus text format), ``/docs``.
- ``/``: the web page (English or Russian).

Each group of routes is a router of its own (:mod:`ctscreen.service.routes`), which
receives the store, the worker, the settings and the node as one typed dependency
(:class:`~ctscreen.service.context.ServiceContext`).

The app never scores anything itself: :class:`~ctscreen.service.worker.Worker`
does, in its child process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from .audit import AuditTrail
from .retention import Retention, RetentionPolicy
from .roles import TokenEntry, TokenTable, session_key
from .routes import audit as audit_routes
from .routes import dicom, health, jobs, ui
from .security import check_listen_address, is_public, security_headers
from .store import JobStore
from .worker import Worker, WorkerConfig

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServiceSettings:
    """Everything ``ctscreen serve`` is configured with.

    Attributes:
        data_dir: the job store's folder (SQLite, uploads, results).
        worker: how the scoring child builds its Screener.
        token: the admin token; "" for none (with no ``tokens`` either, allowed on
            loopback only, see :func:`check_listen_address`).
        tokens: the ``--tokens`` file's entries (:mod:`.roles`).
        study_timeout: seconds one study may take before its job is stopped.
        load_timeout: seconds the model may take to load.
        max_upload_bytes: most bytes one upload (request) may carry.
        max_files: most files one upload may carry.
        max_active_jobs: most jobs queued or running at once; more are refused (429).
        retention: how long uploads and results are kept (:mod:`.retention`).
    """

    data_dir: Path
    worker: WorkerConfig
    token: str = ""
    tokens: tuple[TokenEntry, ...] = ()
    study_timeout: float = 600.0
    load_timeout: float = 600.0
    max_upload_bytes: int = 4 * 1024**3
    max_files: int = 100
    max_active_jobs: int = 50
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    extra_run_info: dict[str, Any] = field(default_factory=dict)


def create_app(settings: ServiceSettings, *, worker: Worker | None = None) -> FastAPI:
    """Build the app. The store opens now; the worker starts with the app's lifespan.

    Args:
        settings: the service configuration.
        worker: a worker to use instead of one built from ``settings`` (tests).
    """
    store = JobStore(settings.data_dir)
    store.recover()  # before the worker takes a job: a restart loses nothing
    audit = AuditTrail(store)
    tokens = TokenTable.build(settings.token, settings.tokens, session_key(settings.data_dir))
    retention = Retention(store, settings.retention, audit)
    if worker is None:
        worker = Worker(
            store,
            settings.worker,
            study_timeout=settings.study_timeout,
            load_timeout=settings.load_timeout,
        )

    worker.on_job_end = retention.job_ended

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        retention.start()  # a first sweep before anything else
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            retention.stop()
            store.close()

    app = FastAPI(
        title="ctscreen",
        version=__version__,
        summary="Chest CT screening: DICOM studies in, the task's result table out.",
        description="Research tool, not for clinical use. Send `Authorization: Bearer <token>` "
        "when the server has a token.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.worker = worker
    app.state.settings = settings
    app.state.audit = audit
    app.state.tokens = tokens
    app.state.retention = retention
    app.state.node = None  # the DICOM node, set by ``ctscreen serve --dicom-port``
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        path = request.url.path
        request.state.principal = tokens.principal(request)
        if request.state.principal is None and not is_public(path, request.method):
            response: Response = JSONResponse(
                {"detail": "missing or wrong token: send 'Authorization: Bearer <token>'."},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            response = await call_next(request)
        security_headers(response, path)
        return response

    for router in (jobs.router, dicom.router, health.router, ui.router, audit_routes.router):
        app.include_router(router)
    return app


__all__ = ["ServiceSettings", "check_listen_address", "create_app"]
