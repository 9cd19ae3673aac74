"""Score a study already in an archive over DICOMweb (dicomweb-client), store results back.

QIDO-RS finds the study's series, WADO-RS retrieves its CT series into a
temporary folder, the :class:`~ctscreen.Screener` scores it, and STOW-RS stores the
same SR and key images the DICOM node sends (:mod:`ctscreen.outputs.dicom`)
into the study. For sites that prefer HTTP to DIMSE.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from ..errors import CtscreenError, InputError
from ..outputs.dicom import Algorithm, study_answer
from ..results import StudyResult

log = logging.getLogger(__name__)

#: Series of these modalities are retrieved (the Screener chooses among them).
RETRIEVED_MODALITIES = frozenset({"CT"})
_MODALITY = "00080060"
_SERIES_UID = "0020000E"


class DicomWebError(CtscreenError):
    """The DICOMweb server cannot be reached, or answers with an error."""

    code = "DICOMWEB"


@dataclass(frozen=True)
class WebOutcome:
    """What scoring one archived study gave.

    Attributes:
        result: the Screener's result (without its large arrays).
        stored: SOPInstanceUIDs of the results stored back (empty when not stored).
    """

    result: StudyResult
    stored: tuple[str, ...]


def make_client(url: str, *, token: str = "", timeout: float = 60.0) -> DICOMwebClient:
    """A DICOMweb client for ``url`` (e.g. ``http://pacs:8042/dicom-web``), with a bearer
    token when given."""
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout)


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def retrieve_study(client: DICOMwebClient, study_uid: str, folder: Path) -> int:
    """Retrieve the study's CT series into ``folder``; returns the instances written.

    Raises:
        InputError: the archive has no such study, or no CT series in it.
        DicomWebError: the server cannot be reached or answers with an error.
    """
    try:
        series = client.search_for_series(study_instance_uid=study_uid)
    except (requests.RequestException, OSError) as exc:
        raise DicomWebError(f"QIDO-RS for study {study_uid} failed: {exc}") from exc
    if not series:
        raise InputError(f"the archive has no study {study_uid}; check the StudyInstanceUID.")
    wanted = [s for s in series if _value(s, _MODALITY) in RETRIEVED_MODALITIES]
    if not wanted:
        found = sorted({_value(s, _MODALITY) for s in series})
        raise InputError(f"study {study_uid} holds no CT series (modalities: {', '.join(found)}).")
    count = 0
    for item in wanted:
        series_uid = _value(item, _SERIES_UID)
        try:
            instances = client.retrieve_series(study_uid, series_uid)
        except (requests.RequestException, OSError) as exc:
            raise DicomWebError(f"WADO-RS for series {series_uid} failed: {exc}") from exc
        for ds in instances:
            name = hashlib.sha1(str(ds.SOPInstanceUID).encode()).hexdigest() + ".dcm"
            ds.save_as(folder / name, enforce_file_format=True)
            count += 1
    log.info("retrieved %d instances of study %s", count, study_uid)
    return count


def store_results(client: DICOMwebClient, datasets: list[Dataset], study_uid: str) -> None:
    """STOW-RS ``datasets`` into the study.

    Raises:
        DicomWebError: the server refused them.
    """
    try:
        answer = client.store_instances(datasets, study_instance_uid=study_uid)
    except (requests.RequestException, OSError) as exc:
        raise DicomWebError(f"STOW-RS of {len(datasets)} results failed: {exc}") from exc
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        raise DicomWebError(f"STOW-RS refused {len(failed)} of {len(datasets)} results.")


def score_archived_study(
    screener: Any,
    client: DICOMwebClient,
    study_uid: str,
    *,
    store: bool = True,
) -> WebOutcome:
    """Retrieve, score and (``store``) send results back for one study.

    Raises:
        InputError, DicomWebError: as :func:`retrieve_study` and :func:`store_results`.
    """
    with tempfile.TemporaryDirectory(prefix="ctscreen-dicomweb-") as tmp:
        folder = Path(tmp)
        retrieve_study(client, study_uid, folder)
        result = next(iter(screener.score([folder], keep_image=True)))
        stored: tuple[str, ...] = ()
        if store and result.header is not None:
            # a study that was not scored gets its "not screened" report, as from the node
            pre = screener.config
            datasets, problem = study_answer(
                result,
                Algorithm.from_run_info(screener.run_info()),
                window=(pre.window_level, pre.window_width),
            )
            if problem:
                log.warning("study %s: %s", study_uid, problem)
            store_results(client, datasets, study_uid)
            stored = tuple(str(ds.SOPInstanceUID) for ds in datasets)
        return WebOutcome(result=result.without_maps(), stored=stored)
