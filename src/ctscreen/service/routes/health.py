"""Health checks, ``/metrics`` and the API's own documentation page."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from ..context import Context
from ..metrics import prometheus_text
from ..roles import PUBLIC, VIEWER, require

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/healthz", summary="The process answers", dependencies=[Depends(require(PUBLIC))])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Model loaded, worker alive, store writable",
    dependencies=[Depends(require(PUBLIC))],
)
def readyz(ctx: Context) -> JSONResponse:
    worker = ctx.worker
    checks = {"model_loaded": worker.ready, "worker_alive": worker.alive}
    try:
        ctx.store.check_writable()
        checks["store_writable"] = True
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        log.warning("store not writable: %s", exc)
        checks["store_writable"] = False
    ok = all(checks.values())
    body: dict[str, Any] = {"status": "ready" if ok else "not ready", **checks}
    if worker.fatal:
        body["error"] = worker.fatal
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(require(VIEWER))],
)
def metrics(ctx: Context) -> PlainTextResponse:
    return PlainTextResponse(
        prometheus_text(ctx.store, ctx.worker, ctx.node),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


@router.get("/docs", include_in_schema=False, dependencies=[Depends(require(VIEWER))])
def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="ctscreen API",
        swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger-ui/swagger-ui.css",
        swagger_favicon_url="/static/swagger-ui/favicon.png",
    )
