"""Instances grouped into studies and series (Study -> Series -> instances).

Grouping is by StudyInstanceUID and SeriesInstanceUID. Aggressively anonymised
exports sometimes blank those UIDs; then a stable fallback is used and said: studies
and series are grouped by their folder (and series number and image geometry).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .instance import InstanceHeader


@dataclass(frozen=True)
class Series:
    """The instances of one series, in a stable order (by file path)."""

    series_uid: str
    key: str
    instances: tuple[InstanceHeader, ...]

    @property
    def first(self) -> InstanceHeader:
        return self.instances[0]

    @property
    def n_frames(self) -> int:
        return sum(i.number_of_frames for i in self.instances)


@dataclass(frozen=True)
class Study:
    """The series of one study and where it was found."""

    study_uid: str
    key: str
    location: str
    series: tuple[Series, ...]
    warnings: tuple[str, ...] = ()
    location_root: str = ""

    def location_of(self, series: Sequence[Series]) -> str:
        """The deepest folder that holds every file of ``series`` (the task's
        ``path_to_study`` of a row scored from them), shown under the input's path.

        :attr:`location` is the same for all the study's series; a row names the folder
        of the series it was scored from, so that a CT in ``study/ct`` beside an
        RTSTRUCT in ``study/rtstruct`` is found at ``study/ct``.
        """
        if not series or not self.location_root:
            return self.location
        return folder_location(self.location_root, [h.folder for s in series for h in s.instances])


def _fallback_series_key(h: InstanceHeader) -> str:
    orientation = h.frames[0].orientation if h.frames else None
    iop = "" if orientation is None else ",".join(f"{v:.2f}" for v in orientation)
    return f"{h.folder}|{h.series_number}|{h.modality}|{h.rows}x{h.columns}|{iop}"


def group_headers(headers: Sequence[InstanceHeader], *, location_root: str) -> tuple[Study, ...]:
    """Group headers into studies and series, with a stated fallback for empty UIDs.

    Args:
        headers: instances found in one input.
        location_root: the display path of the input (archive or folder).

    Returns:
        Studies in the order of their first file in the input; each study's series
        sorted by key.
    """
    by_study: dict[str, list[InstanceHeader]] = defaultdict(list)
    study_notes: dict[str, list[str]] = defaultdict(list)
    for h in headers:
        if h.study_uid:
            key = h.study_uid
        else:
            key = f"folder:{h.folder}"
        by_study[key].append(h)
    studies = []
    for key in sorted(by_study):
        members = sorted(by_study[key], key=lambda h: h.display_path)
        notes = study_notes[key]
        if key.startswith("folder:"):
            notes.append(
                f"StudyInstanceUID is empty in {len(members)} file(s); they were grouped "
                f"as one study by their folder {members[0].folder or '.'}"
            )
        by_series: dict[str, list[InstanceHeader]] = defaultdict(list)
        fallback_series = 0
        for h in members:
            if h.series_uid:
                by_series[h.series_uid].append(h)
            else:
                fallback_series += 1
                by_series[f"fallback:{_fallback_series_key(h)}"].append(h)
        if fallback_series:
            notes.append(
                f"SeriesInstanceUID is empty in {fallback_series} file(s); they were grouped "
                "by folder, series number and image geometry"
            )
        if any(h.notes for h in members):
            notes.append(
                f"{sum(1 for h in members if h.notes)} file(s) lack SOPInstanceUID in the "
                "dataset; the file meta header's UID was used"
            )
        series = tuple(
            Series(
                series_uid=sk if not sk.startswith("fallback:") else "",
                key=sk,
                instances=tuple(by_series[sk]),
            )
            for sk in sorted(by_series)
        )
        studies.append(
            Study(
                study_uid=members[0].study_uid,
                key=key,
                location=folder_location(location_root, [h.folder for h in members]),
                series=series,
                warnings=tuple(notes),
                location_root=location_root,
            )
        )
    # In the order their files come in the input (walked in sorted order), as a person
    # reading the folder tree meets them; the key only breaks ties.
    first_file = {key: min(h.display_path for h in by_study[key]) for key in by_study}
    return tuple(sorted(studies, key=lambda study: (first_file[study.key], study.key)))


def folder_location(location_root: str, folders: Sequence[str]) -> str:
    """``location_root`` and the deepest folder (relative to the input) holding all of
    ``folders``: the root itself when they have none in common."""
    common = os.path.commonpath(folders) if folders and all(folders) else ""
    return location_root if not common else f"{location_root}/{common}"
