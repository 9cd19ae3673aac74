"""``/metrics``: the service's state in Prometheus's text format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .store import JOB_STATUSES, QUEUED, JobStore
from .worker import STUDY_SECONDS_BUCKETS, Worker


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
