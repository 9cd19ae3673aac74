"""What scoring one study gives: a torch-free value object every consumer reads.

:class:`StudyResult` is what :meth:`ctscreen.Screener.score` yields for each study
(or each eligible series): the CLI's table, the HTML report, ``evaluate``, the
service and the DICOM node all read it, and the table's rows are built from it in
one place (:func:`ctscreen.report.result_rows`). It holds plain values and numpy
arrays only, so it can cross a process boundary and be read without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from .dicom.header import StudyHeader
from .volume import SliceRef, Volume

SUCCESS = "Success"
FAILURE = "Failure"
STATUSES: tuple[str, str] = (SUCCESS, FAILURE)


@dataclass(frozen=True, kw_only=True, eq=False)
class StudyResult:
    """The outcome of one study (or one eligible series in per-series mode).

    A study that could not be processed has ``error`` set and no probability; it
    still carries everything known about it (where it was, its UIDs, warnings).

    Attributes:
        input_path: the archive, folder or file given as input.
        location: where the study was found (archive path and the folder inside
            it): the task's ``path_to_study``.
        study_uid: StudyInstanceUID ("" when unknown).
        series_uid: SeriesInstanceUID of the scored series ("" when none was).
        series_reason: why this series was scored and why the others were not.
        error: one sentence saying what went wrong and what to do ("" on success).
        warnings: sentences worth reading even on success.
        probability: model probability of pathology in [0, 1]; None on failure.
        logit: the network's logit (``cam.mean() + bias``); None on failure.
        pathology: 1 when ``probability`` reaches ``threshold``, else 0; None on failure.
        threshold: the decision threshold used.
        box: ``(x_min, x_max, y_min, y_max, z_min, z_max)`` in DICOM patient
            coordinates (LPS, mm) around the strongest evidence; None when not
            localised (negative studies, or localisation switched off).
        slice_scores: float64 ``[n_slices]``, a score in [0, 1] per canonical
            slice (feet to head), from the same forward pass.
        slices: where each canonical slice came from (SOPInstanceUID,
            InstanceNumber, frame), in canonical order.
        cam: class activation map ``[d', h', w']`` in logit units (bias excluded),
            canonical orientation.
        bias: the head's bias, so that ``cam.mean() + bias == logit``.
        geometry: the scored volume without voxels (shape, spacing, affine).
        image: the network input ``[D', H', W']`` in [0, 1]; only when asked for
            (``keep_image=True``), as it is the largest part.
        volume: the scored volume with its HU voxels at the study's own
            resolution (canonical orientation); only when asked for
            (``keep_volume=True``), for pictures drawn from the study's pixels.
        borderline: the probability lies within the model card's
            ``borderline_band`` of the threshold, so a small change of the input
            could flip the decision (also said in ``warnings``).
        seconds: time spent on this study (its reading share, decoding,
            preprocessing and its share of the forward pass).
        timings: the stages of ``seconds`` (``read_s``, ``preprocess_s``, ``model_s``).
        header: the study's cleaned Patient/Study values and the scored series'
            instances, as read (what the DICOM results repeat); None when no DICOM
            header was read (NIfTI input, an unreadable input).
    """

    input_path: str
    location: str
    study_uid: str = ""
    series_uid: str = ""
    series_reason: str = ""
    error: str = ""
    warnings: tuple[str, ...] = ()
    probability: float | None = None
    logit: float | None = None
    pathology: int | None = None
    threshold: float | None = None
    box: tuple[float, ...] | None = None
    slice_scores: np.ndarray | None = None
    slices: tuple[SliceRef, ...] = ()
    cam: np.ndarray | None = None
    bias: float | None = None
    geometry: Volume | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)
    volume: Volume | None = field(default=None, repr=False)
    borderline: bool = False
    seconds: float = 0.0
    timings: Mapping[str, float] = field(default_factory=dict)
    header: StudyHeader | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.error and self.probability is not None:
            raise ValueError("a failed study carries no probability")
        if not self.error and self.probability is None:
            raise ValueError("a study without an error needs a probability")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}")

    @property
    def ok(self) -> bool:
        """True when the study was scored."""
        return not self.error

    @property
    def status(self) -> str:
        """``"Success"`` or ``"Failure"``, as the task's table writes it."""
        return SUCCESS if self.ok else FAILURE

    @property
    def n_slices(self) -> int | None:
        """Slices of the scored volume (None when nothing was scored)."""
        return None if self.geometry is None else self.geometry.shape[0]

    def without_maps(self) -> StudyResult:
        """A copy without the activation map, the network input and the volume, the
        large arrays (what a consumer keeps once it has drawn its pictures)."""
        return replace(self, cam=None, image=None, volume=None)
