"""argparse ``type=`` validators shared by the commands."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """A span of time in seconds: ``0``, ``90s``, ``15m``, ``12h``, ``30d`` (a bare number
    is seconds), or ``never`` (``math.inf``)."""
    value = text.strip().lower()
    if value in ("never", "forever", "inf"):
        return math.inf
    unit = _UNITS.get(value[-1:], None)
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write e.g. 0, 90s, 15m, 12h, 30d or never"
        ) from exc
    if not 0 <= seconds < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text!r}")
    return seconds


def probability(text: str) -> float:
    """A number in [0, 1]."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], not {value}")
    return value


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--backend`` and ``--precision``, as every scoring command takes them."""
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="auto (default): the fastest that passes the accuracy gate, measured on this "
        "machine on first use; fp16 runs on a GPU only; int8 needs a checkpoint made by "
        "ctscreen quantize",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "openvino"],
        help="auto (default): measured with --precision (ctscreen info --backends WEIGHTS "
        "shows the table); PyTorch off the CPU; a backend that fails falls back to PyTorch "
        "with a warning",
    )
