"""The HTTP layer of ``ctscreen serve``: a FastAPI app over the job store and the worker.

Routes (all but the health checks need the token when one is set):

- ``POST /api/v1/jobs``: multipart upload (field ``files``, one or more zip archives
  or DICOM files; optional field ``mode`` = ``study`` | ``slice``), streamed to
  disk under generated names with size and count caps; 202 ``{"id", "status"}``.
- ``GET /api/v1/jobs``, ``GET /api/v1/jobs/{id}``: status, progress and rows.
- ``GET /api/v1/jobs/{id}/result.{xlsx,csv,json}``, ``GET /api/v1/results.{...}``:
  the task's table (the seven required columns first, as ``ctscreen predict``).
- ``GET /api/v1/jobs/{id}/report``: the HTML report; ``DELETE /api/v1/jobs/{id}``.
- ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus text format), ``/docs``.
- ``/``: the web page (English or Russian).

The app never scores anything itself: :class:`~ctscreen.service.worker.Worker`
does, in its child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from python_multipart.multipart import MultipartParser, parse_options_header

from .. import __version__
from ..errors import ConfigError
from ..report import OUTPUT_FORMATS, ResultRow, rows_to_frame, write_table
from . import page
from .store import (
    FINAL_STATUSES,
    JOB_STATUSES,
    QUEUED,
    RUNNING,
    InputFile,
    Job,
    JobStore,
    is_job_id,
    new_job_id,
    stored_name,
)
from .worker import STUDY_SECONDS_BUCKETS, Worker, WorkerConfig

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_HOSTS: frozenset[str] = frozenset({"127.0.0.1", "::1", "localhost"})
SESSION_COOKIE = "ctscreen_session"
UPLOAD_MODES: tuple[str, ...] = ("study", "slice")
_PUBLIC_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz", "/ui/login"})
_MAX_NAME = 200


@dataclass(frozen=True)
class ServiceSettings:
    """Everything ``ctscreen serve`` is configured with.

    Attributes:
        data_dir: the job store's folder (SQLite, uploads, results).
        worker: how the scoring child builds its Screener.
        token: the API token; "" for none (allowed on loopback only, see
            :func:`check_listen_address`).
        study_timeout: seconds one study may take before its job is stopped.
        load_timeout: seconds the model may take to load.
        max_upload_bytes: most bytes one upload (request) may carry.
        max_files: most files one upload may carry.
        max_active_jobs: most jobs queued or running at once; more are refused (429).
    """

    data_dir: Path
    worker: WorkerConfig
    token: str = ""
    study_timeout: float = 600.0
    load_timeout: float = 600.0
    max_upload_bytes: int = 4 * 1024**3
    max_files: int = 100
    max_active_jobs: int = 50
    extra_run_info: dict[str, Any] = field(default_factory=dict)


def check_listen_address(host: str, token: str) -> None:
    """Refuse to listen beyond loopback without a token.

    Raises:
        ConfigError: ``host`` is not a loopback address and no token is set.
    """
    if host not in LOOPBACK_HOSTS and not token:
        raise ConfigError(
            f"--host {host} lets other machines reach the service, so it needs a token: "
            "set --token or the CTSCREEN_TOKEN environment variable (e.g. "
            "CTSCREEN_TOKEN=$(openssl rand -hex 32))."
        )


def display_name(filename: str | None, index: int) -> str:
    """A client's file name made safe to show: its last path part, printable, bounded.

    It is display text only; the file is stored under a generated name.
    """
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    return name[:_MAX_NAME] or f"upload-{index + 1}"


def session_value(token: str) -> str:
    """The session cookie's value for ``token`` (a MAC of it, not the token itself)."""
    return hmac.new(token.encode(), b"ctscreen-session-v1", hashlib.sha256).hexdigest()


def _authorised(request: Request, token: str) -> bool:
    if not token:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


