"""``/api/v1/jobs`` and ``/api/v1/results``: upload studies, follow jobs, fetch tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from ...report import OUTPUT_FORMATS, ResultRow, rows_to_frame, write_table
from ..audit import DELETE, DOWNLOAD, UPLOAD
from ..context import Context, ServiceContext
from ..roles import ADMIN, OPERATOR, VIEWER, require
from ..store import QUEUED, RUNNING, Job, new_job_id
from ..uploads import UPLOAD_MODES, receive_upload

router = APIRouter()

_MEDIA = {
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "parquet": "application/vnd.apache.parquet",
}
_UPLOAD_SCHEMA = {
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
}


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
        "uploads_removed": job.uploads_removed,
        "expired": job.expired,
        "progress": {
            "inputs": len(job.inputs),
            "inputs_done": job.inputs_done,
            "studies_done": job.rows_done,
            "failures": job.failures,
        },
        "inputs": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in job.inputs],
        "rows": None if rows is None else _frame_records(rows),
    }


def table_response(
    ctx: ServiceContext, rows: list[ResultRow], folder: Path, stem: str, fmt: str
) -> Response:
    """The rows as a table file of format ``fmt`` (404 for an unknown format)."""
    if fmt not in OUTPUT_FORMATS:
        raise HTTPException(404, f"unknown table format {fmt!r}; use {', '.join(OUTPUT_FORMATS)}.")
    folder.mkdir(parents=True, exist_ok=True)
    path = write_table(rows_to_frame(rows), folder / f"{stem}.{fmt}", run_info=ctx.run_info())
    return FileResponse(path, media_type=_MEDIA[fmt], filename=path.name)


@router.post(
    "/api/v1/jobs",
    status_code=202,
    openapi_extra=_UPLOAD_SCHEMA,
    summary="Upload studies and queue a scoring job",
    dependencies=[Depends(require(OPERATOR))],
)
async def create_job(request: Request, ctx: Context) -> JSONResponse:
    settings, store = ctx.settings, ctx.store
    counts = store.count_by_status()
    if counts[QUEUED] + counts[RUNNING] >= settings.max_active_jobs:
        raise HTTPException(
            429,
            f"{settings.max_active_jobs} jobs are already waiting or running, the limit of "
            "this server; try again when some have finished.",
            headers={"Retry-After": "30"},
        )
    job_id = new_job_id()
    upload = await receive_upload(
        request,
        store,
        job_id,
        max_bytes=settings.max_upload_bytes,
        max_files=settings.max_files,
    )
    store.add_job(job_id, upload.inputs, mode=upload.mode)
    total = sum(f.size for f in upload.inputs)
    ctx.record(UPLOAD, job_id=job_id, detail=f"{len(upload.inputs)} file(s), {total} bytes")
    ctx.worker.wake()
    return JSONResponse(
        {"id": job_id, "status": QUEUED},
        status_code=202,
        headers={"Location": f"/api/v1/jobs/{job_id}"},
    )


@router.get(
    "/api/v1/jobs",
    summary="The newest jobs (without their rows)",
    dependencies=[Depends(require(VIEWER))],
)
def list_jobs(ctx: Context, limit: int = 100) -> dict[str, Any]:
    jobs = ctx.store.list_jobs(limit=max(1, min(limit, 1000)))
    return {"jobs": [job_json(job, None) for job in jobs]}


@router.get(
    "/api/v1/jobs/{job_id}",
    summary="A job's status, progress and rows",
    dependencies=[Depends(require(VIEWER))],
)
def get_job(job_id: str, ctx: Context) -> dict[str, Any]:
    job = ctx.job(job_id)
    return job_json(job, ctx.store.rows(job.id))


@router.get(
    "/api/v1/jobs/{job_id}/result.{fmt}",
    summary="A job's result table",
    dependencies=[Depends(require(VIEWER))],
)
def job_table(job_id: str, fmt: str, ctx: Context) -> Response:
    job = ctx.results_of(job_id)
    if fmt in OUTPUT_FORMATS:
        ctx.record(DOWNLOAD, job_id=job.id, detail=f"result.{fmt}")
    return table_response(ctx, ctx.store.rows(job.id), ctx.store.job_dir(job.id), "result", fmt)


@router.get(
    "/api/v1/results.{fmt}",
    summary="All jobs' rows in one table",
    dependencies=[Depends(require(VIEWER))],
)
def all_results(fmt: str, ctx: Context) -> Response:
    if fmt in OUTPUT_FORMATS:
        ctx.record(DOWNLOAD, detail=f"results.{fmt} (every job)")
    folder = ctx.settings.data_dir / "results"
    return table_response(ctx, ctx.store.all_rows(), folder, "results", fmt)


@router.get(
    "/api/v1/jobs/{job_id}/report",
    summary="A job's HTML report",
    dependencies=[Depends(require(VIEWER))],
)
def job_report(job_id: str, ctx: Context) -> Response:
    job = ctx.results_of(job_id)
    index = ctx.store.job_dir(job.id) / "report" / "index.html"
    if not index.is_file():
        raise HTTPException(
            404,
            f"job {job.id} has no report: it ended before its last study ({job.message}); "
            "its table holds the rows it has.",
        )
    ctx.record(DOWNLOAD, job_id=job.id, detail="report")
    return FileResponse(index, media_type="text/html; charset=utf-8")


@router.delete(
    "/api/v1/jobs/{job_id}",
    summary="Delete a job and its files",
    dependencies=[Depends(require(ADMIN))],
)
def delete_job(job_id: str, ctx: Context) -> dict[str, Any]:
    job = ctx.job(job_id)
    if job.status == RUNNING:
        raise HTTPException(409, f"job {job.id} is being scored; delete it when it is done.")
    ctx.store.delete(job.id)
    ctx.record(DELETE, job_id=job.id)
    return {"id": job.id, "deleted": True}
