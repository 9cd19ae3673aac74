"""Command-line interface: ``ctscreen COMMAND ...`` and ``python -m ctscreen``.

Each command lives in its own module ``ctscreen.cli.<name>`` exposing
``add_parser(subparsers)`` and ``run(args) -> int``. Heavy imports (torch) happen
inside ``run``, after :func:`check_cheap_arguments`, so that ``--help`` and mistakes
(a missing weight file, a mistyped ``--device``) answer at once.

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
from pathlib import Path

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
    "check_cheap_arguments",
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


def _add_global_options(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    """``--log-level``, ``--no-progress`` and ``--debug`` on ``parser``.

    Each command's parser takes them too (``ctscreen predict ... --no-progress``), with
    defaults suppressed there so that one given before the command is not reset.
    """
    group = parser.add_argument_group("global options") if after_command else parser

    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    group.add_argument(
        "--log-level",
        default=default("WARNING"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log to stderr (default: WARNING)",
    )
    group.add_argument(
        "--no-progress",
        action="store_true",
        default=default(False),
        help="do not draw progress bars on stderr",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show the full traceback of an error",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctscreen",
        description="Sort chest CT studies into 'no pathology' and 'pathology'.",
        epilog="Run `ctscreen COMMAND --help` for a command's options. "
        "New here? `ctscreen demo` trains a small model on synthetic phantoms and scores them.",
    )
    parser.add_argument("--version", action="version", version=f"ctscreen {__version__}")
    _add_global_options(parser, after_command=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(sub)
    for command_parser in sub.choices.values():
        _add_global_options(command_parser, after_command=True)
    return parser


def check_cheap_arguments(args: argparse.Namespace) -> None:
    """Refuse a mistyped ``--device`` or a missing or foreign weight file before any
    command imports torch (which takes seconds), after the command's own
    ``check_arguments`` (set with ``set_defaults``) where it has one.

    Raises:
        ConfigError: ``--device`` names no device ctscreen knows.
        WeightsError: the command's weight file is missing, empty or not a torch file
            (an exported bundle folder is let through: loading checks it).
    """
    from ..hardware import check_device_name
    from ..torchfile import check_torch_file

    # A command's own argument checks (which options go together) come first.
    own = getattr(args, "check_arguments", None)
    if own is not None:
        own(args)
    device = getattr(args, "device", None)
    if isinstance(device, str):
        check_device_name(device)
    weights = getattr(args, "weights", None)
    if isinstance(weights, Path):
        from ..bundle import is_bundle

        if not is_bundle(weights):  # a bundle from `ctscreen export` is checked on loading
            check_torch_file(weights)


def _set_up_logging(level: str) -> None:
    # A plain stderr handler; main() runs the command inside tqdm's logging_redirect_tqdm,
    # which routes it through tqdm.write, so a warning logged while a progress bar is
    # drawn gets its own line instead of breaking the bar's.
    handler = logging.StreamHandler(sys.stderr)
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
    if args.command is None:
        # `ctscreen` alone: the list of commands, as a reminder, not an error sentence.
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    _set_up_logging(args.log_level)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        check_cheap_arguments(args)
        with logging_redirect_tqdm(loggers=[log]):
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
