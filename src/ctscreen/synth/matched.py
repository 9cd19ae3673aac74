"""Intensity-matched phantoms: only the shape of a finding tells the classes apart.

In the easy phantoms (:func:`ctscreen.synth.phantom.make_phantom` with
``realism="easy"``) a lesion adds dense (or air) voxels to a lung that is otherwise
the same in every study, so a histogram of HU values nearly separates the classes.
Here every study, normal or not, carries one *budget finding* drawn from the same
distribution of kinds, sizes and densities:

* in a pathological study it is painted as the lesion (its mask and type are
  recorded as usual);
* in a normal study it is drawn but not painted; its *twin* is painted instead: the
  same number of lung voxels set to the same multiset of HU values, in a shape
  that is normal anatomy or a normal variant (a raised hemidiaphragm, dependent
  atelectasis, thicker vessels, wider airways).

So the count of voxels in every HU band has the same distribution in both classes.
On top of that every study gets non-lesion density in random amounts (dependent
density, fissures, a varying inspiration level, vessel calibre, partial-volume
blur and breathing blur near the diaphragm), which a model must learn to ignore.

Twin of each kind (normal studies):

==============  ====================================================================
kind            twin shape
==============  ====================================================================
consolidation   raised hemidiaphragm(s): the lowest lung above the dome, liver density
effusion        dependent atelectasis: a band of even depth along the whole posterior lung
pneumothorax    wider airways: lung voxels nearest the bronchial tree become air
nodule          thicker vessels: lung voxels nearest the vessel tree
ground_glass    dependent density: the most posterior lung, densest at the back
==============  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: How realistic the phantoms' intensities are (``ctscreen synth --realism``).
REALISMS: tuple[str, ...] = ("easy", "matched")


@dataclass(frozen=True)
class Budget:
    """One drawn finding: which voxels change and what they become.

    Attributes:
        kind: the finding kind.
        masks: one boolean mask per drawn lesion (a study may hold several nodules).
        sides: the patient's side of each mask.
        values: float32 array, the new HU of every voxel of ``changed``, in
            ``np.flatnonzero`` order.
        changed: every voxel the finding changes (its masks, soft edges and, once
            blurred, the rim of in-between values around it).
        old_values: the values of ``changed`` before the finding.
    """

    kind: str
    masks: tuple[np.ndarray, ...]
    sides: tuple[str, ...]
    values: np.ndarray
    changed: np.ndarray
    old_values: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))


def posterior_depth_mm(lung: np.ndarray, spacing_h: float) -> np.ndarray:
    """For every lung voxel, the lung depth in mm behind it along its column (axis 1).

    0 at the most posterior lung voxel of each (slice, column) line; ``inf`` outside
    the lung.
    """
    behind = np.flip(np.cumsum(np.flip(lung, axis=1), axis=1), axis=1).astype(np.float32)
    depth = (behind - 1.0) * np.float32(spacing_h)
    return np.where(lung, depth, np.float32(np.inf))


def distance_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance in mm from every voxel to the nearest voxel of ``mask``."""
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~mask, sampling=spacing).astype(np.float32)


