"""A seeded, vectorised chest CT phantom in Hounsfield units.

The phantom is drawn directly in the canonical orientation of
:mod:`ctscreen.volume`: axis 0 runs feet -> head, axis 1 anterior -> posterior and
axis 2 from the patient's right to left. Anatomy is described in normalised body
coordinates (``u`` across, ``v`` front to back, ``t`` along the scanned length), so
the same seed gives the same anatomy at any matrix size; lesion sizes are in mm.

Everything is numpy; the only Python loop rasterises the few hundred short
segments of the vessel tree, each inside its own small bounding box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from .matched import (
    REALISMS,
    Budget,
    breathing_blur,
    distance_mm,
    in_plane_blur,
    paint_twin,
    posterior_depth_mm,
)

#: Pathologies the generator can draw.
PATHOLOGIES: tuple[str, ...] = (
    "nodule",
    "ground_glass",
    "consolidation",
    "effusion",
    "pneumothorax",
)

HU_MIN = -1024.0
HU_MAX = 3071.0


@dataclass(frozen=True)
class Lesion:
    """One drawn abnormality, located in canonical voxel indices.

    Attributes:
        kind: one of :data:`PATHOLOGIES`.
        center_index: centroid ``(d, h, w)`` in voxel units (float).
        bbox_index: ``(d0, d1, h0, h1, w0, w1)``, first and last voxel index
            (both inclusive) along each axis.
        side: ``"right"`` or ``"left"`` (the patient's side).
        volume_ml: volume of the lesion in millilitres.
    """

    kind: str
    center_index: tuple[float, float, float]
    bbox_index: tuple[int, int, int, int, int, int]
    side: str
    volume_ml: float

    def center_mm(self, affine: np.ndarray) -> tuple[float, float, float]:
        """Lesion centre in LPS mm ``(x, y, z)`` for a canonical index->LPS affine."""
        point = np.asarray(affine, dtype=np.float64) @ np.array([*self.center_index, 1.0])
        return (float(point[0]), float(point[1]), float(point[2]))

    def bbox_mm(self, affine: np.ndarray) -> tuple[float, float, float, float, float, float]:
        """Lesion box in LPS mm ``(x_min, x_max, y_min, y_max, z_min, z_max)``.

        The box spans the centres of the first and last voxels of the lesion.
        """
        d0, d1, h0, h1, w0, w1 = self.bbox_index
        corners = np.array([[d, h, w, 1.0] for d in (d0, d1) for h in (h0, h1) for w in (w0, w1)])
        world = corners @ np.asarray(affine, dtype=np.float64).T
        lo = world[:, :3].min(axis=0)
        hi = world[:, :3].max(axis=0)
        return (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]), float(lo[2]), float(hi[2]))


@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic chest CT volume and what was drawn into it.

    Attributes:
        hu: float32 array ``[D, H, W]`` in HU, canonical orientation.
        spacing: voxel size in mm along (D, H, W).
        pathology: ``None`` for a normal chest, else one of :data:`PATHOLOGIES`.
        label: 0 for normal, 1 for pathology.
        lesions: the drawn lesions (empty for a normal chest).
        seed: the seed the phantom was drawn from.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    pathology: str | None
    label: int
    lesions: tuple[Lesion, ...]
    seed: int

    @property
    def shape(self) -> tuple[int, int, int]:
        d, h, w = self.hu.shape
        return (int(d), int(h), int(w))

    def affine(self, origin: tuple[float, float, float]) -> np.ndarray:
        """Canonical index ``(d, h, w)`` -> LPS mm affine.

        Args:
            origin: LPS position ``(x, y, z)`` of voxel ``[0, 0, 0]`` (the most
                inferior slice, its most anterior row and the patient's rightmost column).

        Returns:
            A 4x4 float64 matrix.
        """
        return canonical_affine(self.spacing, origin)

    def lesion_bbox_mm(
        self, origin: tuple[float, float, float]
    ) -> tuple[float, float, float, float, float, float] | None:
        """Union of all lesion boxes in LPS mm, or ``None`` for a normal chest."""
        if not self.lesions:
            return None
        boxes = np.array([les.bbox_mm(self.affine(origin)) for les in self.lesions])
        return (
            float(boxes[:, 0].min()),
            float(boxes[:, 1].max()),
            float(boxes[:, 2].min()),
            float(boxes[:, 3].max()),
            float(boxes[:, 4].min()),
            float(boxes[:, 5].max()),
        )


def canonical_affine(
    spacing: tuple[float, float, float], origin: tuple[float, float, float]
) -> np.ndarray:
    """The index -> LPS affine of a canonical array with this spacing and origin.

    Args:
        spacing: voxel size in mm along (D, H, W).
        origin: LPS mm of voxel ``[0, 0, 0]``.

    Returns:
        A 4x4 float64 matrix (d -> +z, h -> +y, w -> +x).
    """
    sd, sh, sw = (float(s) for s in spacing)
    affine = np.zeros((4, 4), dtype=np.float64)
    affine[2, 0] = sd
    affine[1, 1] = sh
    affine[0, 2] = sw
    affine[:3, 3] = [float(c) for c in origin]
    affine[3, 3] = 1.0
    return affine


@dataclass(frozen=True)
class _Grid:
    """Broadcastable voxel-centre coordinates, in mm and in body units."""

    z: np.ndarray  # (D,1,1) mm from the volume centre
    y: np.ndarray  # (1,H,1)
    x: np.ndarray  # (1,1,W)
    t: np.ndarray  # (D,1,1) -1 (feet end) .. +1 (head end)
    u: np.ndarray  # (1,1,W) body units, patient right (-) to left (+)
    v: np.ndarray  # (1,H,1) body units, anterior (-) to posterior (+)
    half_x: float  # body half-width in mm
    half_y: float  # body half-depth in mm
    half_z: float  # half scanned length in mm
    cx: float
    cy: float


def _grid(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> _Grid:
    d, h, w = shape
    sd, sh, sw = spacing
    z = ((np.arange(d) - (d - 1) / 2.0) * sd).astype(np.float32).reshape(d, 1, 1)
    y = ((np.arange(h) - (h - 1) / 2.0) * sh).astype(np.float32).reshape(1, h, 1)
    x = ((np.arange(w) - (w - 1) / 2.0) * sw).astype(np.float32).reshape(1, 1, w)
    ext_x, ext_y = w * sw, h * sh
    half_x = 0.5 * ext_x * rng.uniform(0.80, 0.90)
    half_y = min(half_x * rng.uniform(0.62, 0.74), 0.44 * ext_y)
    cx = ext_x * rng.uniform(-0.025, 0.025)
    cy = ext_y * rng.uniform(-0.04, 0.0)
    half_z = max(0.5 * d * sd, 1e-3)
    return _Grid(
        z=z,
        y=y,
        x=x,
        t=z / np.float32(half_z),
        u=(x - cx) / np.float32(half_x),
        v=(y - cy) / np.float32(half_y),
        half_x=half_x,
        half_y=half_y,
        half_z=half_z,
        cx=cx,
        cy=cy,
    )


@dataclass(frozen=True)
class _LungShape:
    side: int  # -1 patient right, +1 patient left
    cu: float
    cv: float
    au: float
    av: float
    tc: float  # centre of the taper along t
    apex: float
    dome_base: float
    dome_height: float


def _lung_shapes(rng: np.random.Generator) -> tuple[_LungShape, _LungShape]:
    shapes = []
    for side in (-1, 1):
        shapes.append(
            _LungShape(
                side=side,
                cu=side * rng.uniform(0.41, 0.47),
                cv=rng.uniform(-0.02, 0.08),
                au=rng.uniform(0.31, 0.36) * (1.04 if side < 0 else 1.0),
                av=rng.uniform(0.66, 0.74),
                tc=rng.uniform(-0.40, -0.25),
                apex=rng.uniform(0.88, 0.97),
                dome_base=rng.uniform(-0.97, -0.88),
                dome_height=rng.uniform(0.38, 0.50) if side < 0 else rng.uniform(0.28, 0.40),
            )
        )
    return shapes[0], shapes[1]


def _lung_mask(
    g: _Grid, ls: _LungShape, *, shrink: float = 1.0, shift_u: float = 0.0, shift_v: float = 0.0
) -> np.ndarray:
    lu = (g.u - (ls.cu + shift_u)) / (ls.au * shrink)
    lv = (g.v - (ls.cv + shift_v)) / (ls.av * shrink)
    q = lu * lu + lv * lv  # (1,H,W)
    apex = ls.tc + (ls.apex - ls.tc) * (shrink if shrink < 1.0 else 1.0)
    taper = np.clip(1.0 - ((g.t - ls.tc) / (apex - ls.tc)) ** 2, 0.0, None)
    taper = np.where(g.t < ls.tc, 1.0, taper)  # full width from the taper centre down
    dome = ls.dome_base + ls.dome_height * np.clip(1.0 - q, 0.0, None)
    if shrink < 1.0:
        dome = dome + (1.0 - shrink) * 0.25
    return (q <= taper) & (g.t > dome)


def _soft_ellipsoid(
    g: _Grid, center: np.ndarray, radii: np.ndarray, block: tuple[slice, slice, slice] | None = None
) -> np.ndarray:
    """Partial-volume weight (0..1) of an ellipsoid given in mm about the volume centre."""
    z, y, x = (
        (g.z, g.y, g.x) if block is None else (g.z[block[0]], g.y[:, block[1]], g.x[:, :, block[2]])
    )
    r = np.sqrt(
        ((z - center[0]) / radii[0]) ** 2
        + ((y - center[1]) / radii[1]) ** 2
        + ((x - center[2]) / radii[2]) ** 2
    )
    edge = 1.5 / float(np.min(radii))  # ~1.5 mm soft rim
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class _Segment:
    a: np.ndarray  # (z, y, x) mm
    b: np.ndarray
    radius: float
    level: int


def _vessel_tree(
    g: _Grid, ls: _LungShape, rng: np.random.Generator, levels: int = 5
) -> list[_Segment]:
    """Branching segments from one hilum outward, in mm about the volume centre."""
    hilum = np.array(
        [
            g.half_z * rng.uniform(-0.15, 0.05),
            g.cy + g.half_y * rng.uniform(-0.05, 0.10),
            g.cx + g.half_x * ls.side * rng.uniform(0.15, 0.22),
        ]
    )
    roots = [
        np.array([0.8, 0.1, 0.55 * ls.side]),  # upper lobe
        np.array([0.0, -0.3, 1.0 * ls.side]),  # middle / lingula
        np.array([-0.9, 0.35, 0.45 * ls.side]),  # lower lobe
        np.array([-0.5, 0.8, 0.35 * ls.side]),  # posterior basal
        np.array([0.4, -0.6, 0.6 * ls.side]),  # anterior upper
        np.array([-0.6, -0.4, 0.7 * ls.side]),  # anterior basal
    ]
    base_len = 0.24 * g.half_x
    segments: list[_Segment] = []
    stack = [(hilum, r / np.linalg.norm(r), base_len, 4.5, 0) for r in roots]
    while stack:
        start, direction, length, radius, level = stack.pop()
        end = start + direction * length
        segments.append(_Segment(start, end, radius, level))
        if level >= levels:
            continue
        outward = end - hilum
        outward = outward / (np.linalg.norm(outward) + 1e-6)
        for sign in (-1.0, 1.0):
            perp = rng.normal(size=3)
            perp -= perp.dot(direction) * direction
            perp /= np.linalg.norm(perp) + 1e-9
            angle = math.radians(rng.uniform(20.0, 38.0)) * sign
            new_dir = math.cos(angle) * direction + math.sin(angle) * perp + 0.35 * outward
            new_dir /= np.linalg.norm(new_dir)
            stack.append((end, new_dir, length * rng.uniform(0.66, 0.8), radius * 0.72, level + 1))
    return segments


def _rasterise(
    segments: list[_Segment],
    g: _Grid,
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    *,
    radius_scale: float = 1.0,
) -> np.ndarray:
    """Max-composited partial-volume weight of tubes along ``segments``."""
    out = np.zeros(shape, dtype=np.float32)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    centre_off = (np.asarray(shape) - 1) / 2.0
    pv = 0.5 * (spacing[1] + spacing[2])
    for seg in segments:
        radius = seg.radius * radius_scale
        lo = np.minimum(seg.a, seg.b) - radius
        hi = np.maximum(seg.a, seg.b) + radius
        i0 = np.floor(lo / spacing_arr + centre_off).astype(int)
        i1 = np.ceil(hi / spacing_arr + centre_off).astype(int) + 1
        i0 = np.maximum(i0, 0)
        i1 = np.minimum(i1, shape)
        if np.any(i1 <= i0):
            continue
        sl = (slice(i0[0], i1[0]), slice(i0[1], i1[1]), slice(i0[2], i1[2]))
        pz = g.z[sl[0]] - seg.a[0]
        py = g.y[:, sl[1]] - seg.a[1]
        px = g.x[:, :, sl[2]] - seg.a[2]
        ab = seg.b - seg.a
        ab2 = float(ab.dot(ab)) + 1e-9
        tt = np.clip((pz * ab[0] + py * ab[1] + px * ab[2]) / ab2, 0.0, 1.0)
        dist = np.sqrt((pz - tt * ab[0]) ** 2 + (py - tt * ab[1]) ** 2 + (px - tt * ab[2]) ** 2)
        alpha = np.clip((radius - dist) / pv + 0.5, 0.0, 1.0)
        np.maximum(out[sl], alpha, out=out[sl])
    return out


def _lesion_from_mask(
    kind: str, mask: np.ndarray, side: str, spacing: tuple[float, float, float]
) -> Lesion | None:
    """Centroid and inclusive index box of a boolean mask, or ``None`` if empty."""
    count = int(mask.sum())
    if count == 0:
        return None
    center = []
    bbox: list[int] = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = mask.sum(axis=other)
        idx = np.nonzero(profile)[0]
        bbox += [int(idx[0]), int(idx[-1])]
        center.append(float((profile * np.arange(profile.size)).sum() / count))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return Lesion(
        kind,
        (center[0], center[1], center[2]),
        (bbox[0], bbox[1], bbox[2], bbox[3], bbox[4], bbox[5]),
        side,
        count * voxel_ml,
    )


def _body_and_bones(
    g: _Grid, rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Air, table, body wall, cavity tissue; returns (hu, cavity mask 2D, bone weight)."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    r2 = g.u * g.u + g.v * g.v  # (1,H,W)
    # Patient table under the back.
    table_y = g.cy + g.half_y * 1.06
    table = (g.y > table_y) & (g.y < table_y + 7.0) & (np.abs(g.x - g.cx) < 1.3 * g.half_x)
    hu[:, table[0]] = 150.0
    body = r2 <= 1.0
    hu[:, body[0]] = -100.0
    muscle = r2 <= 0.90**2
    hu[:, muscle[0]] = 45.0
    cavity = r2 <= 0.84**2
    hu[:, cavity[0]] = 40.0

    bone = np.full(shape, -2000.0, dtype=np.float32)  # -2000: no bone here
    # Ribs: oblique bands in a ring inside the chest wall, sloping down anteriorly.
    theta = np.arctan2(g.u, g.v)  # 0 at posterior midline, +-pi anterior
    period = rng.uniform(28.0, 36.0)
    phase0 = rng.uniform(0.0, 1.0)
    ring = (r2 > 0.845**2) & (r2 < 0.885**2) & ~((np.abs(g.u) < 0.18) & (g.v < 0))
    slope = 0.35 * (1.0 - np.cos(theta))
    frac = np.mod(g.z / period + slope + phase0, 1.0)
    rib = ring & (frac < 0.27) & (g.t < 0.95)
    bone[rib] = 650.0
    # Sternum.
    sternum = ((g.u / 0.12) ** 2 + ((g.v + 0.86) / 0.05) ** 2 <= 1.0) & (g.t > -0.6)
    bone[sternum] = np.maximum(bone[sternum], 500.0)
    # Vertebra: cancellous body with a cortical rim, discs every ~28 mm, arch around the canal.
    spine_y = g.cy + 0.55 * g.half_y
    rv = 0.11 * g.half_x
    rr = np.sqrt((g.x - g.cx) ** 2 + (g.y - spine_y) ** 2)  # (1,H,W)
    disc_period = rng.uniform(26.0, 32.0)
    disc = np.mod(g.z / disc_period + phase0, 1.0) < 0.18
    vbody = rr <= rv
    cortex = vbody & (rr > rv - 2.5)
    bone_vals = np.where(disc, -2000.0, np.where(cortex, 950.0, 330.0))  # (D,H,W)
    bone = np.where(vbody, np.maximum(bone, bone_vals), bone)
    hu[:, vbody[0]] = 80.0  # disc tissue where no bone is painted
    canal_y = spine_y + rv + 9.0
    rc = np.sqrt((g.x - g.cx) ** 2 + (g.y - canal_y) ** 2)
    arch = (rc > 7.0) & (rc < 12.5)
    spinous = (np.abs(g.x - g.cx) < 3.5) & (g.y > canal_y) & (g.y < canal_y + 30.0) & body
    bone[:, (arch | spinous)[0]] = np.maximum(bone[:, (arch | spinous)[0]], 700.0)
    hu[:, (rc <= 7.0)[0]] = 15.0
    # Descending aorta left-anterior of the spine.
    ao = np.sqrt((g.x - (g.cx + 0.12 * g.half_x)) ** 2 + (g.y - (spine_y - rv - 6.0)) ** 2)
    hu[:, (ao < 11.0)[0]] = 45.0
    return hu, cavity, bone


def make_phantom(
    *,
    seed: int,
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: tuple[float, float, float] = (5.0, 2.7, 2.7),
    pathology: str | None = None,
    realism: str = "easy",
    decoy: str | None = None,
) -> Phantom:
    """Draw a synthetic chest CT, optionally with one kind of pathology.

    Args:
        seed: everything (anatomy, lesion placement, noise) follows from it.
        shape: ``(D, H, W)`` voxels; the volume spans the chest from the lung
            bases to just above the apices whatever the shape.
        spacing: voxel size in mm along (D, H, W).
        pathology: ``None`` or one of :data:`PATHOLOGIES`.
        realism: ``"easy"`` (a lesion adds dense or air voxels to an otherwise
            similar lung, so intensity statistics nearly give the label away) or
            ``"matched"`` (normal studies carry the same distribution of dense and
            air voxels in shapes that are not lesions; see
            :mod:`ctscreen.synth.matched`).
        decoy: for a ``"matched"`` normal study, the kind whose voxel budget its
            normal variants take (default: drawn from the seed); ignored otherwise.

    Returns:
        The phantom, with ``hu`` clipped to the int16 CT range [-1024, 3071].

    Raises:
        ValueError: for an unknown pathology, decoy or realism, or a shape smaller
            than 8 voxels.
    """
    if pathology is not None and pathology not in PATHOLOGIES:
        raise ValueError(f"unknown pathology {pathology!r}; use one of {PATHOLOGIES}")
    if decoy is not None and decoy not in PATHOLOGIES:
        raise ValueError(f"unknown decoy kind {decoy!r}; use one of {PATHOLOGIES}")
    if realism not in REALISMS:
        raise ValueError(f"unknown realism {realism!r}; use one of {REALISMS}")
    if min(shape) < 8:
        raise ValueError(f"phantom shape {shape} is too small; use at least 8 voxels per axis")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    if realism == "matched":
        return _make_matched(
            seed=int(seed), shape=shape, spacing=spacing, pathology=pathology, decoy=decoy
        )
    rng = np.random.default_rng([int(seed), 7919])
    g = _grid(shape, spacing, rng)
    hu, cavity, bone = _body_and_bones(g, rng, shape)

    # Heart with a fat rim, mediastinum, liver below the right dome.
    hr = np.sqrt(
        ((g.u - rng.uniform(0.08, 0.16)) / 0.34) ** 2
        + ((g.v + rng.uniform(0.08, 0.18)) / 0.42) ** 2
        + ((g.t + rng.uniform(0.30, 0.42)) / 0.38) ** 2
    )
    heart = (hr <= 1.0) & cavity
    hu[(hr > 1.0) & (hr <= 1.08) & cavity] = -90.0
    hu[heart] = 40.0
    mediastinum = (np.abs(g.u) < 0.13) & (g.v < 0.45)
    right, left = _lung_shapes(rng)
    inner = (g.u * g.u + g.v * g.v) <= 0.82**2
    spine_guard = (np.abs(g.u) < 0.2) & (g.v > 0.4)
    keep_out = heart | mediastinum | spine_guard | ~inner
    abdomen = (g.t < right.dome_base + right.dome_height) & cavity & (g.u < 0.25)
    hu[abdomen & (hu == 40.0)] = 58.0  # liver

    lungs = {}
    for ls in (right, left):
        lungs[ls.side] = _lung_mask(g, ls) & ~keep_out
    lung_any = lungs[-1] | lungs[1]
    parenchyma = (-862.0 + 22.0 * (g.v + 1.0)).astype(np.float32)  # denser posteriorly
    hu = np.where(lung_any, parenchyma, hu)
    trachea = (np.sqrt((g.x - g.cx) ** 2 + (g.y - (g.cy - 0.1 * g.half_y)) ** 2) < 8.0) & (
        g.t > 0.25
    )
    hu[trachea] = -1000.0

    segments = [s for ls in (right, left) for s in _vessel_tree(g, ls, rng)]
    vessel_alpha = _rasterise(segments, g, spacing, shape)
    vessel_region = lung_any.copy()

    lesions: list[Lesion] = []
    side_idx = int(rng.integers(0, 2))
    side_shape = (right, left)[side_idx]
    side_name = ("right", "left")[side_idx]
    late_paint: list[tuple[np.ndarray, float]] = []

    if pathology == "nodule":
        count = int(rng.integers(1, 4))
        for _ in range(count):
            diameter = rng.uniform(12.0, 30.0)
            placed = _place_in_lung(lung_any, diameter / 2.0, spacing, rng)
            center_mm = np.array(
                [(placed[k] - (shape[k] - 1) / 2.0) * spacing[k] for k in range(3)]
            )
            radii = diameter / 2.0 * rng.uniform(0.85, 1.15, size=3)
            weight = _soft_ellipsoid(g, center_mm, radii)
            late_paint.append((weight, 30.0))
            side = "left" if center_mm[2] > g.cx else "right"
            lesion = _lesion_from_mask("nodule", weight >= 0.5, side, spacing)
            if lesion is not None:
                lesions.append(lesion)
    elif pathology == "ground_glass":
        for _ in range(int(rng.integers(1, 3))):
            diameter = rng.uniform(30.0, 60.0)
            placed = _place_in_lung(lung_any, diameter / 4.0, spacing, rng)
            center_mm = np.array(
                [(placed[k] - (shape[k] - 1) / 2.0) * spacing[k] for k in range(3)]
            )
            radii = diameter / 2.0 * rng.uniform(0.8, 1.2, size=3)
            weight = _soft_ellipsoid(g, center_mm, radii) * lung_any
            hu = hu + weight * (-500.0 - hu) * lung_any
            side = "left" if center_mm[2] > g.cx else "right"
            lesion = _lesion_from_mask("ground_glass", weight >= 0.5, side, spacing)
            if lesion is not None:
                lesions.append(lesion)
    elif pathology == "consolidation":
        lower = bool(rng.integers(0, 2))
        t_split = rng.uniform(-0.25, 0.05)
        lv = (g.v - side_shape.cv) / side_shape.av
        if lower:  # lower lobe: posterior-inferior of an oblique fissure
            region = (g.t - t_split) < 0.9 * lv
        else:  # upper lobe: anterior-superior
            region = (g.t - t_split) > 0.9 * lv + 0.25
        mask = lungs[side_shape.side] & region
        hu[mask] = 22.0
        airway = _rasterise(
            [s for s in segments if s.level <= 3], g, spacing, shape, radius_scale=0.45
        )
        late_paint.append((airway * mask, -900.0))
        vessel_region &= ~mask
        lesion = _lesion_from_mask("consolidation", mask, side_name, spacing)
        if lesion is not None:
            lesions.append(lesion)
    elif pathology == "effusion":
        sides = [side_shape] if rng.random() < 0.6 else [right, left]
        for ls in sides:
            depth = rng.uniform(35.0, 75.0) / g.half_y  # at the base, body units
            reach = rng.uniform(0.7, 1.1)  # how far up (t units) the layer reaches
            base = ls.dome_base
            frac = np.clip(1.0 - (g.t - base) / reach, 0.0, 1.0)
            level = ls.cv + ls.av - depth * frac
            mask = lungs[ls.side] & (g.v > level) & (frac > 0.0)
            hu[mask] = 10.0
            vessel_region &= ~mask
            lesion = _lesion_from_mask(
                "effusion", mask, "left" if ls.side > 0 else "right", spacing
            )
            if lesion is not None:
                lesions.append(lesion)
    elif pathology == "pneumothorax":
        shrink = rng.uniform(0.55, 0.78)
        collapsed = (
            _lung_mask(
                g,
                side_shape,
                shrink=shrink,
                shift_u=-side_shape.side * 0.08 * (1.0 - shrink),
                shift_v=0.25 * (1.0 - shrink),
            )
            & ~keep_out
        )
        rim = lungs[side_shape.side] & ~collapsed
        hu[rim] = -1000.0
        vessel_region &= ~rim
        lesion = _lesion_from_mask("pneumothorax", rim, side_name, spacing)
        if lesion is not None:
            lesions.append(lesion)

    hu = hu + (vessel_alpha * vessel_region) * (40.0 - hu)
    for weight, value in late_paint:
        hu = hu + weight * (value - hu)
    hu = np.maximum(hu, bone)
    sigma = rng.uniform(8.0, 18.0)
    hu = hu + rng.standard_normal(size=shape, dtype=np.float32) * np.float32(sigma)
    hu = np.clip(hu, HU_MIN, HU_MAX).astype(np.float32)
    return Phantom(
        hu=hu,
        spacing=spacing,
        pathology=pathology,
        label=0 if pathology is None else 1,
        lesions=tuple(lesions),
        seed=int(seed),
    )


def _place_in_lung(
    lung: np.ndarray,
    radius_mm: float,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    tries: int = 60,
) -> np.ndarray:
    """A voxel index inside ``lung`` whose neighbours ``radius_mm`` away are lung too."""
    flat = np.flatnonzero(lung)
    if flat.size == 0:
        return (np.asarray(lung.shape) - 1) / 2.0
    steps = [max(1, int(round(radius_mm / s))) for s in spacing]
    best, best_score = None, -1
    for _ in range(tries):
        idx = np.array(np.unravel_index(int(flat[rng.integers(0, flat.size)]), lung.shape))
        score = 0
        for axis in range(3):
            for sign in (-1, 1):
                probe = idx.copy()
                probe[axis] += sign * steps[axis]
                if 0 <= probe[axis] < lung.shape[axis] and lung[tuple(probe)]:
                    score += 1
        if score > best_score:
            best, best_score = idx, score
        if score == 6:
            break
    return np.asarray(best, dtype=np.float64)


# --- intensity-matched phantoms (realism="matched"; see ctscreen.synth.matched) ------------


@dataclass(frozen=True)
class _Chest:
    """The drawn anatomy of a matched phantom, before its budget finding."""

    hu: np.ndarray
    lungs: dict[int, np.ndarray]
    lung_any: np.ndarray
    airway: np.ndarray
    vessel: np.ndarray
    keep_out: np.ndarray
    shapes: tuple[_LungShape, _LungShape]
    t_split: dict[int, float]
    soft: float


def _matched_chest(
    g: _Grid,
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> tuple[_Chest, np.ndarray]:
    """Body, organs, lungs with normal variants; returns the chest and the bone layer."""
    hu, cavity, bone = _body_and_bones(g, rng, shape)
    # One soft-tissue density for the liver and a consolidated lung: a raised
    # hemidiaphragm (the consolidation's twin) then joins the liver without a seam.
    soft = float(rng.uniform(30.0, 62.0))
    hr = np.sqrt(
        ((g.u - rng.uniform(0.08, 0.16)) / rng.uniform(0.30, 0.38)) ** 2
        + ((g.v + rng.uniform(0.08, 0.18)) / 0.42) ** 2
        + ((g.t + rng.uniform(0.30, 0.42)) / 0.38) ** 2
    )
    heart = (hr <= 1.0) & cavity
    hu[(hr > 1.0) & (hr <= 1.08) & cavity] = -90.0
    hu[heart] = 40.0
    mediastinum = (np.abs(g.u) < rng.uniform(0.11, 0.15)) & (g.v < 0.45)
    right, left = _lung_shapes(rng)
    inner = (g.u * g.u + g.v * g.v) <= 0.82**2
    spine_guard = (np.abs(g.u) < 0.2) & (g.v > 0.4)
    keep_out = heart | mediastinum | spine_guard | ~inner
    abdomen = (g.t < right.dome_base + right.dome_height) & cavity & (g.u < 0.25)
    hu[abdomen & (hu == 40.0)] = soft
    lungs = {ls.side: _lung_mask(g, ls) & ~keep_out for ls in (right, left)}
    lung_any = lungs[-1] | lungs[1]

    # Inspiration level and gravity: the lung is denser posteriorly, more so in some.
    level = rng.uniform(-895.0, -815.0)
    slope = rng.uniform(8.0, 40.0)
    hu = np.where(lung_any, (level + slope * (g.v + 1.0)).astype(np.float32), hu)
    # Dependent density: a few mm to cm of denser lung along the posterior pleura.
    depth = posterior_depth_mm(lung_any, spacing[1])
    amplitude, reach = rng.uniform(0.0, 220.0), rng.uniform(6.0, 25.0)
    dependent = np.where(lung_any, amplitude * np.exp(-np.minimum(depth, 1e3) / reach), 0.0)
    hu = (hu + dependent).astype(np.float32)
    # Oblique fissures: thin planes, seen as faint partial-volume lines.
    t_split = {}
    for ls in (right, left):
        t_split[ls.side] = float(rng.uniform(-0.25, 0.05))
        lv = (g.v - ls.cv) / ls.av
        off_mm = np.abs((g.t - t_split[ls.side]) - 0.9 * lv) * g.half_z
        width = rng.uniform(0.6, 1.4) * spacing[0]
        fissure = lungs[ls.side] & (off_mm < width * 0.5)
        hu[fissure] += rng.uniform(120.0, 380.0)
    trachea = (np.sqrt((g.x - g.cx) ** 2 + (g.y - (g.cy - 0.1 * g.half_y)) ** 2) < 8.0) & (
        g.t > 0.25
    )
    hu[trachea] = -1000.0

    segments = [s for ls in (right, left) for s in _vessel_tree(g, ls, rng)]
    vessel_alpha = _rasterise(segments, g, spacing, shape, radius_scale=rng.uniform(0.8, 1.35))
    hu = hu + (vessel_alpha * lung_any) * (40.0 - hu)
    airway_alpha = _rasterise(
        [s for s in segments if s.level <= 3], g, spacing, shape, radius_scale=0.45
    )
    airway = (airway_alpha >= 0.5) & lung_any
    hu[airway] = -1000.0
    vessel = (vessel_alpha >= 0.5) & lung_any & ~airway
    chest = _Chest(
        hu=hu.astype(np.float32),
        lungs=lungs,
        lung_any=lung_any,
        airway=airway | trachea,
        vessel=vessel,
        keep_out=keep_out,
        shapes=(right, left),
        t_split=t_split,
        soft=soft,
    )
    return chest, bone


def _side_name(side: int) -> str:
    return "left" if side > 0 else "right"


def _budget(
    kind: str,
    chest: _Chest,
    g: _Grid,
    rng: np.random.Generator,
    spacing: tuple[float, float, float],
) -> Budget:
    """Draw one finding of ``kind`` on ``chest`` (without painting it)."""
    hu = chest.hu.copy()
    shape = hu.shape
    side_shape = chest.shapes[int(rng.integers(0, 2))]
    masks: list[np.ndarray] = []
    sides: list[str] = []
    if kind in ("nodule", "ground_glass"):
        nodule = kind == "nodule"
        count = int(rng.integers(1, 4)) if nodule else int(rng.integers(1, 3))
        for _ in range(count):
            diameter = rng.uniform(8.0, 30.0) if nodule else rng.uniform(25.0, 60.0)
            target = rng.uniform(10.0, 60.0) if nodule else rng.uniform(-650.0, -350.0)
            placed = _place_in_lung(
                chest.lung_any, diameter / (2.0 if nodule else 4.0), spacing, rng
            )
            center_mm = np.array(
                [(placed[k] - (shape[k] - 1) / 2.0) * spacing[k] for k in range(3)]
            )
            radii = diameter / 2.0 * rng.uniform(0.85, 1.15, size=3)
            weight = _soft_ellipsoid(g, center_mm, radii) * chest.lung_any
            hu = hu + weight * (target - hu)
            masks.append(weight >= 0.5)
            sides.append("left" if center_mm[2] > g.cx else "right")
    elif kind == "consolidation":
        lower = bool(rng.integers(0, 2))
        lv = (g.v - side_shape.cv) / side_shape.av
        t_split = chest.t_split[side_shape.side]
        if lower:  # posterior-inferior of the oblique fissure
            region = (g.t - t_split) < 0.9 * lv
        else:  # anterior-superior of it
            region = (g.t - t_split) > 0.9 * lv
        lobe = chest.lungs[side_shape.side] & region & ~chest.airway
        # A segment to a whole lobe: the share of the lobe nearest a seed point in it.
        flat = np.flatnonzero(lobe)
        mask = np.zeros(shape, dtype=bool)
        if flat.size:
            seed_idx = np.unravel_index(int(flat[rng.integers(0, flat.size)]), shape)
            seed_mm = [(seed_idx[k] - (shape[k] - 1) / 2.0) * spacing[k] for k in range(3)]
            dist = (g.z - seed_mm[0]) ** 2 + (g.y - seed_mm[1]) ** 2 + (g.x - seed_mm[2]) ** 2
            keep = max(1, int(round(flat.size * rng.uniform(0.3, 1.0))))
            order = np.argsort(np.broadcast_to(dist, shape).reshape(-1)[flat], kind="stable")
            mask.reshape(-1)[flat[order[:keep]]] = True
        hu[mask] = chest.soft
        masks.append(mask)
        sides.append(_side_name(side_shape.side))
    elif kind == "effusion":
        both = rng.random() >= 0.6
        fluid = rng.uniform(0.0, 20.0)
        for ls in chest.shapes if both else (side_shape,):
            depth = rng.uniform(30.0, 75.0) / g.half_y
            reach = rng.uniform(0.5, 1.0)
            frac = np.clip(1.0 - (g.t - ls.dome_base) / reach, 0.0, 1.0)
            level = ls.cv + ls.av - depth * frac
            mask = chest.lungs[ls.side] & (g.v > level) & (frac > 0.0)
            hu[mask] = fluid
            masks.append(mask)
            sides.append(_side_name(ls.side))
    elif kind == "pneumothorax":
        shrink = rng.uniform(0.6, 0.9)
        collapsed = (
            _lung_mask(
                g,
                side_shape,
                shrink=shrink,
                shift_u=-side_shape.side * 0.08 * (1.0 - shrink),
                shift_v=0.25 * (1.0 - shrink),
            )
            & ~chest.keep_out
        )
        mask = chest.lungs[side_shape.side] & ~collapsed
        hu[mask] = -1000.0
        masks.append(mask)
        sides.append(_side_name(side_shape.side))
    else:  # pragma: no cover - make_phantom checked the kind
        raise ValueError(f"unknown kind {kind!r}")
    changed = np.abs(hu - chest.hu) > 0.5
    for m in masks:
        changed |= m
    if not changed.any():  # a degenerate draw: one voxel, so that a twin exists too
        changed.reshape(-1)[np.flatnonzero(chest.lung_any)[:1]] = True
    return Budget(
        kind=kind,
        masks=tuple(masks),
        sides=tuple(sides),
        values=hu.reshape(-1)[np.flatnonzero(changed)].astype(np.float32),
        changed=changed,
    )


def _paint_budget(chest: _Chest, budget: Budget) -> np.ndarray:
    """The chest with the finding painted in (a pathological study)."""
    hu = chest.hu.copy()
    hu.reshape(-1)[np.flatnonzero(budget.changed)] = budget.values
    return hu


def _paint_twin(
    chest: _Chest,
    budget: Budget,
    g: _Grid,
    rng: np.random.Generator,
    spacing: tuple[float, float, float],
) -> np.ndarray:
    """The chest with the finding's voxel budget spent on normal variants (a normal study)."""
    hu = chest.hu.copy()
    lung = chest.lung_any & ~chest.airway

    def near(region: np.ndarray) -> np.ndarray:
        # A finding's blurred rim reaches a voxel or two past the lung (into the
        # chest wall or a vessel); the twin may match those values there too.
        return region | (ndimage.binary_dilation(region, iterations=2) & ~chest.airway)

    if budget.kind == "consolidation":
        # Raised hemidiaphragm(s): the lowest lung of each column, one side higher.
        above = np.cumsum(chest.lung_any, axis=0).astype(np.float32) * np.float32(spacing[0])
        raised = int(rng.choice([-1, 1]))
        bias = np.where(g.u * raised > 0, rng.uniform(0.0, 40.0), 0.0).astype(np.float32)
        paint_twin(hu, budget, -above + bias, near(lung))
    elif budget.kind == "effusion":
        # Dependent atelectasis: an even band along the whole posterior lung.
        region = np.zeros_like(lung)
        for s in (-1, 1):
            if _side_name(s) in budget.sides:
                region |= chest.lungs[s]
        depth = posterior_depth_mm(chest.lung_any, spacing[1])
        paint_twin(hu, budget, -np.minimum(depth, 1e4), near(region & lung))
    elif budget.kind == "pneumothorax":
        # Wider airways: the lung next to the bronchial tree becomes air.
        score = -distance_mm(chest.airway, spacing)
        paint_twin(hu, budget, score, near(lung), densest_first=False)
    elif budget.kind == "nodule":
        # Thicker vessels: the lung next to the vessel tree, densest nearest it.
        score = -distance_mm(chest.vessel, spacing)
        paint_twin(hu, budget, score, near(lung))
    else:  # ground glass: dependent density, densest at the back
        depth = posterior_depth_mm(chest.lung_any, spacing[1])
        paint_twin(hu, budget, -np.minimum(depth, 1e4), near(lung))
    return hu


def _make_matched(
    *,
    seed: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    pathology: str | None,
    decoy: str | None,
) -> Phantom:
    """A phantom whose HU histogram does not tell whether it holds a lesion."""
    rng = np.random.default_rng([seed, 7919, 2])
    g = _grid(shape, spacing, rng)
    chest, bone = _matched_chest(g, rng, shape, spacing)
    kind = pathology or decoy or str(rng.choice(PATHOLOGIES))
    drawn = _budget(kind, chest, g, rng, spacing)
    plane_sigma, breath_sigma = rng.uniform(0.3, 0.9), rng.uniform(0.0, 1.2)
    breath_top = rng.uniform(-0.4, 0.2)

    def blurred(hu: np.ndarray) -> np.ndarray:
        hu = in_plane_blur(np.maximum(hu, bone), plane_sigma)
        return breathing_blur(hu, g.t, breath_sigma, breath_top)

    # The scanner blurs a lesion's edge into a rim of in-between values; the budget
    # holds those too, so that a twin spends the same values (its rim is where the
    # twin's ranking ends, which grades its edge the same way).
    base = blurred(chest.hu)
    sick = blurred(_paint_budget(chest, drawn))
    changed = (np.abs(sick - base) > 1.0) | drawn.changed
    where = np.flatnonzero(changed)
    budget = replace(
        drawn,
        values=sick.reshape(-1)[where],
        changed=changed,
        old_values=base.reshape(-1)[where],
    )
    lesions: list[Lesion] = []
    if pathology is None:
        hu = _paint_twin(replace(chest, hu=base), budget, g, rng, spacing)
    else:
        hu = sick
        for mask, side in zip(drawn.masks, drawn.sides, strict=True):
            lesion = _lesion_from_mask(pathology, mask, side, spacing)
            if lesion is not None:
                lesions.append(lesion)
    sigma = rng.uniform(8.0, 18.0)
    hu = hu + rng.standard_normal(size=shape, dtype=np.float32) * np.float32(sigma)
    hu = np.clip(hu, HU_MIN, HU_MAX).astype(np.float32)
    return Phantom(
        hu=hu,
        spacing=spacing,
        pathology=pathology,
        label=0 if pathology is None else 1,
        lesions=tuple(lesions),
        seed=int(seed),
    )
