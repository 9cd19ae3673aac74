"""A visual HTML report of a prediction run: one ``index.html`` a person can open and read.

Per scored series the report shows the decision, why that series was chosen,
the per-slice score curve and a strip of key axial slices with the class
activation map overlaid, all taken from the one forward pass that gave the
probability (:mod:`ctscreen.explain`). Failure rows show their error sentence.

Memory stays bounded whatever the number of studies: :meth:`ReportWriter.add`
renders a series' two PNGs as soon as its forward pass is done and writes them to
``<out>/img/``; only file names and a few numbers are kept. :meth:`ReportWriter.finish`
then writes ``index.html``. When all pictures together stay under
:data:`EMBED_LIMIT_BYTES` they are embedded as base64 and ``img/`` is removed, so
the report is one self-contained file; a larger run links to ``img/`` instead.

Key slices are drawn from the study's own pixels at their native resolution when
the results carry their volume (``Screener.score(..., keep_volume=True)``), in the
model card's HU window, with the activation map resampled onto each slice and
shown only inside the body (the largest connected region denser than
:data:`BODY_HU`, holes filled), never on the air around the patient or outside the
scanner's field of view. Without the volume they are drawn from the network input.
Orientation is canonical: anterior at the top, the patient's right on the viewer's
left. When the slice scores are flat (spread below :data:`FLAT_SPREAD`) no slice
stands out, and the report says so and shows slices spread evenly instead of a
ranking that would only reflect noise.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .config import PreprocessConfig
from .errors import ConfigError, cannot_write
from .explain import box_in_voxels, slice_scores
from .fileio import write_text_atomic
from .results import StudyResult
from .volume import Volume

log = logging.getLogger(__name__)

#: Pictures are embedded as base64 while their total size stays at or below this.
EMBED_LIMIT_BYTES = 20 * 2**20
#: Highest-scoring slices shown per series (plus one reference slice).
TOP_SLICES = 4
#: Slice scores spanning less than this (probability units) single out no slice.
FLAT_SPREAD = 0.05
#: Voxels above this HU belong to the patient (air, lung parenchyma inside the body is
#: recovered by filling holes; the field-of-view padding is far below it).
BODY_HU = -500.0
#: Activation below this share of the series' maximum is left transparent.
OVERLAY_FLOOR = 0.2
OVERLAY_CMAP = "YlOrRd"
OVERLAY_ALPHA = 0.75
CLINICAL_NOTE = (
    "Research tool, not for clinical use. The probabilities, heat maps and boxes come "
    "from a machine-learning model; they are not a diagnosis and must not guide patient care."
)
_DPI = 90
_IMG_DIR = "img"
_DASH = "\u2013"


# --------------------------------------------------------------------------- pure geometry


@dataclass(frozen=True)
class KeySlice:
    """One axial slice chosen for the strip.

    Attributes:
        input_index: index along depth of the network input.
        slice_index: the canonical slice (0 = feet end) nearest its centre.
        score: per-slice score of ``slice_index``.
        role: ``"top"`` (among the highest-scoring) or ``"reference"`` (lowest-scoring).
        rank: 1 for the highest-scoring slice, 2 for the next, ...; 0 for the reference.
    """

    input_index: int
    slice_index: int
    score: float
    role: str
    rank: int


def interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear resampling weights ``[n_out, n_in]`` between two grids spanning one interval.

    Both grids use voxel-centre alignment: cell ``i`` of ``n`` sits at ``(i + 0.5) / n``;
    points beyond the outer centres take the outer value.
    """
    pos = (np.arange(n_out) + 0.5) / n_out * n_in - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    weights = np.zeros((n_out, n_in))
    weights[np.arange(n_out), lo] += 1.0 - frac
    weights[np.arange(n_out), hi] += frac
    return weights


def cam_on_slice(cam: np.ndarray, input_index: int, input_shape: Sequence[int]) -> np.ndarray:
    """The activation map at one input slice, resampled to the input's in-plane size.

    Args:
        cam: ``[d', h', w']`` activation map.
        input_index: depth index of the network input.
        input_shape: ``(D', H', W')`` of the network input.

    Returns:
        float64 ``[H', W']``, in the cam's units.
    """
    depth, height, width = (int(s) for s in input_shape)
    d, h, w = cam.shape
    along_depth = interpolation_matrix(depth, d)[input_index] @ cam.reshape(d, h * w)
    plane = along_depth.reshape(h, w)
    return interpolation_matrix(height, h) @ plane @ interpolation_matrix(width, w).T