class UploadRejected(Exception):
    """An upload breaks a limit or is malformed; carries the HTTP status and a sentence."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _UploadWriter:
    """Receives a multipart body chunk by chunk and writes each file straight to disk."""

    def __init__(self, folder: Path, *, max_bytes: int, max_files: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.inputs: list[InputFile] = []
        self.fields: dict[str, str] = {}
        self.total = 0
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._file: Any = None
        self._name = ""
        self._size = 0
        self._text: bytearray | None = None
        self._field_name = ""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if field_name == "files" and filename is not None:
            if len(self.inputs) >= self.max_files:
                raise UploadRejected(
                    413, f"too many files in one upload (at most {self.max_files}); split it."
                )
            index = len(self.inputs)
            self._name = display_name(filename.decode("utf-8", "replace"), index)
            self._file = open(self.folder / stored_name(index), "wb")  # noqa: SIM115
            self._size = 0
            self._text = None
        elif field_name in ("mode",):
            self._text = bytearray()
            self._field_name = field_name
        else:
            raise UploadRejected(
                400,
                f"unexpected form field {field_name!r}: send the files as 'files' "
                "(and optionally 'mode').",
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        self.total += n
        if self.total > self.max_bytes:
            raise UploadRejected(
                413,
                f"the upload is larger than {self.max_bytes / 1024**2:.0f} MiB, the limit of "
                "this server; send fewer files per job.",
            )
        if self._file is not None:
            self._file.write(data[start:end])
            self._size += n
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > 100:
                raise UploadRejected(400, "form field 'mode' is too long.")

    def _part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            index = len(self.inputs)
            self.inputs.append(InputFile(index, self._name, stored_name(index), self._size))
            self._file = None
        elif self._text is not None:
            self.fields[self._field_name] = self._text.decode("utf-8", "replace").strip()
            self._text = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _frame_records(rows: list[ResultRow]) -> list[dict[str, Any]]:
    """Rows as JSON records, exactly as the .json table writes them."""
    if not rows:
        return []
    return json.loads(rows_to_frame(rows).to_json(orient="records"))


def job_json(job: Job, rows: list[ResultRow] | None) -> dict[str, Any]:
    """The API's view of a job."""
    return {
        "id": job.id,
        "status": job.status,
        "mode": job.mode,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "message": job.message,
        "progress": {
            "inputs": len(job.inputs),
            "inputs_done": job.inputs_done,
            "studies_done": job.rows_done,
            "failures": job.failures,
        },
        "inputs": [{"name": f.name, "size": f.size} for f in job.inputs],
        "rows": None if rows is None else _frame_records(rows),
    }


def _security_headers(response: Response, path: str) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if not path.startswith("/docs"):
        # The report embeds its pictures as data: URLs and carries its own <style>.
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "frame-ancestors 'none'",
        )


