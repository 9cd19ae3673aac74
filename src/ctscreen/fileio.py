"""File helpers every writer shares: one atomic writer, one hash, JSON-safe values.

A leaf module (standard library and :mod:`ctscreen.interrupts` only). Every file
ctscreen writes (tables, checkpoints, caches, registries, reports) goes through
:func:`write_atomic`, so a crash or a Ctrl-C never leaves a half-written file, an
earlier file at that path survives a failed write, and every output gets the same
permissions (the process umask, not ``mkstemp``'s private 0600).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .interrupts import deferred_interrupts


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
    """Permissions of a newly created file under the process umask."""
    # os.umask can only be read by setting it; done once and restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path | str, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it over ``path``.

    The parent folder is created when missing. The temporary file keeps ``path``'s
    suffix (writers such as openpyxl choose the format by it) and is removed when
    ``write`` raises. Ctrl-C and SIGTERM wait until the file is in place (a
    checkpoint writer cut half-way breaks its own zip stream).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred_interrupts():
        fd, tmp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix
        )
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            os.chmod(tmp, new_file_mode())
            os.replace(tmp, path)
        except OSError as exc:
            if exc.filename in (None, tmp_name):
                exc.filename = str(path)  # the file the user knows, not its temporary twin
            raise
        finally:
            tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically, newlines as given."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    write_atomic(path, write)


def file_sha256(path: Path | str, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so big files never sit in memory.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


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
