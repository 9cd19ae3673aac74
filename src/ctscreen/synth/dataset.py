"""A whole synthetic dataset: DICOM studies (or zip archives) plus ``labels.csv``.

Layout::

    out/labels.csv
    out/studies/<study_id>/<files>          (default)
    out/archives/<study_id>.zip             (zip_archives=True; one top folder <study_id>/)

Each study holds one main axial CT series (the one ``labels.csv`` names) and,
with ``variety``, sometimes a localizer, a thicker second reconstruction and a
secondary capture, all flat in one folder as many PACS exports are. The whole
dataset is a pure function of its arguments: the same seed gives a
byte-identical ``labels.csv`` and the same pixel data.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from ..errors import ConfigError
from .dicom_writer import (
    uid_from,
    write_localizer,
    write_secondary_capture,
    write_series,
)
from .matched import REALISMS
from .phantom import PATHOLOGIES, Phantom, make_phantom

log = logging.getLogger(__name__)

#: In-plane matrix sizes per preset; "tiny" is for tests.
MATRIX_PRESETS: dict[str, tuple[int, ...]] = {
    "tiny": (48, 64),
    "small": (96, 128, 160, 192),
    "full": (512,),
}
#: Most slices a study gets per preset (the covered length shrinks to fit).
MAX_SLICES: dict[str, int] = {"tiny": 32, "small": 96, "full": 160}

#: Centre and box of a study's largest lesion, LPS mm (empty for normal studies).
LESION_COLUMNS: tuple[str, ...] = (
    "lesion_center_x",
    "lesion_center_y",
    "lesion_center_z",
    "lesion_x_min",
    "lesion_x_max",
    "lesion_y_min",
    "lesion_y_max",
    "lesion_z_min",
    "lesion_z_max",
)

LABEL_COLUMNS: tuple[str, ...] = (
    "study_id",
    "label",
    "pathology_type",
    "study_uid",
    "series_uid",
    "patient_id",
    "path",
    "n_slices",
    "rows",
    "cols",
    "spacing_mm",
    "patient_position",
    "transfer_syntax",
    "multiframe",
    "n_series",
    "n_lesions",
    *LESION_COLUMNS,
)
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class StudySpec:
    """Everything needed to write one synthetic study."""

    study_id: str
    seed: int
    pathology: str | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    patient_position: str
    transfer_syntax: str
    multiframe: bool
    extensionless: bool
    shuffle_names: bool
    localizer: bool
    thick_series: bool
    secondary_capture: bool
    patient_id: str
    study_uid: str
    series_uid: str
    realism: str = "easy"
    decoy: str | None = None


def _pathologies(
    n_studies: int,
    fraction: float,
    rng: np.random.Generator,
    allowed: Sequence[str] = PATHOLOGIES,
) -> list[str | None]:
    n_path = int(round(n_studies * fraction))
    kinds = list(allowed)
    rng.shuffle(kinds)
    labels: list[str | None] = [kinds[i % len(kinds)] for i in range(n_path)]
    labels += [None] * (n_studies - n_path)
    order = rng.permutation(n_studies)
    return [labels[i] for i in order]


def plan_studies(
    n_studies: int,
    *,
    seed: int,
    matrix: str = "small",
    pathology_fraction: float = 0.5,
    variety: bool = True,
    pathologies: Sequence[str] = PATHOLOGIES,
    realism: str = "easy",
) -> list[StudySpec]:
    """Decide every study's content and encoding, without writing anything.

    Args:
        n_studies: how many studies.
        seed: master seed.
        matrix: ``"tiny"``, ``"small"`` (96-192 px) or ``"full"`` (512 px).
        pathology_fraction: share of studies with pathology (rounded); the kinds
            cycle through :data:`~ctscreen.synth.phantom.PATHOLOGIES`.
        variety: vary matrix, slice spacing, FOV, patient position, transfer
            syntax, naming and extra series; otherwise every study is a plain
            head-first, uncompressed, single-frame series.
        pathologies: the kinds that pathological studies cycle through.
        realism: ``"easy"`` or ``"matched"`` (see
            :func:`~ctscreen.synth.phantom.make_phantom`). In ``"matched"`` sets the
            normal studies' decoy kinds cycle through ``pathologies`` as the
            pathological studies' kinds do, so both classes draw the same budgets.

    Returns:
        One :class:`StudySpec` per study.

    Raises:
        ConfigError: for a bad count, fraction or matrix preset.
    """
    if n_studies < 1:
        raise ConfigError(f"--studies must be at least 1, got {n_studies}.")
    if not 0.0 <= pathology_fraction <= 1.0:
        raise ConfigError(f"pathology fraction must be in [0, 1], got {pathology_fraction}.")
    unknown = sorted(set(pathologies) - set(PATHOLOGIES))
    if unknown or not pathologies:
        raise ConfigError(
            f"unknown or empty pathology kinds {unknown or list(pathologies)}; "
            f"choose from {list(PATHOLOGIES)}."
        )
    if matrix not in MATRIX_PRESETS:
        raise ConfigError(f"unknown matrix preset {matrix!r}; use one of {sorted(MATRIX_PRESETS)}.")
    if realism not in REALISMS:
        raise ConfigError(f"unknown realism {realism!r}; use one of {list(REALISMS)}.")
    rng = np.random.default_rng([int(seed), 1])
    kinds = _pathologies(n_studies, pathology_fraction, rng, tuple(pathologies))
    decoys: list[str | None] = [None] * n_studies
    if realism == "matched":
        # Its own stream, so that a matched set has the same studies, kinds and
        # geometry as the easy set of the same seed.
        drng = np.random.default_rng([int(seed), 3])
        normals = [i for i, kind in enumerate(kinds) if kind is None]
        cycle = _pathologies(len(normals), 1.0, drng, tuple(pathologies))
        for i, decoy in zip(normals, cycle, strict=True):
            decoys[i] = decoy
    specs = []
    for index, pathology in enumerate(kinds):
        srng = np.random.default_rng([int(seed), 2, index])
        study_seed = int(srng.integers(0, 2**31 - 1))
        if variety:
            size = int(srng.choice(MATRIX_PRESETS[matrix]))
            fov = float(srng.uniform(280.0, 420.0))
            thickness = float(srng.choice([1.25, 2.5, 3.0, 5.0], p=[0.15, 0.35, 0.2, 0.3]))
            position = "FFS" if srng.random() < 0.25 else "HFS"
            ts = str(
                srng.choice(
                    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless],
                    p=[0.55, 0.15, 0.15, 0.15],
                )
            )
            multiframe = bool(srng.random() < 0.1)
            extensionless = bool(srng.random() < 0.4)
            shuffle = bool(srng.random() < 0.4)
            localizer = bool(srng.random() < 0.3)
            thick = bool(thickness <= 2.5 and srng.random() < 0.35)
            sc = bool(srng.random() < 0.1)
        else:
            size = MATRIX_PRESETS[matrix][-1] if matrix != "small" else 128
            fov, thickness, position, ts = 350.0, 5.0, "HFS", ExplicitVRLittleEndian
            multiframe = extensionless = shuffle = localizer = thick = sc = False
        length = float(srng.uniform(240.0, 320.0))
        n_slices = int(min(max(round(length / thickness), 16), MAX_SLICES[matrix]))
        pixel = round(fov / size, 4)
        shape = (n_slices, size, size)
        spacing = (thickness, pixel, pixel)
        origin = (
            round(-0.5 * (size - 1) * pixel + float(srng.uniform(-5.0, 5.0)), 3),
            round(-0.5 * (size - 1) * pixel + float(srng.uniform(-20.0, 5.0)), 3),
            round(-float(srng.uniform(80.0, 420.0)), 3),
        )
        study_id = f"synth_{index:04d}"
        study_uid = str(uid_from("study", seed, index))
        specs.append(
            StudySpec(
                study_id=study_id,
                seed=study_seed,
                pathology=pathology,
                shape=shape,
                spacing=spacing,
                origin=origin,
                patient_position=position,
                transfer_syntax=ts,
                multiframe=multiframe,
                extensionless=extensionless,
                shuffle_names=shuffle,
                localizer=localizer,
                thick_series=thick,
                secondary_capture=sc,
                patient_id=f"SYN{seed % 1000:03d}{index:05d}",
                study_uid=study_uid,
                series_uid=str(uid_from(study_uid, "series", 2)),
                realism=realism,
                decoy=decoys[index],
            )
        )
    return specs


def write_study(spec: StudySpec, folder: Path) -> dict[str, str]:
    """Draw and write one study into ``folder``; return its ``labels.csv`` row.

    Args:
        spec: what to write.
        folder: the study folder (created if missing).

    Returns:
        The row, every value already formatted as text (``path`` left empty).
    """
    phantom = make_phantom(
        seed=spec.seed,
        shape=spec.shape,
        spacing=spec.spacing,
        pathology=spec.pathology,
        realism=spec.realism,
        decoy=spec.decoy,
    )
    common = dict(study_uid=spec.study_uid, patient_id=spec.patient_id, seed=spec.seed)
    write_series(
        phantom.hu,
        spacing=spec.spacing,
        out_dir=folder,
        series_uid=spec.series_uid,
        patient_position=spec.patient_position,
        transfer_syntax=spec.transfer_syntax,
        multiframe=spec.multiframe,
        extensionless=spec.extensionless,
        shuffle_names=spec.shuffle_names,
        origin=spec.origin,
        series_number=2,
        series_description=f"Thorax {spec.spacing[0]:.2f} B70f",
        name_prefix="S2_",
        **common,
    )
    n_series = 1
    if spec.localizer:
        write_localizer(
            phantom.hu,
            spacing=spec.spacing,
            out_dir=folder,
            series_uid=uid_from(spec.study_uid, "series", 1),
            origin=spec.origin,
            extensionless=spec.extensionless,
            name="S1_LOCALIZER",
            **common,
        )
        n_series += 1
    if spec.thick_series:
        factor = max(2, int(round(5.0 / spec.spacing[0])))
        depth = spec.shape[0] // factor
        thick = phantom.hu[: depth * factor].reshape(depth, factor, *spec.shape[1:]).mean(axis=1)
        origin = (
            spec.origin[0],
            spec.origin[1],
            spec.origin[2] + 0.5 * (factor - 1) * spec.spacing[0],
        )
        write_series(
            thick,
            spacing=(spec.spacing[0] * factor, spec.spacing[1], spec.spacing[2]),
            out_dir=folder,
            series_uid=uid_from(spec.study_uid, "series", 3),
            patient_position=spec.patient_position,
            extensionless=spec.extensionless,
            shuffle_names=spec.shuffle_names,
            origin=origin,
            series_number=3,
            series_description="Thorax 5.0 B30f",
            name_prefix="S3_",
            **common,
        )
        n_series += 1
    if spec.secondary_capture:
        write_secondary_capture(
            phantom.hu,
            out_dir=folder,
            series_uid=uid_from(spec.study_uid, "series", 501),
            extensionless=spec.extensionless,
            name="S501_SC",
            **common,
        )
        n_series += 1
    row = {
        "study_id": spec.study_id,
        "label": str(phantom.label),
        "pathology_type": spec.pathology or "none",
        "study_uid": spec.study_uid,
        "series_uid": spec.series_uid,
        "patient_id": spec.patient_id,
        "path": "",
        "n_slices": str(spec.shape[0]),
        "rows": str(spec.shape[1]),
        "cols": str(spec.shape[2]),
        "spacing_mm": " ".join(f"{s:.4f}" for s in spec.spacing),
        "patient_position": spec.patient_position,
        "transfer_syntax": spec.transfer_syntax,
        "multiframe": str(int(spec.multiframe)),
        "n_series": str(n_series),
        "n_lesions": str(len(phantom.lesions)),
    }
    row.update(_lesion_columns(phantom, spec.origin))
    return row


def _lesion_columns(phantom: Phantom, origin: tuple[float, float, float]) -> dict[str, str]:
    keys = LESION_COLUMNS
    if not phantom.lesions:
        return dict.fromkeys(keys, "")
    largest = max(phantom.lesions, key=lambda les: les.volume_ml)
    center = largest.center_mm(phantom.affine(origin))
    box = phantom.lesion_bbox_mm(origin)
    values = (*center, *box)
    return {k: f"{v:.2f}" for k, v in zip(keys, values, strict=True)}


def _zip_folder(folder: Path, archive: Path, top: str) -> None:
    """Zip ``folder``'s files under one top folder with fixed dates (reproducible bytes)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{top}/{file.relative_to(folder).as_posix()}", _ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, file.read_bytes())


