"""Write a canonical HU array as an honest CT DICOM series.

Geometry follows the DICOM standard, independent of any reader: ``origin`` is the
LPS position of canonical voxel ``[0, 0, 0]`` (the most inferior slice, its most
anterior row, the patient's rightmost column).

* ``HFS``: ImageOrientationPatient ``(1,0,0, 0,1,0)``; rows run anterior ->
  posterior, columns right -> left, so each stored frame is ``hu[k]`` as is.
  Instance numbers start at the head (a cranio-caudal acquisition).
* ``FFS``: ImageOrientationPatient ``(-1,0,0, 0,1,0)``; columns run left -> right,
  so each stored frame is ``hu[k][:, ::-1]`` and its ImagePositionPatient sits on
  the patient's left. Instance numbers start at the feet.

Every UID is derived from the caller's seed and UIDs with
:func:`pydicom.uid.generate_uid` (``entropy_srcs``), and no clock is read, so the
same inputs give byte-identical files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

log = logging.getLogger(__name__)

#: Transfer syntaxes the writer supports.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
_COMPRESSED = {JPEG2000Lossless: "pylibjpeg", RLELossless: "pydicom"}


@dataclass(frozen=True)
class PixelEncoding:
    """How HU values are stored: ``stored = round((hu - intercept) / slope)``."""

    name: str
    dtype: str  # "uint16" or "int16"
    intercept: float
    slope: float = 1.0

    @property
    def pixel_representation(self) -> int:
        return 1 if self.dtype == "int16" else 0


#: Encodings real scanners use; one is picked from the seed unless given.
PIXEL_ENCODINGS: tuple[PixelEncoding, ...] = (
    PixelEncoding("uint16_m1024", "uint16", -1024.0),
    PixelEncoding("int16_m1024", "int16", -1024.0),
    PixelEncoding("int16_0", "int16", 0.0),
)


def uid_from(*parts: object) -> UID:
    """A deterministic UID from any printable parts."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def pick_encoding(seed: int) -> PixelEncoding:
    """The pixel encoding used for ``seed`` when none is asked for."""
    return PIXEL_ENCODINGS[int(seed) % len(PIXEL_ENCODINGS)]


def encode_pixels(hu: np.ndarray, enc: PixelEncoding) -> np.ndarray:
    """HU -> stored values, rounded and clipped to the stored type's range.

    Args:
        hu: float array in HU.
        enc: the pixel encoding.

    Returns:
        An array of dtype ``enc.dtype``.
    """
    info = np.iinfo(enc.dtype)
    stored = np.rint((np.asarray(hu, dtype=np.float64) - enc.intercept) / enc.slope)
    return np.clip(stored, info.min, info.max).astype(enc.dtype)


@dataclass(frozen=True)
class _Plane:
    """Per-slice geometry of the written series (in the order slices are written)."""

    iop: tuple[float, ...]
    positions: list[tuple[float, float, float]]
    frames: list[np.ndarray]  # canonical index k for each written slice, in order
    flip_columns: bool


def _plan_planes(
    hu: np.ndarray, spacing: Sequence[float], origin: Sequence[float], patient_position: str
) -> _Plane:
    d, _h, w = hu.shape
    sd, _sh, sw = (float(s) for s in spacing)
    ox, oy, oz = (float(c) for c in origin)
    if patient_position == "HFS":
        order = list(range(d - 1, -1, -1))  # head first: most superior slice first
        x0 = ox
        iop: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        flip = False
    elif patient_position == "FFS":
        order = list(range(d))  # feet first: most inferior slice first
        x0 = ox + (w - 1) * sw
        iop = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        flip = True
    else:
        raise ValueError(f"patient_position must be 'HFS' or 'FFS', not {patient_position!r}")
    positions = [(x0, oy, oz + k * sd) for k in order]
    frames = [hu[k][:, ::-1] if flip else hu[k] for k in order]
    return _Plane(iop=iop, positions=positions, frames=frames, flip_columns=flip)


def _ds_str(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _study_datetime(seed: int) -> tuple[str, str]:
    day = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(seed) % 1800)
    secs = 7 * 3600 + (int(seed) * 7919) % (11 * 3600)
    return day.strftime("%Y%m%d"), f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}"


