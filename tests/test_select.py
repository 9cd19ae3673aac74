"""Series selection as a pure function over headers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage

from ctscreen.config import SelectionConfig
from ctscreen.dicom.discover import FrameGeometry, InstanceHeader, Series
from ctscreen.dicom.select import select_series
from ctscreen.errors import SeriesSelectionError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _series(
    uid: str,
    *,
    n: int,
    step: float,
    z0: float = 0.0,
    orientation=AXIAL,
    sop_class=str(CTImageStorage),
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    pixels: bool = True,
    number: int = 1,
) -> Series:
    instances = []
    for k in range(n):
        z = z0 + k * step
        position = (0.0, 0.0, z) if orientation == AXIAL else (0.0, z, 0.0)
        instances.append(
            InstanceHeader(
                path=Path(f"/x/{uid}/{k}"),
                display_path=f"in/{uid}/{k}",
                sop_instance_uid=f"{uid}.{k}",
                sop_class_uid=sop_class,
                study_uid="1.2",
                series_uid=uid,
                modality="CT",
                image_type=image_type,
                transfer_syntax="1.2.840.10008.1.2.1",
                rows=8,
                columns=8,
                has_pixel_data=pixels,
                instance_number=k + 1,
                series_number=number,
                series_description=f"s{uid}",
                slice_thickness=step,
                gantry_tilt=None,
                frames=(FrameGeometry(position, orientation, (0.7, 0.7)),),
                folder=uid,
            )
        )
    return Series(series_uid=uid, key=uid, instances=tuple(instances))


def test_thin_series_beats_thick_and_rejections_are_named() -> None:
    thick = _series("1.5", n=60, step=5.0)
    thin = _series("1.1", n=300, step=1.0)
    scout = _series("1.9", n=1, step=1.0, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    sr = _series("1.8", n=1, step=1.0, sop_class="1.2.840.10008.5.1.4.1.1.88.67", pixels=False)
    coronal = _series("1.7", n=100, step=1.0, orientation=CORONAL)
    few = _series("1.6", n=10, step=1.0)
    selection = select_series([thick, scout, thin, sr, coronal, few])
    assert [c.series_uid for c in selection.chosen] == ["1.1", "1.5"]
    assert selection.reason.startswith("thinnest slices of 2 eligible series")
    reasons = {c.series_uid: c.rejection for c in selection.rejected}
    assert reasons["1.9"] == "a localizer (scout) image, not a volume"
    assert reasons["1.8"].startswith("not a CT image series: X-Ray Radiation Dose SR Storage")
    assert reasons["1.7"].startswith("not axial (coronal, 90°")
    assert reasons["1.6"] == "too few slices (10 < 16)"


def test_partial_thin_reconstruction_does_not_beat_whole_chest() -> None:
    whole = _series("2.1", n=64, step=5.0)  # 315 mm
    partial = _series("2.2", n=50, step=1.0)  # 49 mm
    assert select_series([partial, whole]).best.series_uid == "2.1"


def test_coverage_then_instances_then_uid_break_ties_stably() -> None:
    wide = _series("3.2", n=100, step=2.0)
    narrow = _series("3.1", n=90, step=2.0)
    assert select_series([narrow, wide]).best.series_uid == "3.2"
    a, b = _series("3.4", n=40, step=2.0), _series("3.3", n=40, step=2.0)
    orders = {select_series(random.Random(i).sample([a, b], 2)).best.series_uid for i in range(6)}
    assert orders == {"3.3"}


def test_min_slices_is_configurable() -> None:
    few = _series("4.1", n=10, step=1.0)
    assert select_series([few], SelectionConfig(min_slices=8)).best.series_uid == "4.1"
    with pytest.raises(SeriesSelectionError, match=r"too few slices \(10 < 16\)"):
        select_series([few])


def test_duplicate_copies_count_once() -> None:
    s = _series("5.1", n=20, step=1.0)
    doubled = Series("5.1", "5.1", s.instances + s.instances)
    with pytest.raises(SeriesSelectionError, match=r"too few slices \(20 < 24\)"):
        select_series([doubled], SelectionConfig(min_slices=24))
