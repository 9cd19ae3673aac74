"""Command-line interface: ``ctscreen COMMAND ...`` and ``python -m ctscreen``.

Each command lives in its own module ``ctscreen.cli.<name>`` exposing
``add_parser(subparsers)`` and ``run(args) -> int``. Heavy imports (torch) happen
inside ``run`` so that ``--help`` and ``info`` stay fast.

Exit codes:
    0  everything succeeded;
    1  the command ran but some studies (rows) failed;
    2  the command could not run (bad arguments, missing weights, unreadable config);
    130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import NO_ROOM, NOT_ALLOWED, CtscreenError, cannot_write, needs_torch
from .exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL

__all__ = [
    "COMMANDS",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "build_parser",
    "main",
]

#: Subcommands in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = (
    "predict",
    "info",
    "quantize",
    "export",
    "synth",
    "registry",
    "split",
    "cache",
    "train",
    "evaluate",
    "demo",
    "serve",
    "dicomweb",
)

log = logging.getLogger("ctscreen")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctscreen",
        description="Sort chest CT studies into 'no pathology' and 'pathology'.",
    )
    parser.add_argument("--version", action="version", version=f"ctscreen {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log to stderr (default: WARNING)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not draw progress bars on stderr"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(sub)
    return parser


def _set_up_logging(level: str) -> None:
    from .console import TqdmHandler

    # Through tqdm.write: a warning logged while a progress bar is drawn gets its own
    # line instead of breaking the bar's.
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("ctscreen")
    root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)]
    root.addHandler(handler)
    root.setLevel(level)


def _write_refused(exc: BaseException) -> OSError | None:
    """The OS error behind ``exc`` that means "no room" or "not allowed", if any (pydicom,
    for one, re-raises a write error as a new ``OSError`` without its ``errno``)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_ROOM | NOT_ALLOWED:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code (never calls ``sys.exit``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _set_up_logging(args.log_level)
    try:
        return int(args.func(args))
    except CtscreenError as exc:
        if args.debug:
            raise
        print(f"ctscreen: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        # A full disk or a folder closed to writing, met where no writer said so itself
        # (a checkpoint, a cache entry, a DICOM file): one sentence, not a traceback.
        cause = _write_refused(exc)
        if args.debug or cause is None:
            raise
        sentence = cannot_write(str(cause.filename or exc.filename or "a file"), cause).message
        print(f"ctscreen: error: {sentence}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        if args.debug or (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
            raise
        print(
            f"ctscreen: error: {needs_torch(f'ctscreen {args.command}').message}", file=sys.stderr
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("ctscreen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
