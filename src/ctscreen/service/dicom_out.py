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
        probability: the probability of pathology.
        pathology: 1 for *Abnormal*, 0 for *Normal*.
        box: ``(x_min, x_max, y_min, y_max, z_min, z_max)`` LPS mm, or None.
        algorithm: ``(name, version)`` of the algorithm identification.
        referenced_sop_uids: SOPInstanceUIDs the box's volume surface refers to.
    """

    probability: float
    pathology: int
    box: tuple[float, ...] | None
    algorithm: tuple[str, str]
    referenced_sop_uids: tuple[str, ...]


# --------------------------------------------------------------------------- source headers


def read_series_headers(source: Path, series_uid: str) -> list[Dataset]:
    """Headers (no pixels) of the scored series' instances found under ``source``.

    Args:
        source: a DICOM file or a folder searched recursively.
        series_uid: SeriesInstanceUID of the scored series.

    Raises:
        DicomOutputError: no instance of that series lies under ``source``.
    """
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.debug("skipping %s: %s", path, exc)
            continue
        if str(ds.get("SeriesInstanceUID", "")) == series_uid:
            headers.append(ds)
    if not headers:
        raise DicomOutputError(
            f"no image of series {series_uid} under {source}; the results cannot reference it."
        )
    return headers


def _by_sop_uid(headers: Iterable[Dataset]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in headers}


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


def build_sr(
    result: StudyResult,
    headers: Sequence[Dataset],
    algorithm: Algorithm,
    *,
    series_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """The Comprehensive 3D SR of one scored study (see the module docstring).

    Args:
        result: a successful result of the Screener.
        headers: the scored series' headers (:func:`read_series_headers`).
        algorithm: what made the result.
        series_uid: SeriesInstanceUID of the SR (new when None).
        instance_number: InstanceNumber of the SR.

    Raises:
        DicomOutputError: the result is a failure, or has no slice references.
    """
    if not result.ok or result.probability is None or result.pathology is None:
        raise DicomOutputError(f"{result.location} was not scored ({result.error}); no SR.")
    by_uid = _by_sop_uid(headers)
    reference = by_uid.get(result.slices[0].sop_instance_uid) if result.slices else None
    if reference is None:
        reference = headers[0]
    algorithm_id = algorithm.identification()
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(),
            name=algorithm.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{algorithm.name} {algorithm.version}",
            serial_number=algorithm.weights_sha256[:64] or None,
        ),
    )
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
        frame_uid = str(reference.get("FrameOfReferenceUID", ""))
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
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_CHEST,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(headers),
        content=report[0],
        series_instance_uid=series_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
    )
    _add_comments(sr, (RESEARCH_NOTE, *result.warnings))
    return sr


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
    headers: Sequence[Dataset],
    *,
    window: tuple[float, float],
    series_uid: str | None = None,
) -> list[Dataset]:
    """Secondary Capture images of the key slices with the activation map (RGB, burned-in
    research-use warning), one per key slice, drawn by the HTML report's renderer.

    Args:
        result: a successful result with its activation map and network input
            (``Screener.score(..., keep_image=True)``).
        headers: the scored series' headers (:func:`read_series_headers`).
        window: ``(level, width)`` in HU of the network input.
        series_uid: SeriesInstanceUID of the SC series (new when None).

    Raises:
        DicomOutputError: the result has no activation map or network input.
    """
    from ..html_report import pick_key_slices, render_strip

    if not result.ok or result.cam is None or result.image is None or result.geometry is None:
        raise DicomOutputError(
            f"{result.location} has no activation map or network input; no key images."
        )
    assert result.bias is not None
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
        sc.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")
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
    name = version = ""
    for group in content.get_image_measurement_groups():
        if group.tracking_identifier != RESULT_TRACKING:
            continue
        for measurement in group.get_measurements(name=PROBABILITY):
            probability = float(measurement.value)
            name = _text_value(measurement[0], ALGORITHM_NAME)
            version = _text_value(measurement[0], ALGORITHM_VERSION)
        for evaluation in group.get_qualitative_evaluations(name=FINDING):
            pathology = int(evaluation.value == ABNORMAL)
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
    if probability is None or pathology is None:
        raise InputError("the SR holds no ctscreen probability or finding.")
    return SrFindings(
        probability=probability,
        pathology=pathology,
        box=box,
        algorithm=(name, version),
        referenced_sop_uids=referenced,
    )


# ------------------------------------------------------------------ per job (scoring child)

#: File in a job's folder that makes it a DICOM node job (written by the node).
NODE_JOB_FILE = "dicom-node.json"
#: Folder in a job's folder where its DICOM results are written for the outbox.
OUT_DIR = "dicom-out"


@dataclass(frozen=True)
class NodeJob:
    """What the DICOM node knows about a study it made into a job.

    Attributes:
        study_uid: StudyInstanceUID of the received study.
        calling_ae: the AE title that sent it.
        warnings: sentences every row of the job carries (an aborted association).
    """

    study_uid: str
    calling_ae: str
    warnings: tuple[str, ...] = ()

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
        return cls(
            study_uid=str(data.get("study_uid", "")),
            calling_ae=str(data.get("calling_ae", "")),
            warnings=tuple(str(w) for w in data.get("warnings", ())),
        )


class JobOutputs:
    """Builds and writes the DICOM results of a node job, study by study, in the
    scoring child (where the activation map and the network input are at hand).

    A study whose results cannot be built keeps its row; the reason is logged and
    written beside the results (``<OUT_DIR>/errors.txt``), never raised into the job.
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
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for old in self.out_dir.glob("[0-9]*.dcm"):  # an earlier, interrupted attempt
            old.unlink()
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

    def add(self, result: StudyResult, source: Path) -> list[Path]:
        """Build and write the SR and key images of one result; returns the files written."""
        if not result.ok:
            return []
        written: list[Path] = []
        try:
            headers = read_series_headers(source, result.series_uid)
            datasets = [build_sr(result, headers, self.algorithm)]
            if result.cam is not None and result.image is not None:
                datasets += build_key_images(result, headers, window=self.window)
            for ds in datasets:
                self._count += 1
                path = self.out_dir / f"{self._count:04d}.dcm"
                _save(ds, path)
                written.append(path)
        except (CtscreenError, ValueError, TypeError, AttributeError, OSError) as exc:
            # highdicom raises ValueError/TypeError/AttributeError on headers it cannot use
            message = exc.message if isinstance(exc, CtscreenError) else f"{exc}"
            log.error("no DICOM results for %s: %s", result.location, message)
            with (self.out_dir / "errors.txt").open("a", encoding="utf-8") as fh:
                fh.write(f"{result.study_uid}: {message}\n")
        return written


def _save(ds: Dataset, path: Path) -> None:
    from ..fileio import write_atomic

    write_atomic(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
