"""Read a torch file without executing pickled code, every failure as one sentence.

A leaf module (torch and ctscreen's errors only): weights, model initialisation
and training resume all read files through it, so none of them imports another.
torch is imported inside :func:`read_torch_file`, so that :func:`check_torch_file`
lets the command line refuse a missing or foreign file before torch loads (seconds).
"""

from __future__ import annotations

import functools
import pickle
import warnings
from pathlib import Path
from typing import Any

from .errors import WeightsError

#: Everything ``torch.load`` is seen to raise on a damaged or foreign file.
TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    KeyError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    UnicodeDecodeError,
    ImportError,
)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"

_CHECKPOINT_HINT = (
    "give the path of a checkpoint made by `ctscreen train` (or run `ctscreen demo` to make one)"
)


@functools.lru_cache(maxsize=1)
def _metadata_globals() -> tuple[Any, ...]:
    """Data-only types a legacy checkpoint's metadata may hold, allowed when loading.

    Training scripts often store metrics as numpy scalars (sklearn returns
    ``np.float64``) and arguments as an ``argparse.Namespace``; both only carry
    values and run no code of the file's choosing. Nothing else is allowed.
    """
    import argparse

    import numpy as np

    try:
        scalar = np._core.multiarray.scalar
    except AttributeError:  # numpy < 2
        scalar = np.core.multiarray.scalar
    dtype_classes = tuple(
        type(np.dtype(name))
        for name in (
            "float16",
            "float32",
            "float64",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "bool",
        )
    )
    return (scalar, np.dtype, *dtype_classes, argparse.Namespace)


def check_torch_file(
    path: Path, *, what: str = "weight file", hint: str = _CHECKPOINT_HINT
) -> Path:
    """Check, without importing torch, that ``path`` is a readable file that starts
    like a torch file (a zip archive or a pickle).

    Args:
        path: the file.
        what: how to name the file in messages (``"weight file"``).
        hint: what the user should do when the file does not exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        WeightsError: the file is missing, not a file, unreadable, empty or not a torch file.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{what} {path} does not exist; {hint}.")
    if not path.is_file():
        raise WeightsError(f"{what} {path} is not a file; {hint}.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise WeightsError(f"cannot read {what} {path} ({exc.strerror}).") from exc
    if not head:
        raise WeightsError(f"{what} {path} is empty; copy the checkpoint again.")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise WeightsError(f"{what} {path} is not a PyTorch file; {hint}.")
    return path


def read_torch_file(path: Path, *, what: str = "weight file", hint: str = _CHECKPOINT_HINT) -> Any:
    """Read a torch file without executing pickled code.

    Runs ``torch.load(path, map_location="cpu", weights_only=True)`` and turns
    every way it can fail into one sentence.

    Args:
        path: the file.
        what: how to name the file in messages (``"weight file"``).
        hint: what the user should do when the file does not exist.

    Returns:
        Whatever the file holds (tensors and plain containers only).

    Raises:
        WeightsError: the file is missing, empty, not a torch file, damaged or
            truncated, or holds pickled objects other than tensors.
    """
    import torch

    path = check_torch_file(path, what=what, hint=hint)
    try:
        with warnings.catch_warnings():
            # The weights-only unpickler warns about pickle protocols it was not
            # written for; the outcome (loaded or refused) is what matters here.
            warnings.simplefilter("ignore", UserWarning)
            with torch.serialization.safe_globals(_metadata_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise WeightsError(
                f"{what} {path} holds pickled Python objects besides tensors, which ctscreen "
                "refuses to run for safety; if you trust the file, load it in Python and "
                "save only its state_dict with torch.save."
            ) from exc
        raise WeightsError(
            f"{what} {path} is damaged or truncated; copy the checkpoint again."
        ) from exc
    except OSError as exc:
        raise WeightsError(f"cannot read {what} {path} ({exc.strerror}).") from exc
    except TORCH_LOAD_ERRORS as exc:
        raise WeightsError(
            f"{what} {path} is damaged, truncated or not a PyTorch checkpoint "
            f"({type(exc).__name__}); copy the checkpoint again."
        ) from exc
