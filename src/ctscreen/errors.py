"""Typed errors raised by the library.

Every error carries a stable ``code`` (for tables and logs) and a message that is
one sentence saying what is wrong and what to do. Only the CLI turns them into an
exit code; library code never calls ``sys.exit``.
"""

from __future__ import annotations

import errno

#: OS errors that mean "no room to write": a full disk, a quota, a file-size limit.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: OS errors that mean "not allowed to write here".
NOT_ALLOWED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class CtscreenError(Exception):
    """Base class of every error ctscreen raises on purpose."""

    code: str = "ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InputError(CtscreenError):
    """An input path does not exist or is of a kind ctscreen cannot read."""

    code = "INPUT"


class UnsafeArchiveError(InputError):
    """A zip archive would write outside its work area or exhaust memory or disk."""

    code = "UNSAFE_ARCHIVE"


class NoDicomError(InputError):
    """An input holds no readable DICOM object at all."""

    code = "NO_DICOM"


class SeriesSelectionError(CtscreenError):
    """A study holds no series that can be scored (no axial CT image series)."""

    code = "NO_ELIGIBLE_SERIES"


class VolumeError(CtscreenError):
    """A series cannot honestly be stacked into a 3D volume."""

    code = "VOLUME"


class DecodeError(VolumeError):
    """Pixel data cannot be decoded (unsupported or damaged compression)."""

    code = "DECODE"


class WeightsError(CtscreenError):
    """A weight file is missing, damaged or of an unknown layout."""

    code = "WEIGHTS"


class ConfigError(CtscreenError):
    """A configuration value or a combination of options is invalid."""

    code = "CONFIG"


class MissingExtraError(ConfigError):
    """An option needs an optional extra (``pip install "ctscreen[NAME]"``) not installed here."""

    code = "MISSING_EXTRA"


#: What a user without PyTorch is told when something needs it.
NEEDS_TORCH = (
    "{what} needs PyTorch, which is not installed here: pip install 'ctscreen[torch]' "
    "(CPU wheels: add --index-url https://download.pytorch.org/whl/cpu), or export the "
    "checkpoint once with `ctscreen export` where PyTorch is and score the bundle"
)


def needs_torch(what: str) -> MissingExtraError:
    """The error for ``what`` (a phrase: "reading a .pth checkpoint") without PyTorch."""
    return MissingExtraError(NEEDS_TORCH.format(what=what) + ".")


class DatasetError(CtscreenError):
    """A dataset root, registry or split file is missing or inconsistent."""

    code = "DATASET"


class NotChestError(CtscreenError):
    """The series to score is not a chest CT (too little aerated lung in the image)."""

    code = "NOT_CHEST"


def cannot_write(what: str, exc: OSError, *, then: str = "") -> ConfigError:
    """The one sentence for an output that could not be written.

    Args:
        what: the output, e.g. ``"the result table /data/out.xlsx"``.
        exc: the error the write raised.
        then: what to do once the cause is fixed, appended after a comma
            (e.g. ``"then run the same command with --resume"``).

    Example:
        >>> full = OSError(errno.ENOSPC, "No space left on device")
        >>> print(cannot_write("the table t.csv", full).message)
        cannot write the table t.csv (No space left on device); there is no room for it: \
free space on that disk or choose another folder.
    """
    if exc.errno in NO_ROOM:
        advice = "there is no room for it: free space on that disk or choose another folder"
    elif exc.errno == errno.EROFS:
        advice = "that file system is read-only: choose another folder"
    else:
        advice = "choose a folder you can write to"
    return ConfigError(
        f"cannot write {what} ({exc.strerror or exc}); {advice}{', ' + then if then else ''}."
    )