def top_voxels(score: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """Flat indices of the ``n`` candidate voxels with the highest ``score``, best first.

    Fewer when there are fewer candidates. Ties are broken by flat index, so the
    choice is deterministic.
    """
    flat = np.flatnonzero(candidates)
    if n >= flat.size:
        order = np.argsort(-score.reshape(-1)[flat], kind="stable")
        return flat[order]
    values = score.reshape(-1)[flat]
    part = np.argpartition(-values, n - 1)[:n]
    chosen = flat[part]
    order = np.argsort(-score.reshape(-1)[chosen], kind="stable")
    return chosen[order]


#: Bin edges (HU) by which a twin matches the old values of the voxels it replaces.
OLD_VALUE_EDGES = np.concatenate([[-np.inf], np.arange(-1000.0, 201.0, 25.0), [np.inf]])


def matched_choice(
    score: np.ndarray, candidates: np.ndarray, old: np.ndarray, budget_old: np.ndarray
) -> np.ndarray:
    """Flat indices of a twin: per old-value bin, the best-scoring candidates of that bin.

    A finding replaces voxels of some values (lung, a vessel's blurred edge) with
    others; a twin that replaced voxels of other values would still shift the
    histogram differently. So for every bin of :data:`OLD_VALUE_EDGES` the twin
    takes as many voxels as the finding replaced in that bin, the best-scoring
    candidates whose current value lies in it; a bin without enough candidates
    hands its remainder to the best-scoring candidates left.

    Args:
        score: higher = chosen first (``[D, H, W]``).
        candidates: voxels that may be chosen.
        old: the current volume.
        budget_old: the values the finding replaced.

    Returns:
        Flat indices, as many as ``budget_old`` (fewer only if candidates run out).
    """
    flat_score = score.reshape(-1)
    bins_now = np.digitize(old.reshape(-1), OLD_VALUE_EDGES)
    n_bins = OLD_VALUE_EDGES.size + 1
    wanted = np.bincount(np.digitize(budget_old, OLD_VALUE_EDGES), minlength=n_bins)
    left = candidates.reshape(-1).copy()
    chosen: list[np.ndarray] = []
    short = 0
    for b in np.flatnonzero(wanted):
        pool = left & (bins_now == b)
        picked = top_voxels(score, pool.reshape(candidates.shape), int(wanted[b]))
        short += int(wanted[b]) - picked.size
        left[picked] = False
        chosen.append(picked)
    if short > 0:
        chosen.append(top_voxels(score, left.reshape(candidates.shape), short))
    out = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return out[np.argsort(-flat_score[out], kind="stable")]


def paint_twin(
    hu: np.ndarray,
    budget: Budget,
    score: np.ndarray,
    candidates: np.ndarray,
    *,
    densest_first: bool = True,
) -> np.ndarray:
    """Paint the budget's values into as many well-scoring candidates.

    The voxel count, the multiset of new values and (by bins) the values replaced
    are those of the finding, so the HU histogram changes as the finding would
    change it; only the shape differs.

    Args:
        hu: the volume, changed in place.
        budget: the finding whose values are used.
        score: higher = chosen first.
        candidates: voxels that may be chosen.
        densest_first: give the highest values to the best-scoring voxels
            (otherwise the lowest).

    Returns:
        The boolean mask of the painted voxels.
    """
    values = np.sort(budget.values)
    if densest_first:
        values = values[::-1]
    chosen = matched_choice(score, candidates, hu, budget.old_values)
    hu.reshape(-1)[chosen] = values[: chosen.size]
    mask = np.zeros(hu.shape, dtype=bool)
    mask.reshape(-1)[chosen] = True
    return mask


def breathing_blur(hu: np.ndarray, t: np.ndarray, sigma_slices: float, t_top: float) -> np.ndarray:
    """Blur along the scan axis, fully at the lung bases and fading out at ``t_top``.

    Diaphragm motion during the scan smears the bases along z; the apices stay sharp.
    """
    if sigma_slices <= 0.0:
        return hu
    blurred = ndimage.gaussian_filter1d(hu, sigma_slices, axis=0, mode="nearest")
    weight = np.clip((t_top - t) / (t_top + 1.0), 0.0, 1.0).astype(np.float32)
    return (hu + weight * (blurred - hu)).astype(np.float32)


def in_plane_blur(hu: np.ndarray, sigma_voxels: float) -> np.ndarray:
    """The scanner's point spread in-plane: partial-volume bands at every edge."""
    if sigma_voxels <= 0.0:
        return hu
    return ndimage.gaussian_filter(hu, (0.0, sigma_voxels, sigma_voxels), mode="nearest").astype(
        np.float32
    )
