"""The export cache: graphs converted once per weights, shape and runtime, checked before use.

An entry is a folder named by :func:`export_key` holding the exported files and a
manifest with their SHA-256; it is written into a temporary folder and renamed
into place, so a reader never sees half an entry, and it is checked against its
manifest before every use, so a damaged one is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..fileio import file_sha256
from .base import TITLES

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: Bumped whenever the exported graph or the cache layout changes.
EXPORT_FORMAT_VERSION = 2  # 2: the OpenVINO graph is split into stages

_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ExportRecipe:
    """How one backend's graph is made.

    Attributes:
        backend: ``openvino`` or ``openvino_int8`` (entry names start with it).
        export: ``export(model, shape=..., out_dir=...)`` writes the files.
        files: the files it writes; the runtime reads the first.
        version: the version of the runtime that reads them.
        exporter: the versions of the converter when it is not the runtime itself.
    """

    backend: str
    export: Callable[..., None]
    files: tuple[str, ...]
    version: str
    exporter: str | None = None


def user_cache_dir() -> Path:
    """``$CTSCREEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/ctscreen``, else ``~/.cache/ctscreen``."""
    explicit = os.environ.get("CTSCREEN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctscreen"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def export_cache_root(weights_path: Path | None) -> Path:
    """Where exported graphs of ``weights_path`` are kept.

    Args:
        weights_path: the checkpoint file, or None for a model without one.

    Returns:
        ``<weights folder>/.ctscreen-export`` when that can be written, else
        ``<user cache>/export``.

    Raises:
        ConfigError: neither folder can be written.
    """
    candidates = []
    if weights_path is not None:
        candidates.append(Path(weights_path).resolve().parent / ".ctscreen-export")
    candidates.append(user_cache_dir() / "export")
    for folder in candidates:
        if _writable_dir(folder):
            return folder
    raise ConfigError(
        f"cannot write an exported model to {' or '.join(map(str, candidates))}; "
        "set CTSCREEN_CACHE_DIR to a writable folder or use --backend torch."
    )


def export_key(
    *,
    weights_sha256: str,
    shape: tuple[int, ...],
    backend_version: str,
    backend: str = "openvino",
    exporter: str | None = None,
) -> str:
    """The cache entry name of one exported graph: its backend, then what it was made from, hashed.

    Args:
        weights_sha256: SHA-256 of the checkpoint the weights came from.
        shape: the input shape the graph was made for.
        backend_version: the version of the backend that runs (and for OpenVINO, converts) it.
        backend: ``openvino`` or ``openvino_int8``; the entry name starts with it.
        exporter: the versions of the converter when it is not the backend itself
            (INT8: the graph's hash). Left out of the hash when None, so
            that OpenVINO entries keep the names earlier releases gave them.
    """
    made_from: dict[str, Any] = {
        "format": EXPORT_FORMAT_VERSION,
        "weights_sha256": weights_sha256,
        "shape": list(shape),
        "backend_version": backend_version,
    }
    if exporter is not None:
        made_from["exporter"] = exporter
    text = json.dumps(made_from, sort_keys=True)
    return f"{backend}-{weights_sha256[:16]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _entry_is_valid(entry: Path, key: str, files: tuple[str, ...]) -> bool:
    """True when ``entry`` holds a complete export whose ``files`` match its manifest."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        return manifest.get("key") == key and all(
            manifest.get(name) == file_sha256(entry / name) for name in files
        )
    except (OSError, ValueError, AttributeError):
        return False


def cached_export(
    model: nn.Module,
    *,
    weights_sha256: str,
    shape: tuple[int, int, int],
    cache_root: Path,
    weights_path: Path | None = None,
    recipe: ExportRecipe,
) -> tuple[Path, bool]:
    """The graph of ``model`` from the cache, exported first when missing, stale or damaged.

    The export is written into a temporary folder beside the entry and renamed
    into place, so a reader never sees half an entry; the other entries of the
    same backend for the same weights or the same weight file (older weights,
    older backend or exporter, other shapes) are removed. Entries of other
    backends are left alone.

    Args:
        model: the r3d_18 (on the CPU, eval mode).
        weights_sha256: SHA-256 of the checkpoint the weights came from.
        shape: the static input ``(D, H, W)``.
        cache_root: the cache folder (see :func:`export_cache_root`).
        weights_path: the checkpoint file, recorded so that a later export of
            new weights at the same path replaces this one.
        recipe: how the backend's graph is made (``openvino_recipe()`` or
            ``openvino_int8_recipe(graph)``).

    Returns:
        ``(path to the first of the recipe's files, True when it came from the cache)``.
    """
    backend, export, files = recipe.backend, recipe.export, recipe.files
    version, exporter = recipe.version, recipe.exporter
    key = export_key(
        weights_sha256=weights_sha256,
        shape=tuple(shape),
        backend_version=version,
        backend=backend,
        exporter=exporter,
    )
    entry = cache_root / key
    if entry.exists():
        if _entry_is_valid(entry, key, files):
            log.debug("using the exported model %s", entry)
            return entry / files[0], True
        log.warning("exported model %s is incomplete or damaged; exporting it again", entry)
        shutil.rmtree(entry, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root))
    try:
        export(model, shape=shape, out_dir=staging)
        manifest: dict[str, Any] = {
            "key": key,
            "backend": backend,
            "format": EXPORT_FORMAT_VERSION,
            "weights_sha256": weights_sha256,
            "weights_path": _path_text(weights_path),
            "shape": list(shape),
            "backend_version": version,
        }
        if exporter is not None:
            manifest["exporter"] = exporter
        manifest.update({name: file_sha256(staging / name) for name in files})
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; others reading the weights may use it
        try:
            os.rename(staging, entry)
        except OSError:  # another process finished the same export first
            if not _entry_is_valid(entry, key, files):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune(
        cache_root,
        backend=backend,
        keep=key,
        weights_sha256=weights_sha256,
        weights_path=weights_path,
    )
    log.info("exported the model for %s %s to %s", TITLES[backend], version, entry)
    return entry / files[0], False


def _path_text(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _prune(
    cache_root: Path, *, backend: str, keep: str, weights_sha256: str, weights_path: Path | None
) -> None:
    """Remove ``backend``'s entries, other than ``keep``, of the same weights or weight file."""
    same_file = _path_text(weights_path)
    for old in cache_root.glob(f"{backend}-*"):
        if old.name == keep or not old.is_dir():
            continue
        try:
            manifest = json.loads((old / _MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge: another process may be writing it
        if not isinstance(manifest, dict):
            continue
        if manifest.get("weights_sha256") == weights_sha256 or (
            same_file is not None and manifest.get("weights_path") == same_file
        ):
            shutil.rmtree(old, ignore_errors=True)
