"""DICOM results of one scored study: a Comprehensive 3D SR and a Secondary Capture series.

What a PACS gets back for each scored study (built with highdicom):

* **SR** (Comprehensive 3D SR, TID 1500 *Imaging Measurement Report*): one
  measurement group (TID 1501) with the probability of pathology as a measurement
  (DCM 122157 *Probability*, unit ``1``) and the decision as a qualitative
  evaluation (DCM 121073 *Impression* = SCT *Abnormal* / *Normal*), both carrying the
  algorithm's name, version, weights hash and threshold; when the study was
  localised, a volumetric ROI group (TID 1411) whose volume surface is the box's
  two axial faces (SCOORD3D polygons, LPS mm) referencing the scored series'
  images inside it. The SR is ``UNVERIFIED`` and its series description, its
  algorithm parameters and a comment say "research use only, not for diagnosis".
* **Secondary Capture** series: the key slices (highest-scoring and one reference
  slice, :func:`ctscreen.html_report.pick_key_slices`) with the activation map
  drawn over them by the HTML report's own renderer, the research-use warning
  burned in and in the header.

Patient and Study modules are copied from the received images. Every value comes
from the :class:`~ctscreen.results.StudyResult` the Screener gave; nothing is
recomputed here except pictures.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from .._version import __version__
from ..dicom.header import StudyHeader, fit_character_set
from ..errors import CtscreenError, InputError
from ..explain import box_in_voxels, slice_scores
from ..results import StudyResult

log = logging.getLogger(__name__)

RESEARCH_NOTE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
MANUFACTURER = "ctscreen (research software)"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "ctscreen result - research use, not for diagnosis"
SC_SERIES_DESCRIPTION = "ctscreen key slices - NOT FOR DIAGNOSIS"

#: The measurement and evaluation concepts of the SR (standard codes only).
PROBABILITY = codes.DCM.Probability
FINDING = codes.DCM.Impression
ABNORMAL = codes.SCT.Abnormal
NORMAL = codes.SCT.Normal
CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
ALGORITHM_NAME = codes.DCM.AlgorithmName
ALGORITHM_VERSION = codes.DCM.AlgorithmVersion
NOT_SCREENED = codes.SCT.Indeterminate
NOT_SCREENED_NOTE = "NOT SCREENED by ctscreen"
NOT_SCREENED_DESCRIPTION = "ctscreen: NOT SCREENED - research use, not for diagnosis"
RESULT_TRACKING = "ctscreen study result"
BOX_TRACKING = "ctscreen localisation box"


class DicomOutputError(CtscreenError):
    """The DICOM results of a study cannot be built (no source images, no result)."""

    code = "DICOM_OUTPUT"


@dataclass(frozen=True)
class Algorithm:
    """What made the result, as written into every SR.

    Attributes:
        name: the algorithm's name.
        version: ctscreen's version.
        weights_sha256: SHA-256 of the checkpoint file.
        threshold: the decision threshold used.
    """

    name: str = "ctscreen"
    version: str = __version__
    weights_sha256: str = ""
    threshold: float = 0.5

    @classmethod
    def from_run_info(cls, run_info: dict[str, Any]) -> Algorithm:
        """From :meth:`ctscreen.Screener.run_info`."""
        return cls(
            version=str(run_info.get("ctscreen_version", __version__)),
            weights_sha256=str(run_info.get("weights_sha256", "")),
            threshold=float(run_info.get("threshold", 0.5)),
        )

    def identification(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=[
                f"weights sha256 {self.weights_sha256}",
                f"threshold {self.threshold:g}",
                RESEARCH_NOTE.lower(),
            ],
        )


@dataclass(frozen=True)
class SrFindings:
    """What an SR built here says, read back with highdicom (:func:`read_sr`).

    Attributes:
        probability: the probability of pathology (None: not screened).
        pathology: 1 for *Abnormal*, 0 for *Normal* (None: not screened).
        box: ``(x_min, x_max, y_min, y_max, z_min, z_max)`` LPS mm, or None.
        algorithm: ``(name, version)`` of the algorithm identification.
        referenced_sop_uids: SOPInstanceUIDs the box's volume surface refers to.
        screened: False for a "not screened" report (impression *Indeterminate*).
        comments: the report's TEXT comments (the reason a study was not screened
            comes first in such a report).
    """

    probability: float | None
    pathology: int | None
    box: tuple[float, ...] | None
    algorithm: tuple[str, str]
    referenced_sop_uids: tuple[str, ...]
    screened: bool = True
    comments: tuple[str, ...] = ()


# --------------------------------------------------------------------------- source headers


def evidence_datasets(header: StudyHeader) -> list[Dataset]:
    """One header-only dataset per scored instance (what the SR's evidence lists), each
    holding only the cleaned Patient/Study values of ``header``."""
    if not header.instances:
        return [header.dataset()]
    return [header.dataset(cls, uid, frames) for cls, uid, frames in header.instances]


def _by_sop_uid(headers: Iterable[Dataset]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in headers}


def header_of(result: StudyResult, fallback: StudyHeader | None = None) -> StudyHeader:
    """The header the results of ``result`` repeat: the one the reader parsed, else
    ``fallback`` (what the DICOM node read when the study arrived).

    Raises:
        DicomOutputError: neither is known (no DICOM header of the study was read).
    """
    header = result.header or fallback
    if header is None or not header.study_uid:
        raise DicomOutputError(
            f"{result.location}: no DICOM header of the study was read, so no result can "
            "be joined to it."
        )
    return header


# --------------------------------------------------------------------------- the SR


def box_faces(box: Sequence[float]) -> list[np.ndarray]:
    """The box's two axial faces (z_min, then z_max) as closed SCOORD3D polygons ``[5, 3]``."""
    x0, x1, y0, y1, z0, z1 = (float(v) for v in box)
    faces = []
    for z in (z0, z1):
        faces.append(
            np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z], [x0, y0, z]], dtype=float)
        )
    return faces


