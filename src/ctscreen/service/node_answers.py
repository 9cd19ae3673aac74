"""What the DICOM node answers for each study: the answer the scoring child wrote, or
one built here, and the values kept from a study's first instance to build it.

A node job whose child wrote nothing (it died, timed out, or could not read the study
at all) still gets a "not screened" SR, built from the cleaned header of the first
instance received (:func:`header_json`), so that no study is left without an answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from ..dicom.header import StudyHeader, read_study_header
from ..errors import CtscreenError
from ..outputs.dicom import (
    OUT_DIR,
    Algorithm,
    NodeJob,
    build_not_screened_sr,
    read_problems,
    read_reports,
    save_dataset,
)
from .node_store import NOT_SCREENED, SCREENED
from .sender import JobAnswer
from .store import JobStore

log = logging.getLogger(__name__)


def missing_instances(folder: Path) -> str:
    """A sentence naming the InstanceNumbers missing inside each series of ``folder``
    (gaps between the lowest and highest received), "" when there are none."""
    numbers: dict[str, set[int]] = {}
    for path in folder.iterdir():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        number = ds.get("InstanceNumber")
        if number is None or str(number) == "":
            continue
        numbers.setdefault(str(ds.get("SeriesInstanceUID", "?")), set()).add(int(number))
    parts = []
    for series, present in sorted(numbers.items()):
        low, high = min(present), max(present)
        missing = sorted(set(range(low, high + 1)) - present)
        received = f"{len(present)} received ({low}-{high})"
        if missing:
            parts.append(
                f"series {series}: instance numbers {_ranges(missing)} missing, {received}, "
                f"and any after {high}"
            )
        else:
            parts.append(f"series {series}: {received}; any after {high} may be missing")
    return "; ".join(parts)


def _ranges(values: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` as ``1-3, 7, 9-10``."""
    out: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


def result_files(jobs: JobStore, job_id: str) -> list[Path]:
    """The result files the scoring child wrote for a job, in order."""
    folder = jobs.job_dir(job_id) / OUT_DIR
    if not folder.is_dir():
        return []
    return sorted(folder.glob("[0-9]*.dcm"))


def earlier_reports(jobs: JobStore, job_id: str) -> list[Path]:
    """The SR files a node job answered with (its key images are not reports)."""
    reports = []
    for path in result_files(jobs, job_id):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if str(ds.get("Modality", "")) == "SR":
            reports.append(path)
    return reports


def job_answer(jobs: JobStore, job_id: str, run_info: dict[str, Any]) -> JobAnswer:
    """The answer of an ended node job: what the scoring child wrote, or, when it wrote
    nothing (it died, timed out, or the job was deleted), a "not screened" SR built
    here from the header kept when the study arrived."""
    job_dir = jobs.job_dir(job_id)
    rows = jobs.rows(job_id)
    failures = [r.error for r in rows if r.processing_status != "Success" and r.error]
    job = jobs.get(job_id)
    reason = failures[0] if failures else (job.message if job is not None and job.message else "")
    outcome = SCREENED if any(r.processing_status == "Success" for r in rows) else NOT_SCREENED
    if outcome == NOT_SCREENED and not reason:
        reason = "the scoring ended without a result for this study; see the server log"
    problems = [p.reason for p in read_problems(job_dir)]
    paths = result_files(jobs, job_id)
    if not paths:
        why = reason or "the scoring child wrote no answer"
        path = _not_screened(jobs, job_id, why, run_info)
        paths = [path] if path is not None else []
        if path is None:
            problems.append(f"no answer could be built for this study: {why}")
        elif not problems:
            problems.append(f"not screened: {why}")
    return JobAnswer(
        paths=paths,
        outcome=outcome,
        reason="" if outcome == SCREENED else reason,
        problems=problems,
    )


def _not_screened(
    jobs: JobStore, job_id: str, reason: str, run_info: dict[str, Any]
) -> Path | None:
    """Write a "not screened" SR for a node job from the header kept at receipt."""
    job_dir = jobs.job_dir(job_id)
    node_job = NodeJob.read(job_dir)
    if node_job is None or node_job.header is None:
        log.error("job %s: no header kept for its study; it cannot be answered", job_id)
        return None
    try:
        sr = build_not_screened_sr(
            node_job.header,
            reason,
            Algorithm.from_run_info(run_info),
            warnings=node_job.warnings,
            previous=read_reports(node_job.previous),
        )
        path = job_dir / OUT_DIR / "0001.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_dataset(sr, path)
    except (CtscreenError, ValueError, TypeError, AttributeError, OSError) as exc:
        log.error("job %s: the 'not screened' report cannot be built: %s", job_id, exc)
        return None
    return path


def header_from_json(text: str) -> StudyHeader | None:
    """The header kept at receipt (None when none was, or it cannot be read)."""
    if not text:
        return None
    try:
        return StudyHeader.from_json(json.loads(text))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        log.error("the header kept for a study cannot be read (%s); it is scored without", exc)
        return None


def header_json(ds: Any, sop_class: str) -> str:
    """The cleaned header of a received instance, as JSON for the node's table."""
    try:
        header = read_study_header(ds)
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except Exception:  # noqa: BLE001 - the header only helps answer; never refuse for it
        log.exception("cannot keep the header of a received instance")
        return ""
    instance = ((sop_class, str(ds.get("SOPInstanceUID", "")), int(ds.get("NumberOfFrames") or 1)),)
    series = str(ds.get("SeriesInstanceUID", ""))
    return json.dumps(header.with_instances(series, instance, rows=rows, columns=columns).to_json())


__all__ = [
    "earlier_reports",
    "header_from_json",
    "header_json",
    "job_answer",
    "missing_instances",
]