def create_app(settings: ServiceSettings, *, worker: Worker | None = None) -> FastAPI:
    """Build the app. The store opens now; the worker starts with the app's lifespan.

    Args:
        settings: the service configuration.
        worker: a worker to use instead of one built from ``settings`` (tests).
    """
    store = JobStore(settings.data_dir)
    store.recover()  # before the worker takes a job: a restart loses nothing
    if worker is None:
        worker = Worker(
            store,
            settings.worker,
            study_timeout=settings.study_timeout,
            load_timeout=settings.load_timeout,
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
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
    app.state.node = None  # the DICOM node, set by ``ctscreen serve --dicom-port``
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        path = request.url.path
        public = (
            path in _PUBLIC_PATHS
            or path.startswith("/static/")
            or (path == "/" and request.method == "GET")
        )
        if not public and not _authorised(request, settings.token):
            response: Response = JSONResponse(
                {"detail": "missing or wrong token: send 'Authorization: Bearer <token>'."},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            response = await call_next(request)
        _security_headers(response, path)
        return response

    def run_info() -> dict[str, Any]:
        info: dict[str, Any] = {"service": "ctscreen serve", "ctscreen_version": __version__}
        info.update(worker.run_info)
        info.update(settings.extra_run_info)
        info["note"] = "research tool, not for clinical use"
        return info

    def threshold() -> float | None:
        value = worker.run_info.get("threshold")
        return None if value is None else float(value)

    def lookup(job_id: str) -> Job:
        job = store.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (it may have been deleted).")
        return job

    def table_response(rows: list[ResultRow], folder: Path, stem: str, fmt: str) -> Response:
        if fmt not in OUTPUT_FORMATS:
            raise HTTPException(
                404, f"unknown table format {fmt!r}; use {', '.join(OUTPUT_FORMATS)}."
            )
        folder.mkdir(parents=True, exist_ok=True)
        path = write_table(rows_to_frame(rows), folder / f"{stem}.{fmt}", run_info=run_info())
        media = {
            "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            "csv": "text/csv; charset=utf-8",
            "json": "application/json",
            "parquet": "application/vnd.apache.parquet",
        }[fmt]
        return FileResponse(path, media_type=media, filename=path.name)

    # ------------------------------------------------------------------ API

    @app.post(
        "/api/v1/jobs",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["files"],
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                    "description": "zip archives or DICOM files",
                                },
                                "mode": {
                                    "type": "string",
                                    "enum": list(UPLOAD_MODES),
                                    "default": "study",
                                    "description": "rows per study (default) or per slice",
                                },
                            },
                        }
                    }
                },
            }
        },
        summary="Upload studies and queue a scoring job",
    )
    async def create_job(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
            raise HTTPException(
                413,
                f"the upload is larger than {settings.max_upload_bytes / 1024**2:.0f} MiB, the "
                "limit of this server; send fewer files per job.",
            )
        content_type, options = parse_options_header(request.headers.get("content-type", ""))
        boundary = options.get(b"boundary")
        if content_type != b"multipart/form-data" or not boundary:
            raise HTTPException(
                415, "send the studies as multipart/form-data with the field 'files'."
            )
        counts = store.count_by_status()
        if counts[QUEUED] + counts[RUNNING] >= settings.max_active_jobs:
            raise HTTPException(
                429,
                f"{settings.max_active_jobs} jobs are already waiting or running, the limit of "
                "this server; try again when some have finished.",
                headers={"Retry-After": "30"},
            )
        job_id = new_job_id()
        writer = _UploadWriter(
            store.upload_dir(job_id),
            max_bytes=settings.max_upload_bytes,
            max_files=settings.max_files,
        )
        parser = MultipartParser(boundary, writer.callbacks())
        try:
            async for chunk in request.stream():
                # File writes block; off the event loop, the other requests keep flowing.
                await asyncio.to_thread(parser.write, chunk)
            parser.finalize()
        except UploadRejected as exc:
            writer.close()
            store.discard_upload(job_id)
            raise HTTPException(exc.status, exc.detail) from None
        except OSError as exc:  # the disk is full or the data folder went away
            writer.close()
            store.discard_upload(job_id)
            log.error("upload %s could not be stored: %s", job_id, exc)
            raise HTTPException(
                507, f"the server could not store the upload ({exc.strerror or exc}); try later."
            ) from None
        except Exception as exc:  # a torn connection or a malformed body
            writer.close()
            store.discard_upload(job_id)
            log.info("upload %s abandoned: %s", job_id, exc)
            raise HTTPException(400, f"the upload could not be read ({exc}).") from None
        mode = writer.fields.get("mode", "study") or "study"
        if mode not in UPLOAD_MODES:
            store.discard_upload(job_id)
            raise HTTPException(422, f"mode must be one of {', '.join(UPLOAD_MODES)}.")
        if not writer.inputs:
            store.discard_upload(job_id)
            raise HTTPException(422, "no files in the upload: send them in the field 'files'.")
        store.add_job(job_id, writer.inputs, mode=mode)
        worker.wake()
        return JSONResponse(
            {"id": job_id, "status": QUEUED},
            status_code=202,
            headers={"Location": f"/api/v1/jobs/{job_id}"},
        )

    @app.get("/api/v1/jobs", summary="The newest jobs (without their rows)")
    def list_jobs(limit: int = 100) -> dict[str, Any]:
        jobs = store.list_jobs(limit=max(1, min(limit, 1000)))
        return {"jobs": [job_json(job, None) for job in jobs]}

    @app.get("/api/v1/jobs/{job_id}", summary="A job's status, progress and rows")
    def get_job(job_id: str) -> dict[str, Any]:
        job = lookup(job_id)
        return job_json(job, store.rows(job.id))

    @app.get("/api/v1/jobs/{job_id}/result.{fmt}", summary="A job's result table")
    def job_table(job_id: str, fmt: str) -> Response:
        job = lookup(job_id)
        if job.status not in FINAL_STATUSES:
            raise HTTPException(409, f"job {job.id} is {job.status}; its table comes when done.")
        return table_response(store.rows(job.id), store.job_dir(job.id), "result", fmt)

    @app.get("/api/v1/results.{fmt}", summary="All jobs' rows in one table")
    def all_results(fmt: str) -> Response:
        return table_response(store.all_rows(), settings.data_dir / "results", "results", fmt)

    @app.get("/api/v1/jobs/{job_id}/report", summary="A job's HTML report")
    def job_report(job_id: str) -> Response:
        job = lookup(job_id)
        if job.status not in FINAL_STATUSES:
            raise HTTPException(409, f"job {job.id} is {job.status}; its report comes when done.")
        index = store.job_dir(job.id) / "report" / "index.html"
        if not index.is_file():
            raise HTTPException(
                404,
                f"job {job.id} has no report: it ended before its last study ({job.message}); "
                "its table holds the rows it has.",
            )
        return FileResponse(index, media_type="text/html; charset=utf-8")

    @app.delete("/api/v1/jobs/{job_id}", summary="Delete a job and its files")
    def delete_job(job_id: str) -> dict[str, Any]:
        job = lookup(job_id)
        if job.status == RUNNING:
            raise HTTPException(409, f"job {job.id} is being scored; delete it when it is done.")
        store.delete(job.id)
        return {"id": job.id, "deleted": True}

    # ------------------------------------------------------------------ DICOM node

    def dicom_node() -> Any:
        node = app.state.node
        if node is None:
            raise HTTPException(
                404, "the DICOM node is off; start ctscreen serve with --dicom-port to use it."
            )
        return node

    @app.get("/api/v1/dicom", summary="The DICOM node: studies being received, the outbox")
    def dicom_status(limit: int = 100) -> dict[str, Any]:
        return dicom_node().status(limit=max(1, min(limit, 1000)))

    @app.post("/api/v1/dicom/outbox/retry", summary="Send every pending result now")
    def dicom_retry() -> dict[str, int]:
        return {"rescheduled": dicom_node().retry_now()}

    # ------------------------------------------------------------------ health

    @app.get("/healthz", summary="The process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded, worker alive, store writable")
    def readyz() -> JSONResponse:
        checks = {"model_loaded": worker.ready, "worker_alive": worker.alive}
        try:
            store.check_writable()
            checks["store_writable"] = True
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            log.warning("store not writable: %s", exc)
            checks["store_writable"] = False
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not ready", **checks}
        if worker.fatal:
            body["error"] = worker.fatal
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            prometheus_text(store, worker, app.state.node),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="ctscreen API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon.png",
        )

    # ------------------------------------------------------------------ page

    def language(request: Request) -> str:
        return page.pick_language(
            request.query_params.get("lang"),
            request.cookies.get("lang"),
            request.headers.get("accept-language"),
        )

    def fragment(lang: str) -> str:
        jobs = store.list_jobs(limit=50)
        rows = {job.id: store.rows(job.id) for job in jobs if job.rows_done}
        return page.jobs_fragment(jobs, rows, threshold=threshold(), lang=lang)

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> HTMLResponse:
        lang = language(request)
        if not _authorised(request, settings.token):
            response = HTMLResponse(page.login_page(lang=lang), status_code=401)
        else:
            response = HTMLResponse(
                page.main_page(
                    fragment(lang), lang=lang, run_info=run_info(), dicom=dicom_fragment(lang)
                )
            )
        if request.query_params.get("lang") in page.LANGUAGES:
            response.set_cookie("lang", lang, samesite="strict", max_age=365 * 86400)
        return response

    @app.get("/ui/jobs", include_in_schema=False)
    def jobs_fragment(request: Request) -> HTMLResponse:
        return HTMLResponse(fragment(language(request)))

    def dicom_fragment(lang: str) -> str | None:
        node = app.state.node
        return None if node is None else page.dicom_panel(node.status(limit=20), lang)

    @app.get("/ui/dicom", include_in_schema=False)
    def dicom_panel(request: Request) -> HTMLResponse:
        status = dicom_node().status(limit=20)  # 404 when the node is off
        return HTMLResponse(page.dicom_panel(status, language(request)))

    @app.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        lang = language(request)
        form = await request.form(max_files=0, max_fields=2, max_part_size=4096)
        given = str(form.get("token", ""))
        if not settings.token or hmac.compare_digest(given.encode(), settings.token.encode()):
            response: Response = Response(status_code=303, headers={"Location": f"/?lang={lang}"})
            if settings.token:
                response.set_cookie(
                    SESSION_COOKIE,
                    session_value(settings.token),
                    httponly=True,
                    samesite="strict",
                    secure=request.url.scheme == "https",
                )
            return response
        return HTMLResponse(page.login_page(lang=lang, wrong=True), status_code=401)

    return app


