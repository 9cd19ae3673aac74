"""``/api/v1/dicom``: the DICOM node's studies, refusals and outbox; sending again now."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from .. import page
from ..audit import RETRY
from ..context import Context
from ..roles import OPERATOR, VIEWER, require

router = APIRouter()


@router.get(
    "/api/v1/dicom",
    summary="The DICOM node: studies received and answered, the outbox",
    dependencies=[Depends(require(VIEWER))],
)
def dicom_status(ctx: Context, limit: int = 100) -> dict[str, Any]:
    return ctx.dicom_node().status(limit=max(1, min(limit, 1000)))


@router.post(
    "/api/v1/dicom/outbox/retry",
    summary="Send every pending result now",
    dependencies=[Depends(require(OPERATOR))],
)
def dicom_retry(ctx: Context) -> dict[str, int]:
    rescheduled = ctx.dicom_node().retry_now()
    ctx.record(RETRY, detail=f"{rescheduled} pending")
    return {"rescheduled": rescheduled}


@router.get("/ui/dicom", include_in_schema=False, dependencies=[Depends(require(VIEWER))])
def dicom_panel(request: Request, ctx: Context) -> HTMLResponse:
    status = ctx.dicom_node().status(limit=20)  # 404 when the node is off
    return HTMLResponse(page.dicom_panel(status, page.request_language(request)))
