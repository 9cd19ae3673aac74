"""``/api/v1/audit``: the audit trail, for admins, as JSON or CSV."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from ..audit import COLUMNS, entries_csv, entries_json
from ..context import Context
from ..roles import ADMIN, require

router = APIRouter()


@router.get(
    "/api/v1/audit",
    summary="The audit trail: who did what, when, from where (oldest first)",
    dependencies=[Depends(require(ADMIN))],
    response_model=None,
)
def audit_trail(
    ctx: Context, format: str = "json", limit: int = 1000, since: float = 0.0
) -> dict[str, Any] | Response:
    entries = ctx.audit.entries(limit=max(1, min(limit, 100_000)), since=since)
    if format == "csv":
        return Response(
            entries_csv(entries),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="ctscreen-audit.csv"'},
        )
    if format != "json":
        raise HTTPException(422, "format must be json or csv.")
    return {"columns": list(COLUMNS), "entries": entries_json(entries)}