def _slices_in_box(result: StudyResult) -> list[int]:
    """Canonical slice indices whose centre lies inside the box's z range."""
    assert result.box is not None and result.geometry is not None
    (d_lo, d_hi) = box_in_voxels(result.box, result.geometry)[0]
    first = max(int(np.ceil(d_lo)), 0)
    last = min(int(np.floor(d_hi)), result.geometry.shape[0] - 1)
    if last < first:  # a box thinner than one slice: its nearest slice
        first = last = int(np.clip(round((d_lo + d_hi) / 2), 0, result.geometry.shape[0] - 1))
    return list(range(first, last + 1))


def _source_images_for(
    result: StudyResult, indices: Sequence[int], headers: dict[str, Dataset]
) -> list[hd.sr.SourceImageForSegmentation]:
    frames: dict[str, list[int]] = {}
    for i in indices:
        ref = result.slices[i]
        frames.setdefault(ref.sop_instance_uid, [])
        if ref.frame is not None:
            frames[ref.sop_instance_uid].append(int(ref.frame))
    images = []
    for uid, numbers in frames.items():
        ds = headers.get(uid)
        if ds is None:
            continue
        images.append(
            hd.sr.SourceImageForSegmentation.from_source_image(
                ds, referenced_frame_numbers=sorted(numbers) or None
            )
        )
    return images


def _observer(algorithm: Algorithm) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(),
            name=algorithm.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{algorithm.name} {algorithm.version}",
            serial_number=algorithm.weights_sha256[:64] or None,
        ),
    )


def build_sr(
    result: StudyResult,
    algorithm: Algorithm,
    *,
    header: StudyHeader | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    previous: Sequence[Dataset] = (),
) -> Dataset:
    """The Comprehensive 3D SR of one scored study (see the module docstring).

    Args:
        result: a successful result of the Screener.
        algorithm: what made the result.
        header: the study's header when the result carries none (:func:`header_of`).
        series_uid: SeriesInstanceUID of the SR (new when None).
        instance_number: InstanceNumber of the SR.
        previous: earlier SRs of the study that this one supersedes (their headers).

    Raises:
        DicomOutputError: the result is a failure, or no header of the study is known.
    """
    if not result.ok or result.probability is None or result.pathology is None:
        raise DicomOutputError(f"{result.location} was not scored ({result.error}); no SR.")
    study = header_of(result, header)
    headers = evidence_datasets(study)
    by_uid = _by_sop_uid(headers)
    algorithm_id = algorithm.identification()
    observer = _observer(algorithm)
    decision = ABNORMAL if result.pathology else NORMAL
    groups: list[Any] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=RESULT_TRACKING),
            algorithm_id=algorithm_id,
            finding_sites=[hd.sr.FindingSite(codes.SCT.Chest)],
            measurements=[
                hd.sr.Measurement(
                    name=PROBABILITY,
                    value=float(result.probability),
                    unit=codes.UCUM.NoUnits,
                    algorithm_id=algorithm_id,
                )
            ],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING, decision)],
        )
    ]
    if result.box is not None and result.geometry is not None:
        frame_uid = study.get("FrameOfReferenceUID")
        sources = _source_images_for(result, _slices_in_box(result), by_uid)
        if frame_uid and sources:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=hd.UID(), identifier=BOX_TRACKING
                    ),
                    referenced_volume_surface=hd.sr.VolumeSurface(
                        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                        graphic_data=box_faces(result.box),
                        frame_of_reference_uid=frame_uid,
                        source_images=sources,
                    ),
                    finding_type=ABNORMAL,
                    algorithm_id=algorithm_id,
                    finding_sites=[hd.sr.FindingSite(codes.SCT.Chest)],
                )
            )
        else:
            log.warning("%s: no frame of reference or source images; box left out", result.location)
    return _report_sr(
        groups,
        algorithm,
        headers,
        observer=observer,
        complete=True,
        description=SR_SERIES_DESCRIPTION,
        comments=(RESEARCH_NOTE, *result.warnings, *study.warnings),
        series_uid=series_uid,
        instance_number=instance_number,
        previous=previous,
    )


