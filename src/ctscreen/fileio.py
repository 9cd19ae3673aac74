"""Small file helpers shared by the writers of run folders.

Every file ctscreen writes goes through a temporary file in the target folder and
``os.replace``, so a reader never sees half a file. ``tempfile.mkstemp`` creates
its file with mode 0600; :func:`atomic_open` gives it the mode an ordinary
``open()`` would (0666 less the umask, usually 0644) before moving it into place,
so every output of one run has the same permissions.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def json_safe(value: Any) -> Any:
    """Replace nan/inf floats by None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@functools.lru_cache(maxsize=1)
def new_file_mode() -> int:
    """Permissions of a newly created file under the process umask (0666 & ~umask)."""
    # os.umask can only be read by setting it; done once and restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it replaces ``path``.

    Args:
        path: the file to write (parent folders are created).
        mode: ``"wb"`` or ``"w"``.
        **kwargs: passed to ``os.fdopen`` (``encoding``, ``newline``).

    Yields:
        The open temporary file. If the block raises, ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as ``du --si`` and file managers show)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def folder_bytes(folder: Path | str) -> int:
    """Bytes held by the regular files under ``folder`` (a hard link counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total
