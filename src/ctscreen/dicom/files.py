"""DICOM files on disk: walking an input, sniffing and reading headers safely.

Only regular files are opened (a named pipe would block, a device stream forever),
links are followed only inside the input, and a header is read without its pixel
data; a file that starts like DICOM but cannot be parsed, or lost its tail, raises
:class:`DamagedFileError`.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
import warnings
import zipfile
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..errors import InputError
from .instance import CT_SOP_CLASSES

_DEFER_BYTES = 4096

#: Errors pydicom may raise when force-reading bytes that are not really DICOM.
PARSE_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    struct.error,
)


def special_file_kind(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file (``"a named pipe"``, ...), else None.

    Opening a named pipe blocks until someone writes to it, and a device can
    stream forever; only regular files are ever opened.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def read_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a regular file (b"" for anything else or on error)."""
    if special_file_kind(path) is not None:
        return b""
    try:
        # O_NONBLOCK: should the file be swapped for a pipe after the check, open()
        # still returns at once instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, size)
    except OSError:
        return b""
    finally:
        os.close(fd)


def looks_like_dicom(path: Path) -> bool:
    """Cheap sniff: a 'DICM' preamble, or a first element in group 0002 or 0008
    (DICOM written without the 128-byte preamble). Never opens anything but a
    regular file."""
    head = read_head(path, 132)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


#: ``warnings.catch_warnings`` swaps process-wide state; header reads in several
#: reader threads take turns so that each file's warnings are its own.
_HEADER_LOCK = threading.Lock()


class DamagedFileError(InputError):
    """A file starts like DICOM but cannot be parsed (truncated or corrupt)."""

    code = "DAMAGED_FILE"


def read_header(path: Path) -> Dataset | None:
    """Read a file's header without loading pixel data.

    Returns:
        The dataset, or None when the file is not DICOM at all.

    Raises:
        DamagedFileError: the file starts like DICOM but cannot be parsed.
    """
    if not looks_like_dicom(path):
        return None
    try:
        with _HEADER_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
    except RecursionError as exc:
        raise DamagedFileError(f"{path.name} nests sequences too deeply to read ({exc})") from exc
    except PARSE_ERRORS as exc:
        raise DamagedFileError(f"{path.name} is a damaged DICOM file ({exc})") from exc
    # A cut file may still parse, into a dataset that lost its tail: refuse it.
    ends_early = [w for w in caught if "End of file reached" in str(w.message)]
    if ends_early:
        raise DamagedFileError(f"{path.name} is truncated ({ends_early[0].message})")
    cut = truncation(ds, path.stat().st_size)
    if cut:
        raise DamagedFileError(f"{path.name} is truncated ({cut})")
    if not any(k in ds for k in ("SOPClassUID", "StudyInstanceUID", "Modality")) and not (
        getattr(ds, "file_meta", None) and "MediaStorageSOPClassUID" in ds.file_meta
    ):
        return None
    return ds


_DEFLATED = "1.2.840.10008.1.2.1.99"


def truncation(ds: Dataset, file_size: int) -> str | None:
    """Why a dataset that parsed without complaint still lost its tail, or None.

    pydicom stops quietly when a file ends between two elements, and a deferred
    pixel element is not read at all, so a cut copy can look whole: a CT image
    without pixel data, or pixel data longer than what is left of the file.
    """
    raw = ds._dict.get(0x7FE00010)  # as read: deferred (value None) or raw bytes
    if raw is None:
        meta = getattr(ds, "file_meta", None)
        sop_class = str(
            ds.get("SOPClassUID", "") or (meta or {}).get("MediaStorageSOPClassUID", "")
        )
        if sop_class in CT_SOP_CLASSES:
            return "a CT image whose file ends before its pixel data"
        return None
    length = getattr(raw, "length", None)
    if length is None or length == 0xFFFFFFFF:  # encapsulated: the codec finds a cut
        return None
    value = getattr(raw, "value", None)
    start = getattr(raw, "value_tell", None)
    meta = getattr(ds, "file_meta", None)
    deflated = str((meta or {}).get("TransferSyntaxUID", "")) == _DEFLATED
    # In a deflated file, positions count bytes of the inflated stream, not of the file.
    if value is None and start is not None and not deflated and start + length > file_size:
        return f"its pixel data needs {length} bytes but only {max(file_size - start, 0)} remain"
    if isinstance(value, bytes) and len(value) < length:
        return f"its pixel data needs {length} bytes but only {len(value)} remain"
    return None


def looks_like_zip(path: Path) -> bool:
    """A zip by content, or something that claims to be one (a truncated download
    must fail as a damaged archive, not pass as a non-DICOM file)."""
    if special_file_kind(path) is not None:
        return False
    if path.suffix.lower() == ".zip":
        return True
    return read_head(path, 4) == b"PK\x03\x04" or zipfile.is_zipfile(path)


def iter_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), sorted for stability;
    special files and links leaving ``root`` are left out (see :func:`regular_files`)."""
    return regular_files(root)[0]


def regular_files(root: Path) -> tuple[list[Path], list[str]]:
    """Every regular file under ``root`` (or ``root`` itself), sorted for stability.

    Named pipes, sockets and devices are never opened, and a symbolic link is
    followed only when it points to a regular file inside ``root``; each thing
    left out is named in the second list.

    Returns:
        The files, and one short note per entry left out (path relative to ``root``).
    """
    if not root.is_dir():
        kind = special_file_kind(root)
        return ([root], []) if kind is None else ([], [f"{root.name} ({kind})"])
    resolved_root = root.resolve()
    found: list[Path] = []
    left_out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                dirnames.remove(name)  # a linked folder is listed, not walked (loops, escapes)
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                left_out.append(f"{rel} (a symbolic link to a folder)")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(resolved_root):
                    left_out.append(f"{rel} (a symbolic link pointing outside the input)")
                    continue
            kind = special_file_kind(path)
            if kind is not None:
                left_out.append(f"{rel} ({kind})")
                continue
            found.append(path)
    return found, left_out