def _report_sr(
    groups: Sequence[Any],
    algorithm: Algorithm,
    evidence: Sequence[Dataset],
    *,
    complete: bool,
    description: str,
    comments: Sequence[str],
    observer: hd.sr.ObserverContext | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    previous: Sequence[Dataset] = (),
) -> Dataset:
    """The Comprehensive 3D SR (TID 1500) holding ``groups``, with the comments, the
    predecessors and the character set every ctscreen report gets."""
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=observer or _observer(algorithm)
        ),
        procedure_reported=CT_CHEST,
        imaging_measurements=list(groups),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report[0],
        series_instance_uid=series_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=complete,
        is_final=False,
        is_verified=False,
        series_description=description,
        previous_versions=list(previous) or None,
    )
    _add_comments(sr, comments)
    fit_character_set(sr)
    return sr


def build_not_screened_sr(
    header: StudyHeader,
    reason: str,
    algorithm: Algorithm,
    *,
    warnings: Sequence[str] = (),
    series_uid: str | None = None,
    previous: Sequence[Dataset] = (),
) -> Dataset:
    """The SR of a study ctscreen received but could not screen: no probability, the
    impression *Indeterminate* (SCT 82334004) and the reason in words, marked PARTIAL.

    A PACS user opening the study sees that it was not screened and why, instead of
    nothing (which reads as "screened, nothing found" to no one, and as "lost" to all).

    Args:
        header: the study's header (cleaned values, the instances it refers to).
        reason: one sentence saying why the study was not screened.
        algorithm: what tried.
        warnings: further sentences for the report's comments.
        series_uid: SeriesInstanceUID of the SR (new when None).
        previous: earlier SRs of the study that this one supersedes (their headers).
    """
    algorithm_id = algorithm.identification()
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=RESULT_TRACKING),
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Chest)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING, NOT_SCREENED)],
    )
    return _report_sr(
        [group],
        algorithm,
        evidence_datasets(header),
        complete=False,
        description=NOT_SCREENED_DESCRIPTION,
        comments=(f"{NOT_SCREENED_NOTE}: {reason}", RESEARCH_NOTE, *warnings, *header.warnings),
        series_uid=series_uid,
        previous=previous,
    )


