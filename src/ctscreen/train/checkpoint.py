"""Resume state of a training run and small file helpers.

``last_state.pth`` holds what is needed to continue a run exactly where it
stopped: model, optimizer and GradScaler state, the last completed epoch, the
best validation score so far, the metric history and the RNG states. Everything
is a tensor or a plain container, so it loads with ``torch.load(weights_only=True)``.
Inference checkpoints (``weights.pth``, ``best.pth``) are written by
:func:`ctscreen.weights.save_checkpoint` instead; they carry a model card.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..fileio import write_atomic
from ..torchfile import TORCH_LOAD_ERRORS

STATE_FORMAT = "ctscreen-train-state"
STATE_FORMAT_VERSION = 1
#: What ``torch.load`` raises on a damaged, truncated or foreign file.
_LOAD_ERRORS = (*TORCH_LOAD_ERRORS, OSError)


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's global generators, in plain types."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state` (CUDA states only when CUDA is available)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(path: Path | str, state: dict[str, Any]) -> None:
    """Write a resume state atomically (temp file in the same folder, then ``os.replace``)."""
    payload = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, **state}
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load_train_state(path: Path | str) -> dict[str, Any]:
    """Read a resume state with ``weights_only=True``.

    Raises:
        ConfigError: the file is missing, damaged or not a ctscreen resume state.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"cannot resume: {path} does not exist; start the run without --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as exc:
        raise ConfigError(
            f"cannot resume: {path} is damaged ({type(exc).__name__}); start a new run."
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"cannot resume: {path} is not a ctscreen training state.")
    if int(state.get("format_version", 0)) > STATE_FORMAT_VERSION:
        raise ConfigError(
            f"cannot resume: {path} was written by a newer ctscreen; upgrade ctscreen."
        )
    return state


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """Make ``dst`` a hard link to ``src`` (or a copy across file systems), atomically.

    Checkpoints are write-once, so a hard link saves a second 130 MB file.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