def prometheus_text(store: JobStore, worker: Worker, node: Any = None) -> str:
    """The ``/metrics`` body: jobs by status, queue depth, study times, worker state,
    and with a DICOM node (``node``) its outbox and the studies being received."""
    counts = store.count_by_status()
    stats = worker.stats
    lines = [
        "# HELP ctscreen_jobs Jobs in the store by status.",
        "# TYPE ctscreen_jobs gauge",
        *(f'ctscreen_jobs{{status="{s}"}} {counts[s]}' for s in JOB_STATUSES),
        "# HELP ctscreen_queue_depth Jobs waiting for the worker.",
        "# TYPE ctscreen_queue_depth gauge",
        f"ctscreen_queue_depth {counts[QUEUED]}",
        "# HELP ctscreen_studies_total Result rows written since start, by processing_status.",
        "# TYPE ctscreen_studies_total counter",
        *(f'ctscreen_studies_total{{status="{k}"}} {v}' for k, v in stats.studies.items()),
        "# HELP ctscreen_study_seconds time_of_processing of each study since start.",
        "# TYPE ctscreen_study_seconds histogram",
    ]
    for bound, count in zip(STUDY_SECONDS_BUCKETS, stats.bucket_counts, strict=True):
        lines.append(f'ctscreen_study_seconds_bucket{{le="{bound:g}"}} {count}')
    lines += [
        f'ctscreen_study_seconds_bucket{{le="+Inf"}} {stats.seconds_count}',
        f"ctscreen_study_seconds_sum {stats.seconds_sum:.6f}",
        f"ctscreen_study_seconds_count {stats.seconds_count}",
        "# HELP ctscreen_worker_restarts_total Scoring processes started since start.",
        "# TYPE ctscreen_worker_restarts_total counter",
        f"ctscreen_worker_restarts_total {stats.child_starts}",
        "# HELP ctscreen_job_timeouts_total Jobs stopped by the per-study time limit.",
        "# TYPE ctscreen_job_timeouts_total counter",
        f"ctscreen_job_timeouts_total {stats.timeouts}",
        "# HELP ctscreen_worker_crashes_total Scoring processes that died during a job.",
        "# TYPE ctscreen_worker_crashes_total counter",
        f"ctscreen_worker_crashes_total {stats.crashes}",
        "# HELP ctscreen_model_ready 1 when the model is loaded and the worker alive.",
        "# TYPE ctscreen_model_ready gauge",
        f"ctscreen_model_ready {int(worker.ready)}",
        "# HELP ctscreen_process_resident_bytes Resident memory of the server process.",
        "# TYPE ctscreen_process_resident_bytes gauge",
        f"ctscreen_process_resident_bytes {_resident_bytes()}",
    ]
    if node is not None:
        lines += _dicom_node_metrics(node)
    return "\n".join(lines) + "\n"


