"""Exported bundles: a checkpoint as OpenVINO IR with its model card, scored without PyTorch.

``ctscreen export model.pth -o bundle/`` writes a folder::

    bundle/
      bundle.json          what the graphs are: format, model card, head bias, input
                           shape, the source checkpoint's SHA-256, the OpenVINO that
                           converted them and the SHA-256 of every graph file
      stem.xml, stem.bin   the network in the stages of
      layer1.xml ...       :func:`ctscreen.backends.export_openvino`; the last,
      model.xml/.bin       ``model``, gives the logit and the activation map

The card carries the preprocessing and the threshold, and the last graph the
activation map, so a bundle gives every column a checkpoint gives (probability,
decision, per-slice scores, localisation). :class:`ctscreen.Screener` takes a
bundle wherever it takes a checkpoint; reading one imports neither PyTorch nor
torchvision, which is what lets the runtime container leave them out.

This module imports no torch: only :func:`write_bundle` needs it, inside.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .card import ModelCard
from .errors import CtscreenError, WeightsError
from .fileio import file_sha256

if TYPE_CHECKING:
    from .weights import LoadedModel

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "ctscreen-openvino-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "bundle.json"
#: The graph files of a bundle, in the order they run (an xml and a bin each).
STAGES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "model")


def graph_files() -> tuple[str, ...]:
    """Every graph file a bundle holds."""
    return tuple(f"{stage}.{ext}" for stage in STAGES for ext in ("xml", "bin"))


@dataclass(frozen=True, eq=False)
class LoadedBundle:
    """An exported bundle, checked and ready to compile.

    Attributes:
        card: the model card of the checkpoint it was exported from.
        warnings: sentences every result carries (as a checkpoint's).
        sha256: SHA-256 of that checkpoint (so runs of the two say the same model).
        path: the bundle folder.
        bias: the head bias (logits are ``cam.mean() + bias``).
        openvino: the OpenVINO version that converted the graphs.
    """

    card: ModelCard
    warnings: tuple[str, ...]
    sha256: str
    path: Path
    bias: float
    openvino: str

    def graph(self, stage: str) -> Path:
        """The IR file (``.xml``) of one stage of :data:`STAGES`."""
        return self.path / f"{stage}.xml"


def bundle_folder(path: Path | str) -> Path | None:
    """The bundle folder ``path`` names (the folder or its ``bundle.json``), or None
    when it is not a bundle (a checkpoint file, or nothing)."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        return path
    if path.name == MANIFEST and path.is_file():
        return path.parent
    return None


def is_bundle(path: Path | str) -> bool:
    """True when ``path`` is an exported bundle (its folder or its ``bundle.json``)."""
    return bundle_folder(path) is not None


def load_bundle(path: Path | str) -> LoadedBundle:
    """Read and check an exported bundle (no PyTorch involved).

    Raises:
        WeightsError: not a bundle, a newer format, an invalid card, or a graph
            file missing or changed since export.
    """
    folder = bundle_folder(path)
    if folder is None:
        raise WeightsError(
            f"{path} is not an exported bundle (no {MANIFEST}); make one with "
            "`ctscreen export model.pth -o FOLDER`."
        )
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{folder / MANIFEST} cannot be read as JSON; export the bundle again."
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise WeightsError(f"{folder} is not a ctscreen bundle; export the bundle again.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_FORMAT_VERSION:
        raise WeightsError(
            f"bundle {folder} has format version {version!r}, newer than this ctscreen reads "
            f"({BUNDLE_FORMAT_VERSION}); upgrade ctscreen."
        )
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for name in graph_files():
        where = folder / name
        if not where.is_file():
            raise WeightsError(f"bundle {folder} lacks {name}; export the bundle again.")
        if files.get(name) != file_sha256(where):
            raise WeightsError(
                f"{where} differs from the file exported into the bundle (SHA-256); "
                "export the bundle again."
            )
    try:
        card = ModelCard.from_dict(dict(manifest["card"]))
        bias = float(manifest["bias"])
        sha = str(manifest["weights_sha256"])
    except (CtscreenError, KeyError, TypeError, ValueError) as exc:
        reason = exc.message if isinstance(exc, CtscreenError) else f"{type(exc).__name__}: {exc}"
        raise WeightsError(f"bundle {folder} has an invalid manifest ({reason}).") from exc
    if list(manifest.get("shape", ())) != list(card.preprocess.shape):
        raise WeightsError(
            f"bundle {folder} was exported for another input shape than its card's; "
            "export the bundle again."
        )
    notes = tuple(str(n) for n in manifest.get("warnings", ()))
    log.info("loaded bundle %s (from weights sha256 %s)", folder, sha[:12])
    return LoadedBundle(
        card=card,
        warnings=notes,
        sha256=sha,
        path=folder,
        bias=bias,
        openvino=str(manifest.get("openvino", "")),
    )


def write_bundle(loaded: LoadedModel, out_dir: Path | str) -> Path:
    """Export a loaded checkpoint into the bundle folder ``out_dir`` (needs PyTorch).

    The graphs are written into a temporary folder beside ``out_dir`` and moved into
    place at the end, so a reader never sees half a bundle; an older bundle at
    ``out_dir`` is replaced, any other non-empty folder is refused.

    Args:
        loaded: a checkpoint from :func:`ctscreen.weights.load_checkpoint` (on the CPU).
        out_dir: the bundle folder to write.

    Returns:
        ``out_dir``.

    Raises:
        WeightsError: ``out_dir`` is a file or a non-empty folder that is not a bundle.
    """
    from .backends.openvino_backend import export_openvino, openvino_version

    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_bundle(out))):
        raise WeightsError(
            f"{out} exists and is not an empty folder or an earlier bundle; choose another -o."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    model = loaded.model.to("cpu").eval()
    shape = tuple(int(s) for s in loaded.card.preprocess.shape)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        export_openvino(model, shape=(shape[0], shape[1], shape[2]), out_dir=staging)
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "card": loaded.card.to_dict(),
            "warnings": list(loaded.warnings),
            "bias": float(model.fc.bias.detach().float()[0]),
            "shape": list(shape),
            "weights_sha256": loaded.sha256,
            "weights_name": Path(loaded.path).name,
            "openvino": openvino_version(),
            "ctscreen_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": {name: file_sha256(staging / name) for name in graph_files()},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        staging.chmod(0o755)  # mkdtemp makes it private; a container user must read it
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to the bundle %s", loaded.path, out)
    return out
