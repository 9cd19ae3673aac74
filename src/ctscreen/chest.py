"""Is this series a chest CT? Checked in the image, with the DICOM tags as a second voice.

The model was trained on chest CT only; a head or abdomen series would still get
a confident probability. So before a series is scored, this module measures
*aerated lung inside the body* on every axial slice of the HU volume:

1. the body is the largest connected region above ``BODY_MIN_HU`` with its holes
   filled (so the lungs, which are air inside the chest wall, belong to it);
2. aerated lung is every body voxel between ``LUNG_MIN_HU`` and ``LUNG_MAX_HU``;
3. a slice is a *lung slice* when aerated lung covers at least
   ``LUNG_SLICE_FRACTION`` of its body cross-section.

The share of lung slices decides: at least ``CHEST_LUNG_SLICE_SHARE`` is a chest;
below ``UNSURE_LUNG_SLICE_SHARE`` is not; between the two the DICOM tags
(BodyPartExamined, ProtocolName, series and study descriptions) settle it: a
non-chest body part fails, anything else is scored with a warning. The tags never
overrule a clear image verdict; they only add a warning when they disagree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import NotChestError
from .volume import Volume

#: Soft tissue and bone start here; air, lung and the scanner's padding lie below.
BODY_MIN_HU = -500.0
#: Aerated lung parenchyma: normal lung is about -850 HU; -950 excludes emphysema-free
#: air (bowel gas, outside air, pneumothorax at -1000), -500 excludes soft tissue.
LUNG_MIN_HU = -950.0
LUNG_MAX_HU = -500.0
#: A lung slice has aerated lung on at least this share of its body cross-section.
#: Measured: slices through the lungs of the three real chest series reach 0.17-0.40
#: (median of their lung slices ~0.3); head and upper-abdomen slices stay below 0.04.
LUNG_SLICE_FRACTION = 0.10
#: A chest CT has lung slices on at least this share of its slices. Measured on real
#: series: chest 0.59 (LIDC, runs down to the kidneys), 0.67 and 0.73; synthetic
#: phantoms 0.67-0.81; the real head and upper-abdomen series 0.00.
CHEST_LUNG_SLICE_SHARE = 0.30
#: Below this share no chest is in the field of view (an abdomen CT that catches the
#: lung bases stays around 0.1-0.2 and is settled by the tags, or scored with a warning).
UNSURE_LUNG_SLICE_SHARE = 0.10
#: Air outside the body is about -1000 HU; a volume whose lowest value lies above this
#: has no air at all, which usually means its rescale to HU is wrong.
AIR_MAX_HU = -900.0
#: In-plane resolution (mm) the measurement works at; finer images are subsampled
#: (never below 64 pixels across).
MEASURE_SPACING_MM = 2.0

CHEST = "chest"
UNSURE = "unsure"
NOT_CHEST = "not chest"

_CHEST_WORDS = ("CHEST", "THORA", "LUNG", "PULMO", "ГРУД", "ЛЕГК", "ОГК", "TORSO", "WHOLEBODY")
_OTHER_WORDS = (
    "HEAD",
    "BRAIN",
    "SKULL",
    "CRANI",
    "NECK",
    "SINUS",
    "ORBIT",
    "ABDOM",
    "ABD",
    "PELVI",
    "KNEE",
    "HIP",
    "SHOULDER",
    "ANKLE",
    "FOOT",
    "HAND",
    "WRIST",
    "ELBOW",
    "EXTREMITY",
    "LSPINE",
    "ГОЛОВ",
    "МОЗГ",
    "БРЮШ",
    "ТАЗ",
)


@dataclass(frozen=True)
class TagRegion:
    """What the DICOM tags say about the body region.

    Attributes:
        region: ``"chest"`` (a chest word anywhere), ``"other"`` (only non-chest
            words) or ``""`` (nothing recognisable).
        evidence: the tag and value that decided it, e.g. ``"BodyPartExamined HEAD"``.
    """

    region: str
    evidence: str


def region_from_tags(tags: Sequence[tuple[str, str]]) -> TagRegion:
    """The body region named by ``(keyword, value)`` pairs, most specific tag first.

    Example:
        >>> region_from_tags([("BodyPartExamined", "HEAD")]).region
        'other'
    """
    other: TagRegion | None = None
    for keyword, value in tags:
        text = (value or "").upper()
        if not text.strip():
            continue
        tokens = [t for t in re.split(r"[^0-9A-ZА-ЯЁ]+", text) if t]
        if any(t.startswith(w) for t in tokens for w in _CHEST_WORDS):
            return TagRegion(CHEST, f"{keyword} {value.strip()!r}")
        if other is None and any(
            t.startswith(w) if len(w) > 3 else t == w for t in tokens for w in _OTHER_WORDS
        ):
            other = TagRegion("other", f"{keyword} {value.strip()!r}")
    return other or TagRegion("", "")


@dataclass(frozen=True)
class ChestCheck:
    """The measured lung air of one volume and the verdict.

    Attributes:
        verdict: ``"chest"``, ``"unsure"`` or ``"not chest"``.
        lung_slices: slices with aerated lung on at least ``LUNG_SLICE_FRACTION``
            of the body cross-section.
        n_slices: axial slices measured.
        peak_fraction: the largest per-slice share of the body that is aerated lung.
        min_hu: the lowest value in the volume.
        tags: what the DICOM tags say.
    """

    verdict: str
    lung_slices: int
    n_slices: int
    peak_fraction: float
    min_hu: float
    tags: TagRegion

    @property
    def lung_slice_share(self) -> float:
        return self.lung_slices / max(self.n_slices, 1)

    def describe(self) -> str:
        """The measurement in words, for Failure texts and warnings."""
        text = (
            f"aerated lung ({LUNG_MIN_HU:.0f} to {LUNG_MAX_HU:.0f} HU inside the body) covers "
            f"at least {LUNG_SLICE_FRACTION:.0%} of the body on {self.lung_slices} of "
            f"{self.n_slices} slices ({self.lung_slice_share:.0%}; a chest CT has "
            f"{CHEST_LUNG_SLICE_SHARE:.0%} or more), at most {self.peak_fraction:.0%} on any slice"
        )
        if self.tags.evidence:
            text += f"; {self.tags.evidence}"
        if self.min_hu > AIR_MAX_HU:
            text += (
                f"; the lowest value is {self.min_hu:.0f} HU where outside air should be near "
                "-1000 HU, so the rescale to HU (RescaleSlope/RescaleIntercept) may be wrong"
            )
        return text


def lung_fractions(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Per axial slice of a canonical ``[D, H, W]`` HU array: aerated lung / body area.

    Args:
        hu: HU array in the canonical orientation (axis 0 runs feet to head).
        spacing: voxel size in mm along (D, H, W).

    Returns:
        float64 ``[D]`` in [0, 1]; 0 for a slice without a body.
    """
    # Subsample to about MEASURE_SPACING_MM, but keep at least 64 pixels across:
    # small matrices keep their chest wall wider than the opening's reach.
    step_h = max(1, min(round(MEASURE_SPACING_MM / max(spacing[1], 1e-6)), hu.shape[1] // 64))
    step_w = max(1, min(round(MEASURE_SPACING_MM / max(spacing[2], 1e-6)), hu.shape[2] // 64))
    out = np.zeros(hu.shape[0], dtype=np.float64)
    for k in range(hu.shape[0]):
        plane = np.asarray(hu[k, ::step_h, ::step_w], dtype=np.float32)
        body = ndimage.binary_opening(plane > BODY_MIN_HU)
        labels, count = ndimage.label(body)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        largest = labels == (1 + int(np.argmax(sizes)))
        filled = ndimage.binary_fill_holes(largest)
        area = int(filled.sum())
        if area == 0:
            continue
        lung = filled & (plane >= LUNG_MIN_HU) & (plane <= LUNG_MAX_HU)
        out[k] = float(lung.sum()) / area
    return out


def check_chest(volume: Volume, tags: Sequence[tuple[str, str]] = ()) -> ChestCheck:
    """Measure the aerated lung of ``volume`` and decide whether it is a chest CT.

    Args:
        volume: the canonical HU volume of the series to score.
        tags: ``(keyword, value)`` pairs such as ``("BodyPartExamined", "CHEST")``,
            most specific first.
    """
    fractions = lung_fractions(volume.hu, volume.spacing)
    lung_slices = int(np.count_nonzero(fractions >= LUNG_SLICE_FRACTION))
    n = int(fractions.size)
    share = lung_slices / max(n, 1)
    region = region_from_tags(tags)
    if share >= CHEST_LUNG_SLICE_SHARE:
        verdict = CHEST
    elif share < UNSURE_LUNG_SLICE_SHARE:
        verdict = NOT_CHEST
    else:
        verdict = NOT_CHEST if region.region == "other" else UNSURE
    return ChestCheck(
        verdict=verdict,
        lung_slices=lung_slices,
        n_slices=n,
        peak_fraction=float(fractions.max()) if n else 0.0,
        min_hu=float(np.min(volume.hu)) if volume.hu.size else 0.0,
        tags=region,
    )


def require_chest(
    volume: Volume, tags: Sequence[tuple[str, str]] = (), *, where: str = ""
) -> tuple[str, ...]:
    """Raise unless ``volume`` is a chest CT; return the warnings a scored one carries.

    Args:
        volume: the canonical HU volume of the series to score.
        tags: ``(keyword, value)`` pairs naming the body region, most specific first.
        where: the series' folder or file, named in the refusal.

    Raises:
        NotChestError: the image shows too little aerated lung ("not a chest CT: ...").
    """
    check = check_chest(volume, tags)
    if check.verdict == NOT_CHEST:
        place = f" (the series in {where})" if where else ""
        raise NotChestError(
            f"not a chest CT: {check.describe()}{place}; ctscreen scores chest CT only, so "
            "pass the chest series of the study."
        )
    if check.verdict == UNSURE:
        return (f"this may not be a chest CT, scored anyway: {check.describe()}",)
    if check.tags.region == "other":
        return (
            f"the DICOM tags name another body region ({check.tags.evidence}), but the image "
            f"shows lung on {check.lung_slices} of {check.n_slices} slices; scored as chest CT",
        )
    return ()