def _dicom_node_metrics(node: Any) -> list[str]:
    """The DICOM node's lines of ``/metrics`` (an alert on the oldest pending result
    catches a destination that has been down for too long)."""
    status = node.status(limit=0)
    outbox = dict(status["outbox"])
    oldest = outbox.pop("oldest_pending_seconds")
    return [
        "# HELP ctscreen_dicom_outbox Result files (SR, key images) in the outbox, by state.",
        "# TYPE ctscreen_dicom_outbox gauge",
        *(f'ctscreen_dicom_outbox{{state="{k}"}} {v}' for k, v in outbox.items()),
        "# HELP ctscreen_dicom_outbox_oldest_pending_seconds Age of the oldest unsent result "
        "(0 when none).",
        "# TYPE ctscreen_dicom_outbox_oldest_pending_seconds gauge",
        f"ctscreen_dicom_outbox_oldest_pending_seconds {oldest or 0.0:.1f}",
        "# HELP ctscreen_dicom_incoming_studies Studies being received (not yet stable).",
        "# TYPE ctscreen_dicom_incoming_studies gauge",
        f"ctscreen_dicom_incoming_studies {len(status['incoming'])}",
        "# HELP ctscreen_dicom_studies Received studies (made jobs), by what became of them.",
        "# TYPE ctscreen_dicom_studies gauge",
        *(
            f'ctscreen_dicom_studies{{state="{k}"}} {v}'
            for k, v in status["studies"].items()
            if k != "receiving"
        ),
        "# HELP ctscreen_dicom_unanswered_studies Received studies whose answer (SR, key "
        "images or a 'not screened' SR) is not yet delivered in full: alert when it stays up.",
        "# TYPE ctscreen_dicom_unanswered_studies gauge",
        f"ctscreen_dicom_unanswered_studies {status['studies']['unanswered']}",
        "# HELP ctscreen_dicom_refused_instances Instances refused at C-STORE, by reason.",
        "# TYPE ctscreen_dicom_refused_instances gauge",
        *(
            f'ctscreen_dicom_refused_instances{{reason="{_label(k)}"}} {v}'
            for k, v in status["refused"]["by_reason"].items()
        ),
    ]


def _label(value: str) -> str:
    """A Prometheus label value (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _resident_bytes() -> int:
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