def input_to_slice(input_index: int, n_input: int, n_slices: int) -> int:
    """The canonical slice nearest the centre of an input depth index."""
    centre = (input_index + 0.5) / n_input * n_slices - 0.5
    return int(min(max(round(centre), 0), n_slices - 1))


def pick_key_slices(
    input_scores: np.ndarray, slice_score: np.ndarray, *, top: int = TOP_SLICES
) -> tuple[KeySlice, ...]:
    """Choose the highest-scoring input slices, spread out, plus the lowest as reference.

    Args:
        input_scores: score of every input depth index.
        slice_score: score of every canonical slice.
        top: how many high-scoring slices.

    Returns:
        ``top`` (fewer for thin inputs) slices by falling score, then one reference
        slice (when the input has room for it). Chosen slices lie at least
        ``max(1, D' // 16)`` input slices apart, so the strip shows more than one
        neighbourhood.
    """
    n_input = len(input_scores)
    gap = max(1, n_input // 16)
    chosen: list[int] = []
    for index in np.argsort(-input_scores, kind="stable"):
        if len(chosen) == top:
            break
        if all(abs(int(index) - c) >= gap for c in chosen):
            chosen.append(int(index))
    reference = None
    for index in np.argsort(input_scores, kind="stable"):
        if all(abs(int(index) - c) >= gap for c in chosen):
            reference = int(index)
            break
    n_slices = len(slice_score)
    picks = []
    for rank, index in enumerate(chosen, start=1):
        s = input_to_slice(index, n_input, n_slices)
        picks.append(KeySlice(index, s, float(slice_score[s]), "top", rank))
    if reference is not None:
        s = input_to_slice(reference, n_input, n_slices)
        picks.append(KeySlice(reference, s, float(slice_score[s]), "reference", 0))
    return tuple(picks)


def scores_are_flat(slice_score: np.ndarray, spread: float = FLAT_SPREAD) -> bool:
    """Whether the per-slice scores span less than ``spread`` (no slice stands out)."""
    values = np.asarray(slice_score, dtype=np.float64)
    return bool(values.size == 0 or float(values.max() - values.min()) < spread)


def even_key_slices(
    n_input: int, slice_score: np.ndarray, *, count: int = TOP_SLICES
) -> tuple[KeySlice, ...]:
    """``count`` input slices spread evenly over the depth (for flat scores), feet first."""
    n_slices = len(slice_score)
    indices = sorted({int(i) for i in np.linspace(0, n_input - 1, count + 2)[1:-1].round()})
    picks = []
    for rank, index in enumerate(indices, start=1):
        s = input_to_slice(index, n_input, n_slices)
        picks.append(KeySlice(index, s, float(slice_score[s]), "even", rank))
    return tuple(picks)


def body_mask(hu: np.ndarray, threshold: float = BODY_HU) -> np.ndarray:
    """The patient's body on one axial slice: the largest region above ``threshold`` HU,
    holes (the lungs, airways) filled. Air outside the body, the table when it does not
    touch the patient, and the padding outside the field of view are left out.

    Args:
        hu: ``[H, W]`` slice in HU.

    Returns:
        bool ``[H, W]``.
    """
    from scipy import ndimage

    solid = np.asarray(hu) > threshold
    labels, n = ndimage.label(solid)
    if n == 0:
        return np.zeros(solid.shape, dtype=bool)
    sizes = ndimage.sum_labels(solid, labels, index=np.arange(1, n + 1))
    largest = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(largest)


def cam_on_native_slice(
    cam: np.ndarray, slice_index: int, n_slices: int, plane: Sequence[int]
) -> np.ndarray:
    """The activation map at one canonical slice, resampled to that slice's own pixels.

    The network input is the whole volume resized, so the map's grid spans the
    same extent as the volume: resampling cell centres onto voxel centres aligns them.

    Returns:
        float64 ``[H, W]`` for ``plane = (H, W)``, in the map's units.
    """
    d, h, w = cam.shape
    along_depth = interpolation_matrix(int(n_slices), d)[slice_index] @ cam.reshape(d, h * w)
    height, width = (int(s) for s in plane)
    return (
        interpolation_matrix(height, h)
        @ along_depth.reshape(h, w)
        @ (interpolation_matrix(width, w).T)
    )


def native_slice_png(
    hu: np.ndarray, heat: np.ndarray | None, *, vmax: float, window: tuple[float, float]
) -> bytes:
    """One axial slice at its own resolution (one PNG pixel per CT pixel), windowed to
    ``window = (level, width)`` HU, with ``heat`` overlaid inside the body only."""
    from matplotlib.image import imsave

    level, width = window
    gray = np.clip((np.asarray(hu, dtype=np.float64) - (level - width / 2.0)) / width, 0.0, 1.0)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if heat is not None and vmax > 0:
        rgba = overlay_rgba(heat, vmax)
        alpha = rgba[..., 3:4] * body_mask(hu)[..., None]
        rgb = rgb * (1.0 - alpha) + rgba[..., :3] * alpha
    buffer = io.BytesIO()
    imsave(buffer, np.clip(rgb, 0.0, 1.0), format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------- pictures


def _png(fig: Figure) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _slice_z_mm(volume: Volume) -> tuple[float, float] | None:
    """``(z0, dz)`` so that canonical slice ``i`` lies at about ``z0 + i * dz`` mm (LPS z)."""
    dz = float(volume.affine[2, 0])
    if abs(dz) < 1e-6:
        return None
    centre_hw = np.array([0.0, (volume.shape[1] - 1) / 2, (volume.shape[2] - 1) / 2, 1.0])
    return float((volume.affine @ centre_hw)[2]), dz


def render_curve(
    scores: np.ndarray,
    *,
    probability: float,
    threshold: float,
    key_slices: Sequence[KeySlice],
    volume: Volume,
    box_voxels: np.ndarray | None,
) -> bytes:
    """The per-slice score curve as PNG bytes.

    Args:
        scores: score of every canonical slice (0 = feet end).
        probability: the study probability (drawn as a horizontal line).
        threshold: the decision threshold (drawn as a dashed line).
        key_slices: slices shown in the strip (marked on the curve).
        volume: geometry, for the z axis in mm on top.
        box_voxels: the localisation box from :func:`box_in_voxels`, or None.
    """
    fig = Figure(figsize=(10.5, 3.3), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(scores))
    if box_voxels is not None:
        ax.axvspan(
            box_voxels[0, 0],
            box_voxels[0, 1],
            color="#4fc3f7",
            alpha=0.25,
            label="localisation box (z range)",
        )
    ax.plot(x, scores, color="#1f3b73", lw=2, label="slice score")
    ax.axhline(
        threshold,
        color="#b00020",
        ls="--",
        lw=1.3,
        label=f"threshold {format_probability(threshold, None)}",
    )
    ax.axhline(
        probability,
        color="#2e7d32",
        ls=":",
        lw=1.8,
        label=f"study probability {format_probability(probability, threshold)}",
    )
    for key in key_slices:
        text = "ref" if key.role == "reference" else str(key.rank)
        ax.annotate(
            text,
            (key.slice_index, key.score),
            xytext=(0, 9),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color="#444",
        )
        ax.plot([key.slice_index], [key.score], "o", ms=4, color="#444")
    ax.set_xlim(-0.5, max(len(scores) - 0.5, 0.5))
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("slice index (canonical order: 0 = feet end \u2192 head)")
    ax.set_ylabel("slice score (0\u20131)")
    ax.set_title("Per-slice pathology score (numbers: slices shown below)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    z = _slice_z_mm(volume)
    if z is not None:
        z0, dz = z
        top = ax.secondary_xaxis("top", functions=(lambda i: z0 + i * dz, lambda v: (v - z0) / dz))
        top.set_xlabel("table position z (mm, patient coordinates)", fontsize=8)
        top.tick_params(labelsize=8)
    return _png(fig)


def render_strip(
    result: StudyResult,
    key_slices: Sequence[KeySlice],
    *,
    box_voxels: np.ndarray | None,
    window: tuple[float, float],
    note: str = "",
    panel: float = 2.25,
) -> bytes:
    """Key axial slices with the activation map overlaid, as PNG bytes.

    Args:
        result: the scored series (its network input, activation map and geometry).
        key_slices: which slices, in display order.
        box_voxels: the localisation box from :func:`box_in_voxels`, or None.
        window: ``(level, width)`` in HU of the network input, for the title.
        note: a line drawn in bold red at the bottom (the DICOM key images'
            "not for diagnosis" warning); none when empty.
        panel: width of one slice panel in inches.
    """
    image = result.image
    volume = result.geometry
    assert image is not None and volume is not None and result.cam is not None
    cam = np.nan_to_num(np.asarray(result.cam, dtype=np.float64))
    peak = float(cam.max())
    vmax = peak if peak > 0 else 1.0
    _, height_mm, width_mm = (n * s for n, s in zip(volume.shape, volume.spacing, strict=True))
    n = max(len(key_slices), 1)
    aspect = height_mm / width_mm if width_mm > 0 else 1.0
    fig = Figure(figsize=(panel * n + 1.0, panel * aspect + 0.9), layout="constrained")
    axes = fig.subplots(1, n + 1, width_ratios=[1.0] * n + [0.06], squeeze=False)[0]
    extent = (0.0, width_mm, height_mm, 0.0)
    level, width = window
    for ax, key in zip(axes[:-1], key_slices, strict=False):
        ax.imshow(
            image[key.input_index],
            cmap="gray",
            vmin=0.0,
            vmax=1.0,
            extent=extent,
            interpolation="bilinear",
        )
        if peak > 0:
            heat = cam_on_slice(cam, key.input_index, image.shape)
            ax.imshow(overlay_rgba(heat, vmax), extent=extent, interpolation="bilinear")
        if box_voxels is not None and box_voxels[0, 0] <= key.slice_index <= box_voxels[0, 1]:
            (h0, h1), (w0, w1) = box_voxels[1], box_voxels[2]
            sy, sx = volume.spacing[1], volume.spacing[2]
            ax.add_patch(
                Rectangle(
                    ((w0 + 0.5) * sx, (h0 + 0.5) * sy),
                    (w1 - w0) * sx,
                    (h1 - h0) * sy,
                    fill=False,
                    ec="#00e5ff",
                    lw=1.6,
                    ls="--",
                )
            )
        ref = volume.slices[key.slice_index] if key.slice_index < len(volume.slices) else None
        number = f", InstanceNumber {ref.instance_number}" if ref and ref.instance_number else ""
        label = "reference (lowest score)" if key.role == "reference" else f"#{key.rank} highest"
        ax.set_title(f"{label}\nslice {key.slice_index}{number}\nscore {key.score:.3f}", fontsize=8)
        _decorate_axial(ax, width_mm, height_mm)
        ax.set_xlim(0.0, width_mm)  # drawn lines and boxes must not widen the view
        ax.set_ylim(height_mm, 0.0)
    for ax in axes[len(key_slices) : -1]:
        ax.set_axis_off()
    colorbar_ax = axes[-1]
    if peak > 0:
        mappable = ScalarMappable(norm=Normalize(0.0, vmax), cmap=colormaps[OVERLAY_CMAP])
        bar = fig.colorbar(mappable, cax=colorbar_ax)
        bar.set_label("pathology evidence\n(logit units per cell)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    else:
        colorbar_ax.set_axis_off()
        fig.text(
            0.99, 0.5, "no positive evidence", rotation=90, va="center", ha="right", fontsize=8
        )
    fig.suptitle(
        f"Key axial slices, lung window L {level:g} / W {width:g} HU"
        + ("\n" if n == 1 else ", ")  # one panel is too narrow for one line
        + "activation map overlaid"
        + ("; dashed box: localisation" if box_voxels is not None else ""),
        fontsize=10,
    )
    if note:
        fig.supxlabel(note, fontsize=10, fontweight="bold", color="#b00020")
    return _png(fig)


def overlay_rgba(heat: np.ndarray, vmax: float) -> np.ndarray:
    """RGBA picture of the positive activation: colour and opacity grow with its value.

    Values below ``OVERLAY_FLOOR * vmax`` are fully transparent, so the anatomy
    stays visible where the model found nothing.
    """
    floor = OVERLAY_FLOOR * vmax
    rgba = colormaps[OVERLAY_CMAP](np.clip(heat / vmax, 0.0, 1.0))
    strength = np.clip((heat - floor) / max(vmax - floor, 1e-12), 0.0, 1.0)
    rgba[..., 3] = OVERLAY_ALPHA * strength**0.6
    return rgba


def _decorate_axial(ax: Any, width_mm: float, height_mm: float) -> None:
    """Orientation letters and a scale bar on an axial panel."""
    ax.set_xticks([])
    ax.set_yticks([])
    style = dict(color="white", fontsize=7, fontweight="bold")
    ax.text(width_mm / 2, height_mm * 0.03, "A", ha="center", va="top", **style)
    ax.text(width_mm / 2, height_mm * 0.97, "P", ha="center", va="bottom", **style)
    ax.text(width_mm * 0.02, height_mm / 2, "R", ha="left", va="center", **style)
    ax.text(width_mm * 0.98, height_mm / 2, "L", ha="right", va="center", **style)
    bar = 50.0 if width_mm >= 150 else 10.0
    x0, y0 = width_mm * 0.05, height_mm * 0.92
    ax.plot([x0, x0 + bar], [y0, y0], color="white", lw=2)
    ax.text(x0 + bar / 2, y0 - height_mm * 0.015, f"{bar:g} mm", ha="center", va="bottom", **style)


# --------------------------------------------------------------------------- the writer


@dataclass
class _Pictures:
    """File names of one series' pictures, kept until the HTML is written."""

    curve: str
    strip: str
    key_slices: tuple[KeySlice, ...]
    native: tuple[str, ...] = ()
    flat: bool = False
    pixel_mm: tuple[float, float] = (0.0, 0.0)


@dataclass
class _Entry:
    """One card of the report: a scored series or a failure (its arrays already dropped)."""

    result: StudyResult
    pictures: _Pictures | None = None


class ReportWriter:
    """Builds the HTML report of one run, a study at a time.

    Example:
        >>> writer = ReportWriter(Path("report"))  # doctest: +SKIP
        >>> for result in screener.score(inputs, keep_image=True):  # doctest: +SKIP
        ...     writer.add(result)
        >>> writer.finish(run_info=screener.run_info())  # doctest: +SKIP
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        embed_limit: int = EMBED_LIMIT_BYTES,
        window: tuple[float, float] | None = None,
    ) -> None:
        """Prepare ``out_dir`` (created if missing).

        Args:
            out_dir: folder for ``index.html`` (and ``img/`` while the run lasts).
            embed_limit: embed the pictures as base64 when they total at most this many bytes.
            window: ``(level, width)`` in HU of the network input (default: the
                default preprocessing's lung window).

        Raises:
            ConfigError: the folder cannot be created or written.
        """
        self.out_dir = Path(out_dir)
        self.img_dir = self.out_dir / _IMG_DIR
        self.embed_limit = embed_limit
        default = PreprocessConfig()
        self.window = window or (default.window_level, default.window_width)
        self._entries: list[_Entry] = []
        self._bytes = 0
        try:
            self.img_dir.mkdir(parents=True, exist_ok=True)
            for old in self.img_dir.glob("series-*.png"):  # pictures of an earlier run
                old.unlink()
        except OSError as exc:
            raise cannot_write(f"the HTML report into {self.out_dir}", exc) from exc

    def add(self, result: StudyResult) -> None:
        """Add one study's card; render its pictures now when it carries its activation
        map and network input (``Screener.score(..., keep_image=True)``), keeping only
        their file names so that memory stays bounded by one study.

        Raises:
            ConfigError: a picture cannot be written.
        """
        pictures = None
        if result.ok and result.image is not None and result.cam is not None:
            pictures = self._render(result, f"series-{len(self._entries):05d}")
        self._entries.append(_Entry(result.without_maps(), pictures))

    def _render(self, result: StudyResult, stem: str) -> _Pictures:
        volume, cam, image = result.geometry, result.cam, result.image
        assert volume is not None and cam is not None and image is not None
        assert result.bias is not None and result.probability is not None
        scores = slice_scores(cam, result.bias, volume.shape[0])
        input_scores = slice_scores(cam, result.bias, image.shape[0])
        flat = scores_are_flat(scores)
        if flat:
            keys = even_key_slices(image.shape[0], scores)
        else:
            keys = pick_key_slices(input_scores, scores)
        box_voxels = None if result.box is None else box_in_voxels(result.box, volume)
        curve = render_curve(
            scores,
            probability=result.probability,
            threshold=float(result.threshold if result.threshold is not None else 0.5),
            key_slices=keys,
            volume=volume,
            box_voxels=box_voxels,
        )
        pictures: dict[str, bytes] = {f"{stem}-curve.png": curve}
        native: list[str] = []
        if result.volume is not None:
            # The study's own pixels: one PNG per key slice, one pixel per CT pixel.
            hu = result.volume.hu
            peak = float(np.nan_to_num(cam).max())
            for key in keys:
                heat = cam_on_native_slice(
                    np.nan_to_num(np.asarray(cam, dtype=np.float64)),
                    key.slice_index,
                    hu.shape[0],
                    hu.shape[1:],
                )
                name = f"{stem}-slice{key.slice_index:04d}.png"
                pictures[name] = native_slice_png(
                    hu[key.slice_index], heat, vmax=peak, window=self.window
                )
                native.append(name)
            strip_name = ""
        else:
            strip_name = f"{stem}-slices.png"
            pictures[strip_name] = render_strip(
                result, keys, box_voxels=box_voxels, window=self.window
            )
        try:
            for name, data in pictures.items():
                (self.img_dir / name).write_bytes(data)
        except OSError as exc:
            raise ConfigError(
                f"cannot write report pictures into {self.img_dir} ({exc.strerror or exc}); "
                "free some disk space or choose another --report folder."
            ) from exc
        self._bytes += sum(len(data) for data in pictures.values())
        # by UID: a location may be a folder named after the patient
        log.debug("rendered report pictures for study %s", result.study_uid or "(no UID)")
        spacing = (float(volume.spacing[1]), float(volume.spacing[2]))
        return _Pictures(f"{stem}-curve.png", strip_name, keys, tuple(native), flat, spacing)

    def finish(self, *, run_info: Mapping[str, Any]) -> Path:
        """Write ``index.html`` for every study added.

        Args:
            run_info: facts about the run (version, weights hash, threshold, device, ...).

        Returns:
            The path of ``index.html``.

        Raises:
            ConfigError: the report cannot be written.
        """
        embed = self._bytes <= self.embed_limit
        page = _page(self._entries, run_info, image_src=self._embedded if embed else self._linked)
        index = self.out_dir / "index.html"
        try:
            write_text_atomic(index, page)
            if embed:
                for entry in self._entries:
                    if entry.pictures is not None:
                        names = (entry.pictures.curve, entry.pictures.strip, *entry.pictures.native)
                        for name in filter(None, names):
                            (self.img_dir / name).unlink(missing_ok=True)
                if not any(self.img_dir.iterdir()):
                    self.img_dir.rmdir()
        except OSError as exc:
            raise cannot_write(f"the HTML report {index}", exc) from exc
        log.info(
            "wrote the HTML report %s (%d cards, pictures %s)",
            index,
            len(self._entries),
            "embedded" if embed else f"in {self.img_dir}",
        )
        return index

    def _embedded(self, name: str) -> str:
        data = (self.img_dir / name).read_bytes()
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")

    def _linked(self, name: str) -> str:
        return f"{_IMG_DIR}/{name}"


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 background:#f4f5f7;color:#1d2329;line-height:1.45}
main{max-width:1240px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:1.7em}h2{font-size:1.25em;margin:28px 0 10px}
.banner{background:#fdecea;border:2px solid #c62828;border-radius:6px;padding:10px 14px;
 color:#8a1c12;font-weight:600;margin:12px 0}.banner ul{margin:4px 0}
.borderline{background:#ef6c00}
.keys{display:flex;flex-wrap:wrap;gap:12px}.keys figure{margin:0}
.keys img{max-width:100%;height:auto;image-rendering:auto}
.note{background:#fff4d6;border:1px solid #e7c76b;border-left:6px solid #d9a400;
 padding:10px 14px;border-radius:6px;font-weight:600}
.muted{color:#5c6670;font-size:.9em}
table{border-collapse:collapse;background:#fff;border-radius:6px;overflow:hidden;
 box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e6e8eb;vertical-align:top}
th{background:#eef0f3;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:.85em;
 word-break:break-all}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:700;
 font-size:.9em;color:#fff;white-space:nowrap}
.pathology{background:#c62828}.normal{background:#2e7d32}.failure{background:#6d4c41}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);
 margin:18px 0;padding:16px 20px;border-left:8px solid #999}
.card.pathology{border-left-color:#c62828;background:#fff}
.card.normal{border-left-color:#2e7d32;background:#fff}
.card.failure{border-left-color:#6d4c41;background:#fff}
.card h3{margin:0 0 10px;display:flex;gap:12px;align-items:center;flex-wrap:wrap;
 font-size:1.1em}
.prob{font-size:1.25em;font-weight:700;font-variant-numeric:tabular-nums}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;margin:0 0 10px}
dt{color:#5c6670}dd{margin:0;overflow-wrap:anywhere}
.error{background:#fdecea;border:1px solid #f5c2bd;padding:8px 12px;border-radius:6px;
 color:#8a1c12;font-weight:600}
.warn{background:#fff8e1;border:1px solid #f1dc9c;padding:6px 12px;border-radius:6px}
.warn ul{margin:4px 0;padding-left:20px}
figure{margin:10px 0}figure img{max-width:100%;height:auto;display:block}
figcaption{color:#5c6670;font-size:.85em}
a{color:#1f4fa0}
table.run th{white-space:nowrap}table.run td{max-width:420px;overflow-wrap:anywhere}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _decision(entry: _Entry) -> tuple[str, str]:
    """(css class, text) of an entry's decision."""
    if not entry.result.ok:
        return "failure", "Failure (not scored)"
    if entry.result.pathology == 1:
        return "pathology", "Pathology"
    return "normal", "No pathology"


def format_probability(probability: float, threshold: float | None) -> str:
    """The probability with 3 decimals, or more when 3 would hide which side of the threshold
    it lies on."""
    for digits in range(3, 7):
        if threshold is None or round(probability, digits) != round(threshold, digits):
            break
    return f"{probability:.{digits}f}"


def _format_box(box: Sequence[float]) -> str:
    x0, x1, y0, y1, z0, z1 = box
    return (
        f"x {x0:g} to {x1:g} mm, y {y0:g} to {y1:g} mm, z {z0:g} to {z1:g} mm "
        "(LPS patient coordinates)"
    )


def _summary(entries: Sequence[_Entry], run_info: Mapping[str, Any]) -> str:
    scored = [e.result for e in entries if e.result.ok]
    counts = {
        "series scored": len(scored),
        "called pathology": sum(1 for r in scored if r.pathology == 1),
        "called no pathology": sum(1 for r in scored if r.pathology == 0),
        "failures": len(entries) - len(scored),
    }
    wanted = (
        ("ctscreen version", "ctscreen_version"),
        ("weights", "weights"),
        ("weights SHA-256", "weights_sha256"),
        ("threshold", "threshold"),
        ("threshold rule", "threshold_rule"),
        ("preprocessing", "preprocess"),
        ("device", "device"),
        ("precision", "precision"),
        ("mode", "mode"),
        ("inputs", "inputs"),
        ("studies", "studies"),
        ("wall time (s)", "wall_seconds"),
        ("model warnings", "model_warnings"),
    )
    shown = {key for _, key in wanted} | {"note", "failures"}
    items: list[tuple[str, object]] = list(counts.items())
    items += [(label, run_info[k]) for label, k in wanted if run_info.get(k) not in (None, "")]
    items += [(key, value) for key, value in run_info.items() if key not in shown]
    cells = [
        f'<th>{_e(label)}</th><td class="{"mono" if "SHA" in label else ""}">'
        f"{_e(f'{value:.6g}' if isinstance(value, float) else value)}</td>"
        for label, value in items
    ]
    half = (len(cells) + 1) // 2  # two columns of facts, read down then across
    left, right = cells[:half], cells[half:] + ["<td></td><td></td>"]
    body = "".join(f"<tr>{a}{b}</tr>" for a, b in zip(left, right, strict=False))
    return f'<h2>Run</h2><table class="run">{body}</table>'


def _overview(entries: Sequence[_Entry], threshold: float | None) -> str:
    lines = []
    for number, entry in enumerate(entries, start=1):
        css, text = _decision(entry)
        result = entry.result
        probability = result.probability
        shown = _DASH if probability is None else format_probability(probability, threshold)
        lines.append(
            f'<tr><td class="num">{number}</td>'
            f'<td><a href="#card-{number}">{_e(result.location)}</a></td>'
            f'<td class="mono">{_e(result.study_uid or _DASH)}</td>'
            f'<td class="num">{shown}</td>'
            f'<td><span class="badge {css}">{_e(text)}</span>'
            + (' <span class="badge borderline">borderline</span>' if result.borderline else "")
            + "</td></tr>"
        )
    head = (
        "<tr><th>#</th><th>study</th><th>StudyInstanceUID</th><th>probability</th>"
        "<th>decision</th></tr>"
    )
    return f"<h2>Studies</h2><table>{head}{''.join(lines)}</table>"


def _card(number: int, entry: _Entry, image_src: Any, threshold: float | None) -> str:
    row = entry.result
    css, text = _decision(entry)
    probability = row.probability
    title = [f"<span>#{number}</span>", f'<span class="badge {css}">{_e(text)}</span>']
    if row.borderline:
        title.append('<span class="badge borderline">borderline</span>')
    if probability is not None:
        shown = format_probability(probability, threshold)
        title.append(f'<span class="prob">p = {shown}</span>')
        if threshold is not None:
            title.append(f'<span class="muted">threshold {threshold:g}</span>')
    facts: list[tuple[str, str]] = [("study", _e(row.location))]
    if row.input_path and row.input_path != row.location:
        facts.append(("input", _e(row.input_path)))
    facts.append(("StudyInstanceUID", f'<span class="mono">{_e(row.study_uid or _DASH)}</span>'))
    if row.series_uid:
        facts.append(("SeriesInstanceUID", f'<span class="mono">{_e(row.series_uid)}</span>'))
    if row.series_reason:
        facts.append(("why this series", _e(row.series_reason)))
    if row.n_slices is not None:
        facts.append(("slices", _e(row.n_slices)))
    if row.box is not None:
        facts.append(("localisation box", _e(_format_box(row.box))))
    facts.append(("processing time", f"{row.seconds:.2f} s"))
    dl = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in facts)
    parts = [
        f'<section class="card {css}" id="card-{number}">',
        f"<h3>{''.join(title)}</h3>",
        f"<dl>{dl}</dl>",
    ]
    if row.error:
        parts.append(f'<p class="error">Error: {_e(row.error)}</p>')
    if row.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in row.warnings)
        parts.append(f'<div class="warn"><strong>Warnings</strong><ul>{items}</ul></div>')
    pictures = entry.pictures
    if pictures is not None:
        parts.append(
            f'<figure><img alt="per-slice score curve of card {number}" '
            f'src="{image_src(pictures.curve)}"><figcaption>Score of every slice from the '
            "same forward pass; the study probability is the sigmoid of the mean slice logit."
            "</figcaption></figure>"
        )
        parts.append(_key_slices_html(number, entry, image_src))
    elif row.ok:
        parts.append('<p class="muted">No pictures for this series.</p>')
    parts.append("</section>")
    return "".join(parts)


def _banner(run_info: Mapping[str, Any]) -> str:
    """A red banner with what the model card says about the model's limits, if anything."""
    notes = [n.strip() for n in str(run_info.get("model_warnings") or "").split(";") if n.strip()]
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return (
        '<div class="banner">Read these results with care: the model card says'
        f"<ul>{items}</ul></div>"
    )


def _key_slices_html(number: int, entry: _Entry, image_src: Any) -> str:
    pictures = entry.pictures
    assert pictures is not None
    scores = entry.result.slice_scores
    spread = ""
    if scores is not None and len(scores):
        spread = f"slice scores span {float(np.min(scores)):.3f}{_DASH}{float(np.max(scores)):.3f}"
    if pictures.flat:
        lead = (
            f"<p><strong>No slice stands out</strong> ({spread}): the evidence is spread over "
            "the whole volume, so the slices below are spaced evenly, not ranked.</p>"
        )
    else:
        lead = ""
    if not pictures.native:
        return (
            f'{lead}<figure><img alt="key axial slices of card {number}" '
            f'src="{image_src(pictures.strip)}"><figcaption>Key slices from the network input, '
            "viewed from the feet (patient's right on the left); colour shows where the model "
            "found evidence of pathology.</figcaption></figure>"
        )
    refs = entry.result.slices
    figures = []
    for key, name in zip(pictures.key_slices, pictures.native, strict=True):
        ref = refs[key.slice_index] if key.slice_index < len(refs) else None
        number_text = (
            f", InstanceNumber {ref.instance_number}" if ref and ref.instance_number else ""
        )
        role = {
            "top": f"#{key.rank} highest score",
            "reference": "lowest score (reference)",
            "even": f"slice {key.rank} of {len(pictures.key_slices)}, evenly spaced",
        }[key.role]
        figures.append(
            f'<figure><img alt="slice {key.slice_index} of card {number}" '
            f'src="{image_src(name)}"><figcaption>{_e(role)}: slice {key.slice_index}'
            f"{_e(number_text)}, score {key.score:.3f}</figcaption></figure>"
        )
    dy, dx = pictures.pixel_mm
    caption = (
        f"Key slices from the study's own pixels (one image pixel per CT pixel, "
        f"{dx:.2f} x {dy:.2f} mm), lung window, anterior at the top and the patient's right "
        "on the left; colour shows where the model found evidence of pathology, inside the "
        "body only."
    )
    return f'{lead}<div class="keys">{"".join(figures)}</div><p class="muted">{caption}</p>'


def _page(entries: Sequence[_Entry], run_info: Mapping[str, Any], *, image_src: Any) -> str:
    threshold = run_info.get("threshold")
    threshold = float(threshold) if isinstance(threshold, (int, float)) else None
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cards = "".join(
        _card(number, entry, image_src, threshold) for number, entry in enumerate(entries, 1)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>ctscreen report</title>"
        f"<style>{_CSS}</style></head><body><main>"
        "<h1>ctscreen report</h1>"
        f'<p class="muted">Chest CT screening run, written {_e(created)}.</p>'
        f'<p class="note">{_e(CLINICAL_NOTE)}</p>'
        f"{_banner(run_info)}{_summary(entries, run_info)}{_overview(entries, threshold)}"
        f"<h2>Details</h2>{cards}"
        "</main></body></html>\n"
    )