def _base_dataset(
    *,
    sop_class: UID,
    sop_uid: UID,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    seed: int,
    series_number: int,
    series_description: str,
    modality: str = "CT",
) -> Dataset:
    date, time = _study_datetime(seed)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.ContentDate = date
    ds.StudyTime = time
    ds.SeriesTime = time
    ds.ContentTime = time
    ds.AccessionNumber = f"A{int(seed) % 10**8:08d}"
    ds.Modality = modality
    ds.Manufacturer = "ctscreen synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
    ds.SeriesDescription = series_description
    ds.PatientName = f"Synthetic^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "MF"[int(seed) % 2]
    ds.PatientAge = f"{40 + int(seed) % 45:03d}Y"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{int(seed) % 10**6}"
    ds.SeriesNumber = int(series_number)
    ds.FrameOfReferenceUID = uid_from(study_uid, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    return ds


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationVersionName = "CTSCREEN_SYNTH"
    return meta


def _set_pixels(ds: Dataset, stored: np.ndarray, enc: PixelEncoding, transfer_syntax: UID) -> None:
    """Attach pixel data, compressing it when the transfer syntax asks for it."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(stored.shape[-2])
    ds.Columns = int(stored.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = enc.pixel_representation
    ds.file_meta = _file_meta(ds, transfer_syntax)
    if transfer_syntax in _COMPRESSED:
        ds.compress(
            transfer_syntax,
            np.ascontiguousarray(stored),
            encoding_plugin=_COMPRESSED[transfer_syntax],
            generate_instance_uid=False,
        )
    elif transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.PixelData = np.ascontiguousarray(stored).astype(f"<{stored.dtype.str[1:]}").tobytes()
        ds["PixelData"].VR = "OW"
    else:
        raise ValueError(
            f"unsupported transfer syntax {transfer_syntax!r}; "
            f"use one of {[str(t) for t in TRANSFER_SYNTAXES]}"
        )


def _file_name(
    sop_uid: str, index: int, *, prefix: str, extensionless: bool, shuffle_names: bool
) -> str:
    if shuffle_names:
        stem = hashlib.sha1(sop_uid.encode()).hexdigest()[:8].upper() + "_anon"
    else:
        stem = f"{prefix}IM{index:05d}"
    return _dcm_name(stem, extensionless)


def _dcm_name(stem: str, extensionless: bool) -> str:
    return stem if extensionless else stem + ".dcm"


def _save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file at ``path``, its folder made when missing.

    Raises:
        OSError: the write failed; it names ``path`` and keeps the cause's errno
            (pydicom re-raises a write error without either).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)
    except OSError as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        raise OSError(cause.errno, cause.strerror or str(exc), str(path)) from exc
    return path


def write_series(
    hu: np.ndarray,
    *,
    spacing: Sequence[float],
    out_dir: Path,
    study_uid: str,
    series_uid: str,
    patient_position: str = "HFS",
    transfer_syntax: UID = ExplicitVRLittleEndian,
    multiframe: bool = False,
    extensionless: bool = False,
    shuffle_names: bool = False,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    series_number: int = 2,
    series_description: str = "Thorax 1.0 B70f",
    slice_thickness: float | None = None,
    patient_id: str = "SYNTH0000",
    seed: int = 0,
    pixel_encoding: PixelEncoding | None = None,
    name_prefix: str = "",
) -> list[Path]:
    """Write a canonical HU volume as a CT series.

    Args:
        hu: float array ``[D, H, W]`` in the canonical orientation of :mod:`ctscreen.volume`.
        spacing: voxel size in mm along (D, H, W).
        out_dir: folder to write into (created if missing).
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        patient_position: ``"HFS"`` or ``"FFS"`` (see the module docstring).
        transfer_syntax: one of :data:`TRANSFER_SYNTAXES`.
        multiframe: write one Enhanced CT Image Storage file instead of one file per slice.
        extensionless: leave ``.dcm`` off file names.
        shuffle_names: name files by a hash of their SOPInstanceUID, so that the
            alphabetical file order says nothing about slice order.
        origin: LPS mm of canonical voxel ``[0, 0, 0]``.
        series_number: SeriesNumber.
        series_description: SeriesDescription.
        slice_thickness: SliceThickness in mm (default: the slice spacing).
        patient_id: PatientID.
        seed: feeds dates, UIDs and the default pixel encoding.
        pixel_encoding: stored type and rescale (default: :func:`pick_encoding` of ``seed``).
        name_prefix: prefix of the non-shuffled file names.

    Returns:
        The written file paths, in the order they were written.

    Raises:
        ValueError: for a bad patient position, transfer syntax or array shape.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"hu must be a non-empty 3D array, got shape {hu.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transfer_syntax = UID(str(transfer_syntax))
    enc = pixel_encoding or pick_encoding(seed)
    plane = _plan_planes(hu, spacing, origin, patient_position)
    thickness = float(spacing[0]) if slice_thickness is None else float(slice_thickness)
    pixel_spacing = [_ds_str(float(spacing[1])), _ds_str(float(spacing[2]))]
    common = dict(
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        seed=seed,
        series_number=series_number,
        series_description=series_description,
    )
    if multiframe:
        path = out_dir / _file_name(
            uid_from(series_uid, "enhanced"),
            1,
            prefix=name_prefix,
            extensionless=extensionless,
            shuffle_names=shuffle_names,
        )
        ds = _enhanced_dataset(
            plane,
            enc=enc,
            thickness=thickness,
            spacing=spacing,
            pixel_spacing=pixel_spacing,
            patient_position=patient_position,
            transfer_syntax=transfer_syntax,
            **common,
        )
        return [_save(ds, path)]

    paths: list[Path] = []
    for number, (frame, pos) in enumerate(zip(plane.frames, plane.positions, strict=True), 1):
        sop_uid = uid_from(series_uid, "slice", number)
        ds = _base_dataset(sop_class=CTImageStorage, sop_uid=sop_uid, **common)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = _ds_str(thickness)
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds_str(float(spacing[2]) * hu.shape[2])
        ds.ConvolutionKernel = "B70f"
        ds.PatientPosition = patient_position
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [_ds_str(c) for c in pos]
        ds.ImageOrientationPatient = [_ds_str(c) for c in plane.iop]
        ds.SliceLocation = _ds_str(pos[2])
        ds.PixelSpacing = pixel_spacing
        ds.RescaleIntercept = _ds_str(enc.intercept)
        ds.RescaleSlope = _ds_str(enc.slope)
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        _set_pixels(ds, encode_pixels(frame, enc), enc, transfer_syntax)
        path = out_dir / _file_name(
            sop_uid,
            number,
            prefix=name_prefix,
            extensionless=extensionless,
            shuffle_names=shuffle_names,
        )
        paths.append(_save(ds, path))
    log.debug("wrote %d slices of series %s to %s", len(paths), series_uid, out_dir)
    return paths


def _item(**elements: object) -> Dataset:
    item = Dataset()
    for key, value in elements.items():
        setattr(item, key, value)
    return item


def _enhanced_dataset(
    plane: _Plane,
    *,
    enc: PixelEncoding,
    thickness: float,
    spacing: Sequence[float],
    pixel_spacing: list[str],
    patient_position: str,
    transfer_syntax: UID,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    seed: int,
    series_number: int,
    series_description: str,
) -> Dataset:
    """One Enhanced CT Image Storage object holding every slice as a frame."""
    sop_uid = uid_from(series_uid, "enhanced")
    ds = _base_dataset(
        sop_class=EnhancedCTImageStorage,
        sop_uid=sop_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        seed=seed,
        series_number=series_number,
        series_description=series_description,
    )
    date, time = ds.ContentDate, ds.ContentTime
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = date + time
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = patient_position
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.NumberOfFrames = len(plane.frames)
    dim_uid = uid_from(series_uid, "dimension-organization")
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00209056,
                FunctionalGroupPointer=0x00209111,
                DimensionDescriptionLabel="Stack ID",
            ),
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00209057,
                FunctionalGroupPointer=0x00209111,
                DimensionDescriptionLabel="In-Stack Position Number",
            ),
        ]
    )
    shared = _item(
        PixelMeasuresSequence=DicomSequence(
            [
                _item(
                    PixelSpacing=pixel_spacing,
                    SliceThickness=_ds_str(thickness),
                    SpacingBetweenSlices=_ds_str(float(spacing[0])),
                )
            ]
        ),
        PlaneOrientationSequence=DicomSequence(
            [_item(ImageOrientationPatient=[_ds_str(c) for c in plane.iop])]
        ),
        PixelValueTransformationSequence=DicomSequence(
            [
                _item(
                    RescaleIntercept=_ds_str(enc.intercept),
                    RescaleSlope=_ds_str(enc.slope),
                    RescaleType="HU",
                )
            ]
        ),
        FrameVOILUTSequence=DicomSequence([_item(WindowCenter="-600", WindowWidth="1500")]),
        CTImageFrameTypeSequence=DicomSequence(
            [
                _item(
                    FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                )
            ]
        ),
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for index, pos in enumerate(plane.positions, 1):
        per_frame.append(
            _item(
                FrameContentSequence=DicomSequence(
                    [
                        _item(
                            FrameAcquisitionNumber=1,
                            StackID="1",
                            InStackPositionNumber=index,
                            DimensionIndexValues=[1, index],
                        )
                    ]
                ),
                PlanePositionSequence=DicomSequence(
                    [_item(ImagePositionPatient=[_ds_str(c) for c in pos])]
                ),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    stored = encode_pixels(np.stack(plane.frames), enc)
    _set_pixels(ds, stored, enc, transfer_syntax)
    return ds


def write_localizer(
    hu: np.ndarray,
    *,
    spacing: Sequence[float],
    out_dir: Path,
    study_uid: str,
    series_uid: str,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    patient_id: str = "SYNTH0000",
    seed: int = 0,
    series_number: int = 1,
    extensionless: bool = False,
    name: str | None = None,
) -> Path:
    """Write a coronal scout (``ImageType ORIGINAL\\PRIMARY\\LOCALIZER``) of the volume.

    The image is a projection of ``hu`` front to back; its top row is the most
    superior slice, its first column the patient's right.

    Args:
        hu: canonical float array ``[D, H, W]`` in HU.
        spacing: voxel size in mm along (D, H, W).
        out_dir: folder to write into.
        study_uid: StudyInstanceUID (share it with the axial series).
        series_uid: SeriesInstanceUID of the localizer series.
        origin: LPS mm of canonical voxel ``[0, 0, 0]`` of ``hu``.
        patient_id: PatientID.
        seed: feeds dates and UIDs.
        series_number: SeriesNumber.
        extensionless: leave ``.dcm`` off the file name.
        name: file name stem (default ``LOCALIZER``).

    Returns:
        The written path.
    """
    hu = np.asarray(hu, dtype=np.float32)
    d, h, _w = hu.shape
    sd, sh, sw = (float(s) for s in spacing)
    attenuation = np.clip(hu + 1000.0, 0.0, None).mean(axis=1)  # (D, W)
    image = (attenuation[::-1] * 1.5 - 1000.0).astype(np.float32)
    enc = PixelEncoding("uint16_m1024", "uint16", -1024.0)
    sop_uid = uid_from(series_uid, "localizer")
    ds = _base_dataset(
        sop_class=CTImageStorage,
        sop_uid=sop_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        seed=seed,
        series_number=series_number,
        series_description="Topogram 0.6 T20f",
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "120"
    ds.SliceThickness = "0.6"
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ox, oy, oz = (float(c) for c in origin)
    ds.ImagePositionPatient = [
        _ds_str(ox),
        _ds_str(oy + 0.5 * (h - 1) * sh),
        _ds_str(oz + (d - 1) * sd),
    ]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [_ds_str(sd), _ds_str(sw)]
    ds.RescaleIntercept = _ds_str(enc.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    _set_pixels(ds, encode_pixels(image, enc), enc, ExplicitVRLittleEndian)
    return _save(ds, Path(out_dir) / _dcm_name(name or "LOCALIZER", extensionless))


def write_secondary_capture(
    hu: np.ndarray,
    *,
    out_dir: Path,
    study_uid: str,
    series_uid: str,
    patient_id: str = "SYNTH0000",
    seed: int = 0,
    series_number: int = 501,
    extensionless: bool = False,
    name: str | None = None,
) -> Path:
    """Write a Secondary Capture image with Modality CT (like a dose or summary screen).

    The picture is an 8-bit lung-window rendering of the middle axial slice; it
    carries no ImagePositionPatient or ImageOrientationPatient.

    Args:
        hu: canonical float array ``[D, H, W]`` in HU.
        out_dir: folder to write into.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID of the capture.
        patient_id: PatientID.
        seed: feeds dates and UIDs.
        series_number: SeriesNumber.
        extensionless: leave ``.dcm`` off the file name.
        name: file name stem (default ``SC``).

    Returns:
        The written path.
    """
    hu = np.asarray(hu, dtype=np.float32)
    middle = hu[hu.shape[0] // 2]
    image = np.clip((middle + 1350.0) / 1500.0 * 255.0, 0, 255).astype(np.uint8)
    sop_uid = uid_from(series_uid, "secondary-capture")
    ds = _base_dataset(
        sop_class=SecondaryCaptureImageStorage,
        sop_uid=sop_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        seed=seed,
        series_number=series_number,
        series_description="Patient Protocol",
    )
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in image.shape)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = image.tobytes()
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    return _save(ds, Path(out_dir) / _dcm_name(name or "SC", extensionless))
