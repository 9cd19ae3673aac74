"""Ctrl-C and SIGTERM: where they stop work at once, where they wait, and that none is lost.

A leaf module (standard library only). Python delivers Ctrl-C as a
``KeyboardInterrupt`` raised at whatever bytecode runs next, which goes wrong in
two ways that a long run meets sooner or later:

- raised inside a function Python calls from C (a fork hook such as logging's
  ``_releaseLock`` while a DataLoader starts its workers, a destructor), it is
  printed as "Exception ignored" and *dropped*: the run goes on as if no one had
  pressed Ctrl-C;
- raised inside a file write (``torch.save`` half-way through its zip), it
  breaks the writer.

So within :func:`stop_requests` a SIGINT or SIGTERM is *recorded*, and raised as
``KeyboardInterrupt`` only where that is safe: at once inside
:func:`interruptible` blocks (the long computations: a batch's forward and
backward pass, the scoring loop), otherwise at the next
:func:`raise_if_stop_requested` (called between batches and between studies) or
when an :func:`interruptible` block starts. :func:`deferred_interrupts` marks code
that must not be cut in half (every atomic file write); a signal arriving there
is acted on when it ends, also outside :func:`stop_requests`.

Signal handlers can only be set in the main thread; in any other thread these
context managers do nothing (signals reach the main thread only).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

#: The signals that ask a run to stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_catching = False  # within stop_requests()
_raise_now = False  # within interruptible() and not within deferred_interrupts()
_requested: int | None = None  # the signal that asked to stop, until acknowledged


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = signum
    if _raise_now:
        raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stop_requests() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM ask the run to stop: they are recorded and
    raised as ``KeyboardInterrupt`` at the next safe point (see the module docstring),
    so cleanup runs and partial results are written, also for a scheduler's SIGTERM."""
    global _catching, _raise_now, _requested
    if not _in_main_thread() or _catching:
        yield
        return
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    _catching, _raise_now, _requested = True, False, None
    try:
        yield
    finally:
        _restore(previous)
        _catching, _raise_now, _requested = False, False, None


def leave_stops_to_parent(worker_id: int = 0) -> None:
    """Ignore SIGINT and SIGTERM in this (worker) process: its parent decides when to stop.

    For DataLoader workers (``worker_init_fn``): Ctrl-C in a terminal or a
    scheduler's SIGTERM to the whole process group would otherwise kill them, and
    the DataLoader would raise a RuntimeError in the parent instead of the orderly
    stop; the parent ends them when it stops.
    """
    if _in_main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def stop_requested() -> bool:
    """Whether a stop was requested and not yet acknowledged (raises nothing).

    For code that must agree with other processes before it stops (distributed
    training acts on a request only when every process knows of it).
    """
    return _requested is not None


def raise_if_stop_requested() -> None:
    """Raise ``KeyboardInterrupt`` when a stop was requested and not yet acknowledged."""
    if _requested is not None:
        raise KeyboardInterrupt(f"signal {_requested}")


def acknowledge_stop() -> None:
    """The stop is being acted on: a later safe point does not raise it again."""
    global _requested
    _requested = None


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, a stop request raises ``KeyboardInterrupt`` at once (one that
    came before the block raises on entry). Outside :func:`stop_requests`, a no-op."""
    global _raise_now
    if not _in_main_thread() or not _catching:
        yield
        return
    raise_if_stop_requested()
    before, _raise_now = _raise_now, True
    try:
        yield
    finally:
        _raise_now = before


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM wait until it ends.

    Inside :func:`stop_requests` the request is then raised if the block sits in an
    :func:`interruptible` one (else at the next safe point). Outside it, the first
    signal that came goes to the handler that was in place (Ctrl-C then raises
    ``KeyboardInterrupt`` at the block's end).
    """
    global _raise_now
    if not _in_main_thread():
        yield
        return
    if _catching:
        before, _raise_now = _raise_now, False
        try:
            yield
        finally:
            _raise_now = before
        if before:
            raise_if_stop_requested()
        return

    pending: list[int] = []

    def _keep(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, _keep) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        _restore(previous)
    if pending:
        _deliver(pending[0], previous[pending[0]])


def _restore(handlers: dict[signal.Signals, object]) -> None:
    """Put back the handlers that were in place. One set outside Python reads as None
    and cannot be put back from Python: Python's default takes its place (Ctrl-C
    raises ``KeyboardInterrupt``, SIGTERM ends the process)."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    for sig, handler in handlers.items():
        signal.signal(sig, defaults[sig] if handler is None else handler)  # type: ignore[arg-type]


def _deliver(signum: int, handler: object) -> None:
    """Act on a kept signal as its earlier handler would have."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)
