"""Choose the series of a study that gets scored: a pure, explainable function.

Rules, applied in order (the first that fails names the rejection):

1. the SOP class is CT Image Storage or Enhanced CT Image Storage (this rejects
   secondary captures, dose reports, SR, RTSTRUCT, ... by name);
2. the objects carry pixel data;
3. ImageType is not LOCALIZER (scouts, topograms, surviews);
4. the slices are axial: the slice normal lies within
   ``SelectionConfig.max_axial_deviation_deg`` of the head-feet axis;
5. there are at least ``SelectionConfig.min_slices`` distinct slice positions
   (several copies of one instance count once).

Among the eligible series, prefer (a) one covering at least half the z range of
the widest eligible series (a thin partial reconstruction must not beat a whole
chest), then (b) the thinnest slices, (c) the widest z coverage, (d) the most
instances, then (e) the SeriesInstanceUID as a stable tie-break.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.uid import UID

from ..config import SelectionConfig
from ..errors import SeriesSelectionError
from .group import Series
from .instance import CT_SOP_CLASSES

#: Coverage below this fraction of the widest eligible series ranks a series last.
MIN_COVERAGE_FRACTION = 0.5


@dataclass(frozen=True)
class SeriesFacts:
    """Geometry summary of one series, computed from headers alone."""

    n_instances: int
    n_positions: int
    slice_step_mm: float | None
    coverage_mm: float
    axial_deviation_deg: float | None


@dataclass(frozen=True)
class Candidate:
    """One series with its facts and, if rejected, why."""

    series: Series
    facts: SeriesFacts
    rejection: str | None

    @property
    def series_uid(self) -> str:
        return self.series.series_uid

    def describe(self) -> str:
        f = self.facts
        desc = self.series.first.series_description
        number = self.series.first.series_number
        label = f"series {number}" if number else "series without a number"
        if desc:
            label += f" '{desc}'"
        if f.n_positions == 1:
            return f"{label}: 1 slice"
        if f.slice_step_mm is None:
            # No orientation or position to order the slices by: their spacing is unknown.
            return f"{label}: {f.n_positions} slices, spacing unknown"
        return (
            f"{label}: {f.n_positions} slices, {f.slice_step_mm:.2f} mm apart, "
            f"{f.coverage_mm:.0f} mm in z"
        )


@dataclass(frozen=True)
class Selection:
    """The outcome of series selection for one study.

    Attributes:
        chosen: the eligible series in preference order (first = the one to score).
        reason: one sentence saying why the first was chosen.
        rejected: every rejected series with the reason, in series-key order.
    """

    chosen: tuple[Candidate, ...]
    reason: str
    rejected: tuple[Candidate, ...]

    @property
    def best(self) -> Candidate:
        return self.chosen[0]

    def rejection_summary(self) -> str:
        return "; ".join(f"{c.describe()} rejected: {c.rejection}" for c in self.rejected)


def _sop_class_name(uid: str) -> str:
    if not uid:
        return "an object without SOP Class UID"
    name = UID(uid).name
    return name if name and name != uid else uid


def series_facts(series: Series) -> SeriesFacts:
    """Slice count, step, z coverage and tilt from the axial normal, from headers alone."""
    frames = [f for h in series.instances for f in h.frames]
    positions = [f.position for f in frames if f.position is not None]
    orientation = next((f.orientation for f in frames if f.orientation is not None), None)
    deviation: float | None = None
    projected: list[float] = []
    if orientation is not None:
        row = np.asarray(orientation[:3])
        col = np.asarray(orientation[3:])
        normal = np.cross(row, col)
        norm = float(np.linalg.norm(normal))
        if norm > 1e-6:
            normal /= norm
            deviation = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
            projected = sorted({round(float(np.dot(p, normal)), 3) for p in positions})
    step = float(np.median(np.diff(projected))) if len(projected) > 1 else None
    coverage = (projected[-1] - projected[0]) if len(projected) > 1 else 0.0
    unique_instances = {(h.sop_instance_uid, f.frame) for h in series.instances for f in h.frames}
    n_positions = len(projected) if projected else len(unique_instances)
    return SeriesFacts(
        n_instances=len(series.instances),
        n_positions=min(n_positions, len(unique_instances)),
        slice_step_mm=step,
        coverage_mm=float(coverage),
        axial_deviation_deg=deviation,
    )


def rejection_reason(series: Series, facts: SeriesFacts, config: SelectionConfig) -> str | None:
    """Why a series cannot be scored, or None if it is eligible."""
    first = series.first
    classes = {h.sop_class_uid for h in series.instances}
    if not classes <= CT_SOP_CLASSES:
        other = sorted(classes - CT_SOP_CLASSES)[0]
        modality = f" (modality {first.modality})" if first.modality else ""
        return f"not a CT image series: {_sop_class_name(other)}{modality}"
    if not all(h.has_pixel_data for h in series.instances):
        return "has no pixel data"
    if any("LOCALIZER" in h.image_type for h in series.instances):
        return "a localizer (scout) image, not a volume"
    if facts.axial_deviation_deg is None:
        return "has no usable ImageOrientationPatient, so its slice plane is unknown"
    if facts.axial_deviation_deg > config.max_axial_deviation_deg:
        plane = _plane_name(series)
        return (
            f"not axial ({plane}, {facts.axial_deviation_deg:.0f}° from the axial plane; "
            f"limit {config.max_axial_deviation_deg:.0f}°)"
        )
    if facts.n_positions < config.min_slices:
        return f"too few slices ({facts.n_positions} < {config.min_slices})"
    return None


def _plane_name(series: Series) -> str:
    orientation = next(
        (f.orientation for h in series.instances for f in h.frames if f.orientation), None
    )
    if orientation is None:
        return "unknown plane"
    normal = np.abs(np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:])))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _preference_key(candidate: Candidate, widest_mm: float) -> tuple[object, ...]:
    f = candidate.facts
    partial = f.coverage_mm < MIN_COVERAGE_FRACTION * widest_mm
    step = f.slice_step_mm if f.slice_step_mm is not None else math.inf
    return (partial, round(step, 1), -round(f.coverage_mm, 0), -f.n_instances, candidate.series.key)


def select_series(series: Sequence[Series], config: SelectionConfig | None = None) -> Selection:
    """Rank the eligible series of a study and explain every rejection.

    Args:
        series: all series of one study.
        config: selection rules.

    Returns:
        A :class:`Selection` whose ``chosen`` holds every eligible series in
        preference order (``best`` is scored; per-series output uses all).

    Raises:
        SeriesSelectionError: no series is eligible; the message lists each
            series and why it was rejected.
    """
    config = config or SelectionConfig()
    candidates = []
    for s in sorted(series, key=lambda s: s.key):
        facts = series_facts(s)
        candidates.append(Candidate(s, facts, rejection_reason(s, facts, config)))
    eligible = [c for c in candidates if c.rejection is None]
    rejected = tuple(c for c in candidates if c.rejection is not None)
    if not eligible:
        details = "; ".join(f"{c.describe()}: {c.rejection}" for c in rejected)
        where = _folder_of([c.series for c in rejected])
        raise SeriesSelectionError(
            f"no axial CT image series with at least {config.min_slices} slices was found"
            f"{' in ' + where if where else ''} ({details}); check that the export holds the "
            "CT reconstruction itself."
        )
    widest = max(c.facts.coverage_mm for c in eligible)
    ranked = tuple(sorted(eligible, key=lambda c: _preference_key(c, widest)))
    return Selection(chosen=ranked, reason=_reason(ranked), rejected=rejected)


def _folder_of(series: Sequence[Series]) -> str:
    """The deepest folder (display path) holding every file of ``series``: a study's
    CT in ``study/ct`` and its RTSTRUCT in ``study/rtstruct`` are in ``study``."""
    folders = [
        shown.rsplit("/", 1)[0] if "/" in shown else shown
        for s in series
        for shown in (h.display_path for h in s.instances)
    ]
    return posixpath.commonpath(folders) if folders else ""


def _reason(ranked: tuple[Candidate, ...]) -> str:
    best = ranked[0]
    if len(ranked) == 1:
        return f"the only eligible series ({best.describe()})"
    runner = ranked[1]
    bf, rf = best.facts, runner.facts
    if (bf.slice_step_mm or math.inf) < (rf.slice_step_mm or math.inf) - 0.05:
        why = "thinnest slices"
    elif bf.coverage_mm > rf.coverage_mm + 0.5:
        why = "widest z coverage among the thinnest"
    elif bf.n_instances > rf.n_instances:
        why = "most instances among equally thin, equally wide series"
    else:
        why = "stable tie-break by series UID among equivalent series"
    return f"{why} of {len(ranked)} eligible series ({best.describe()})"