def _add_comments(sr: Dataset, texts: Sequence[str]) -> None:
    """Append TEXT *Comment* items (research note, warnings) to the report's root container."""
    for text in texts:
        item = hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=text[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        sr.ContentSequence.append(item)


# --------------------------------------------------------------------------- the SC series


def _png_to_rgb(data: bytes) -> np.ndarray:
    from matplotlib import image as mpimg

    rgba = mpimg.imread(io.BytesIO(data), format="png")
    rgb = rgba[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def build_key_images(
    result: StudyResult,
    *,
    window: tuple[float, float],
    header: StudyHeader | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """Secondary Capture images of the key slices with the activation map (RGB, burned-in
    research-use warning), one per key slice, drawn by the HTML report's renderer.

    Args:
        result: a successful result with its activation map and network input
            (``Screener.score(..., keep_image=True)``).
        window: ``(level, width)`` in HU of the network input.
        header: the study's header when the result carries none (:func:`header_of`).
        series_uid: SeriesInstanceUID of the SC series (new when None).

    Raises:
        DicomOutputError: the result has no activation map or network input, or no
            header of the study is known.
    """
    from ..html_report import pick_key_slices, render_strip

    if not result.ok or result.cam is None or result.image is None or result.geometry is None:
        raise DicomOutputError(
            f"{result.location} has no activation map or network input; no key images."
        )
    assert result.bias is not None
    study = header_of(result, header)
    headers = evidence_datasets(study)
    by_uid = _by_sop_uid(headers)
    scores = slice_scores(result.cam, result.bias, result.geometry.shape[0])
    input_scores = slice_scores(result.cam, result.bias, result.image.shape[0])
    keys = pick_key_slices(input_scores, scores)
    box_voxels = None if result.box is None else box_in_voxels(result.box, result.geometry)
    series_uid = series_uid or hd.UID()
    images = []
    for number, key in enumerate(keys, start=1):
        ref = result.slices[key.slice_index]
        source = by_uid.get(ref.sop_instance_uid, headers[0])
        png = render_strip(
            result, [key], box_voxels=box_voxels, window=window, note=RESEARCH_NOTE, panel=5.0
        )
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=_png_to_rgb(png),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=number,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "P"),
            series_description=SC_SERIES_DESCRIPTION,
        )
        sc.BurnedInAnnotation = "YES"
        # The chest is not a paired structure: with BodyPartExamined, Laterality stays absent.
        sc.BodyPartExamined = study.get("BodyPartExamined") or "CHEST"
        sc.ImageComments = (
            f"{RESEARCH_NOTE}. Activation map of ctscreen over slice {key.slice_index} "
            f"(score {key.score:.3f}); study probability {result.probability:.4f}."
        )
        sc.DerivationDescription = "Key slice with the model's class activation map overlaid"
        item = Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        if ref.frame is not None:
            item.ReferencedFrameNumber = int(ref.frame)
        sc.SourceImageSequence = [item]
        fit_character_set(sc)
        images.append(sc)
    return images


# --------------------------------------------------------------------------- reading back


def _text_value(item: Dataset, concept: Any) -> str:
    """The value of the first TEXT item named ``concept`` below ``item`` ("" when none)."""
    wanted = (concept.value, concept.scheme_designator)
    for child in item.get("ContentSequence", []):
        code = child.ConceptNameCodeSequence[0]
        if (code.CodeValue, code.CodingSchemeDesignator) == wanted:
            return str(child.get("TextValue", ""))
        found = _text_value(child, concept)
        if found:
            return found
    return ""


def read_sr(ds: Dataset) -> SrFindings:
    """Read an SR built by :func:`build_sr` back with highdicom.

    Raises:
        InputError: ``ds`` is not such an SR.
    """
    try:
        content = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    except (ValueError, AttributeError, TypeError) as exc:
        raise InputError(f"not a ctscreen measurement report: {exc}") from exc
    probability = pathology = None
    screened = True
    name = version = ""
    for group in content.get_image_measurement_groups():
        if group.tracking_identifier != RESULT_TRACKING:
            continue
        for measurement in group.get_measurements(name=PROBABILITY):
            probability = float(measurement.value)
            name = _text_value(measurement[0], ALGORITHM_NAME)
            version = _text_value(measurement[0], ALGORITHM_VERSION)
        for evaluation in group.get_qualitative_evaluations(name=FINDING):
            if evaluation.value == NOT_SCREENED:
                screened = False
            else:
                pathology = int(evaluation.value == ABNORMAL)
        if not name:
            name = _text_value(group[0], ALGORITHM_NAME)
            version = _text_value(group[0], ALGORITHM_VERSION)
    box = None
    referenced: tuple[str, ...] = ()
    for group in content.get_volumetric_roi_measurement_groups():
        surface = group.roi
        if group.tracking_identifier != BOX_TRACKING or surface is None:
            continue
        data = surface.graphic_data
        points = np.concatenate(data if isinstance(data, list) else [data], axis=0)
        mins, maxs = points.min(axis=0), points.max(axis=0)
        box = tuple(float(v) for pair in zip(mins, maxs, strict=True) for v in pair)
        referenced = tuple(
            str(item.referenced_sop_instance_uid) for item in surface.source_images_for_segmentation
        )
    if screened and (probability is None or pathology is None):
        raise InputError("the SR holds no ctscreen probability or finding.")
    comments = tuple(
        str(item.TextValue)
        for item in ds.get("ContentSequence", [])
        if item.get("ValueType") == "TEXT"
        and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Comment.value
    )
    return SrFindings(
        probability=probability,
        pathology=pathology,
        box=box,
        algorithm=(name, version),
        referenced_sop_uids=referenced,
        screened=screened,
        comments=comments,
    )


# ------------------------------------------------------------------ one study's answer


def study_answer(
    result: StudyResult,
    algorithm: Algorithm,
    *,
    window: tuple[float, float],
    fallback: StudyHeader | None = None,
    previous: Sequence[Dataset] = (),
) -> tuple[list[Dataset], str]:
    """Every DICOM object that answers one study, and the reason it is not the full answer.

    A scored study gets its SR and (with its activation map) key images; a study that
    was not scored, or whose SR or key images cannot be built, gets a "not screened"
    SR saying why (:func:`build_not_screened_sr`). Either SR names ``previous``, the
    earlier SRs of the study, as the answers it supersedes. The second value is "" for a full
    answer, else the sentence saying what went wrong.

    Raises:
        DicomOutputError: no header of the study is known at all (nothing can join it).
    """
    header = header_of(result, fallback)
    if result.ok:
        try:
            datasets = [build_sr(result, algorithm, header=header, previous=previous)]
            if result.cam is not None and result.image is not None:
                datasets += build_key_images(result, window=window, header=header)
            return datasets, ""
        except (CtscreenError, ValueError, TypeError, AttributeError, KeyError) as exc:
            # highdicom raises ValueError/TypeError/AttributeError on values it cannot use
            message = (
                exc.message if isinstance(exc, CtscreenError) else f"{type(exc).__name__}: {exc}"
            )
            problem = f"the scored results could not be built ({message})"
            log.error("%s: %s; sending a 'not screened' report", result.location, problem)
            reason = (
                f"ctscreen scored this study (probability {result.probability:.4f}) but could "
                f"not write its report: {message}"
            )
    else:
        problem = f"not screened: {result.error}"
        reason = result.error
    try:
        sr = build_not_screened_sr(
            header, reason, algorithm, warnings=result.warnings, previous=previous
        )
        return [sr], problem
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise DicomOutputError(
            f"{result.location}: not even a 'not screened' report can be built ({exc})."
        ) from exc


# ------------------------------------------------------------------ per job (scoring child)

#: File in a job's folder that makes it a DICOM node job (written by the node).
NODE_JOB_FILE = "dicom-node.json"
#: Folder in a job's folder where its DICOM results are written for the outbox.
OUT_DIR = "dicom-out"
#: Beside the results: one JSON line per study whose answer is not the full one.
PROBLEMS_FILE = "problems.jsonl"


@dataclass(frozen=True)
class NodeJob:
    """What the DICOM node knows about a study it made into a job.

    Attributes:
        study_uid: StudyInstanceUID of the received study.
        calling_ae: the AE title that sent it.
        warnings: sentences every row of the job carries (an aborted association).
        header: the cleaned header of the first instance received (what a "not
            screened" report repeats when the reader could not parse the study).
        previous: the SR files of earlier answers to the same study (a series came
            after it was answered): the new SR names them as its predecessors.
    """

    study_uid: str
    calling_ae: str
    warnings: tuple[str, ...] = ()
    header: StudyHeader | None = None
    previous: tuple[str, ...] = ()

    def write(self, job_dir: Path) -> None:
        """Store this record in ``job_dir`` (atomically)."""
        from ..fileio import write_text_atomic

        write_text_atomic(
            job_dir / NODE_JOB_FILE,
            json.dumps(
                {
                    "study_uid": self.study_uid,
                    "calling_ae": self.calling_ae,
                    "warnings": list(self.warnings),
                    "header": None if self.header is None else self.header.to_json(),
                    "previous": list(self.previous),
                }
            ),
        )

    @classmethod
    def read(cls, job_dir: Path) -> NodeJob | None:
        """The record of a node job, or None for a job that did not come from the node."""
        try:
            data = json.loads((job_dir / NODE_JOB_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable %s in %s: %s", NODE_JOB_FILE, job_dir, exc)
            return None
        header = data.get("header")
        return cls(
            study_uid=str(data.get("study_uid", "")),
            calling_ae=str(data.get("calling_ae", "")),
            warnings=tuple(str(w) for w in data.get("warnings", ())),
            header=StudyHeader.from_json(header) if isinstance(header, dict) else None,
            previous=tuple(str(p) for p in data.get("previous") or ()),
        )


@dataclass(frozen=True)
class AnswerProblem:
    """Why one study's answer is not the full one (the outbox shows it as a failed item).

    Attributes:
        study_uid: the study.
        reason: one sentence.
        answered: a "not screened" report was still written for it.
    """

    study_uid: str
    reason: str
    answered: bool


def read_problems(job_dir: Path) -> list[AnswerProblem]:
    """The problems :class:`JobOutputs` recorded for a job (none when the file is absent)."""
    path = job_dir / OUT_DIR / PROBLEMS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    problems = []
    for line in lines:
        try:
            data = json.loads(line)
            problems.append(
                AnswerProblem(str(data["study_uid"]), str(data["reason"]), bool(data["answered"]))
            )
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash
    return problems


class JobOutputs:
    """Builds and writes the DICOM answer of a node job, study by study, in the scoring
    child (where the activation map and the network input are at hand).

    Every study gets an answer (:func:`study_answer`); one that is not the full answer
    is recorded in ``<OUT_DIR>/problems.jsonl`` for the outbox to show. Nothing here
    raises into the job: the rows matter most.
    """

    def __init__(
        self,
        job_dir: Path,
        node_job: NodeJob,
        *,
        run_info: dict[str, Any],
        window: tuple[float, float],
    ) -> None:
        self.out_dir = job_dir / OUT_DIR
        self.node_job = node_job
        self.algorithm = Algorithm.from_run_info(run_info)
        self.window = window
        self.previous = read_reports(node_job.previous)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for old in [*self.out_dir.glob("[0-9]*.dcm"), self.out_dir / PROBLEMS_FILE]:
            old.unlink(missing_ok=True)  # an earlier, interrupted attempt
        self._count = 0

    @classmethod
    def for_job(
        cls, job_dir: Path, *, run_info: dict[str, Any], window: tuple[float, float]
    ) -> JobOutputs | None:
        """The writer of a node job's results, or None for a job not from the node."""
        node_job = NodeJob.read(job_dir)
        if node_job is None:
            return None
        try:
            return cls(job_dir, node_job, run_info=run_info, window=window)
        except OSError as exc:  # the rows matter more than the DICOM results
            log.error("job folder %s cannot hold DICOM results (%s); none are built", job_dir, exc)
            return None

    def annotate(self, result: StudyResult) -> StudyResult:
        """The result with the node's warnings about the study (e.g. missing slices) added."""
        if not self.node_job.warnings:
            return result
        return replace(result, warnings=(*result.warnings, *self.node_job.warnings))

    def add(self, result: StudyResult) -> list[Path]:
        """Build and write the answer to one result; returns the files written."""
        study_uid = result.study_uid or self.node_job.study_uid
        written: list[Path] = []
        try:
            datasets, problem = study_answer(
                result,
                self.algorithm,
                window=self.window,
                fallback=self.node_job.header,
                previous=self.previous,
            )
            for ds in datasets:
                self._count += 1
                path = self.out_dir / f"{self._count:04d}.dcm"
                save_dataset(ds, path)
                written.append(path)
        except (CtscreenError, ValueError, TypeError, AttributeError, OSError) as exc:
            message = exc.message if isinstance(exc, CtscreenError) else f"{exc}"
            problem = f"no DICOM answer could be written ({message})"
            log.error("no DICOM results for %s: %s", result.location, message)
        if problem:
            self.record(AnswerProblem(study_uid, problem, answered=bool(written)))
        return written

    def record(self, problem: AnswerProblem) -> None:
        """Append ``problem`` to the job's problem list (a full disk only logs it)."""
        line = json.dumps(
            {"study_uid": problem.study_uid, "reason": problem.reason, "answered": problem.answered}
        )
        try:
            with (self.out_dir / PROBLEMS_FILE).open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            log.error("cannot record the problem of %s (%s): %s", problem.study_uid, exc, line)


def read_reports(paths: Sequence[str]) -> list[Dataset]:
    """The headers of earlier SR files (those that cannot be read are left out)."""
    reports = []
    for path in paths:
        try:
            reports.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.warning("earlier report %s cannot be read (%s); not referenced", path, exc)
    return reports


def save_dataset(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file at ``path`` (atomically)."""
    from ..fileio import write_atomic

    write_atomic(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