def generate_dataset(
    out: Path,
    *,
    n_studies: int,
    seed: int = 0,
    matrix: str = "small",
    pathology_fraction: float = 0.5,
    zip_archives: bool = False,
    variety: bool = True,
    pathologies: Sequence[str] = PATHOLOGIES,
    realism: str = "easy",
    progress: bool = False,
) -> Path:
    """Write a labelled synthetic chest CT dataset.

    Args:
        out: output root (created if missing; existing studies of the same ids are replaced).
        n_studies: how many studies.
        seed: master seed; the same seed gives the same dataset.
        matrix: in-plane size preset, see :data:`MATRIX_PRESETS`.
        pathology_fraction: share of studies with pathology.
        zip_archives: write ``archives/<study_id>.zip`` instead of ``studies/<study_id>/``.
        variety: vary encodings and geometry between studies (see :func:`plan_studies`).
        pathologies: the kinds that pathological studies cycle through.
        realism: ``"easy"`` (default) or ``"matched"``: normal studies carry the
            same distribution of dense and air voxels as pathological ones, in
            shapes that are not lesions (see :mod:`ctscreen.synth.matched`).
        progress: draw a tqdm bar on stderr.

    Returns:
        The path of ``labels.csv``.

    Raises:
        ConfigError: for bad arguments.
    """
    out = Path(out)
    specs = plan_studies(
        n_studies,
        seed=seed,
        matrix=matrix,
        pathology_fraction=pathology_fraction,
        variety=variety,
        pathologies=pathologies,
        realism=realism,
    )
    from tqdm.auto import tqdm

    rows = []
    what = "archives" if zip_archives else "studies"
    for spec in tqdm(specs, desc=f"synthesise {what}", unit="study", disable=not progress):
        if zip_archives:
            with tempfile.TemporaryDirectory(prefix="ctscreen-synth-") as tmp:
                row = write_study(spec, Path(tmp) / spec.study_id)
                _zip_folder(
                    Path(tmp) / spec.study_id,
                    out / "archives" / f"{spec.study_id}.zip",
                    spec.study_id,
                )
            row["path"] = f"archives/{spec.study_id}.zip"
        else:
            folder = out / "studies" / spec.study_id
            if folder.exists():
                shutil.rmtree(folder)
            row = write_study(spec, folder)
            row["path"] = f"studies/{spec.study_id}"
        rows.append(row)
        log.debug("wrote %s (%s)", spec.study_id, spec.pathology or "normal")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LABEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    labels = out / "labels.csv"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text(buffer.getvalue(), encoding="utf-8")
    log.info("wrote %d studies and %s", len(rows), labels)
    return labels
