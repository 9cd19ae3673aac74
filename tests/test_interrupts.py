"""Ctrl-C and SIGTERM reach a run at a safe point, and none is lost on the way."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from ctscreen.fileio import write_atomic
from ctscreen.interrupts import (
    acknowledge_stop,
    deferred_interrupts,
    interruptible,
    raise_if_stop_requested,
    stop_requested,
    stop_requests,
)


def arrives(sig: int) -> None:
    """What the interpreter does when ``sig`` arrives: call the Python handler in place.

    Called directly rather than through ``signal.raise_signal``: in a pytest process
    that has loaded OpenVINO/NNCF (tests/test_int8.py), a real SIGINT sent to itself
    ends in a segmentation fault inside ``pthread_kill``, before any handler runs.
    Real signals to real runs are sent by tests/test_train_cli.py and
    tests/test_run_safety.py, to child processes.
    """
    handler = signal.getsignal(sig)
    assert callable(handler), handler
    handler(sig, None)


def test_ctrl_c_outside_any_run_still_raises_at_once() -> None:
    with pytest.raises(KeyboardInterrupt):
        arrives(signal.SIGINT)


def test_a_request_outside_interruptible_code_waits_for_the_next_safe_point() -> None:
    reached = []
    with stop_requests():
        arrives(signal.SIGINT)
        reached.append("after the signal")  # not cut here: no interruptible block
        assert stop_requested()
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGINT)}"):
            raise_if_stop_requested()
        acknowledge_stop()
        assert not stop_requested()
        raise_if_stop_requested()  # acknowledged: does not raise again
    assert reached == ["after the signal"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_request_dropped_where_python_cannot_raise_is_raised_again() -> None:
    class RaisesInDestructor:
        def __del__(self) -> None:
            # Python prints and drops an exception raised here, as it does in a fork hook.
            arrives(signal.SIGINT)

    with stop_requests():
        with pytest.raises(KeyboardInterrupt), interruptible():
            obj = RaisesInDestructor()
            del obj
            for _ in range(3):  # the run goes on: only a safe point can stop it
                pass
            raise_if_stop_requested()


def test_interruptible_code_stops_at_once_and_sigterm_counts_as_a_stop() -> None:
    steps = []
    with stop_requests():
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"):
            with interruptible():
                steps.append(1)
                arrives(signal.SIGTERM)
                steps.append(2)
    assert steps == [1]
    # The handlers are restored: SIGTERM is back to its default, SIGINT to Ctrl-C.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_request_before_an_interruptible_block_raises_when_it_starts() -> None:
    entered = False
    with stop_requests():
        arrives(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            with interruptible():
                entered = True
    assert not entered


def test_ctrl_c_in_a_checkpoint_write_leaves_the_whole_file_then_stops(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    weights = {"w": torch.arange(250_000, dtype=torch.float32)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save({"half": 1}, fh)
            arrives(signal.SIGINT)  # Ctrl-C half-way through the writer
            fh.seek(0)
            fh.truncate()
            torch.save(weights, fh)

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, write)
    assert torch.equal(torch.load(path)["w"], weights["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pth"]  # no temp file left

    # Inside an interruptible run the same write also completes before the stop.
    with stop_requests():
        with pytest.raises(KeyboardInterrupt), interruptible():
            write_atomic(tmp_path / "again.pth", write)
    assert torch.equal(torch.load(tmp_path / "again.pth")["w"], weights["w"])


def test_deferred_blocks_nest_and_deliver_one_stop_at_the_outermost_end() -> None:
    order = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            with deferred_interrupts():
                arrives(signal.SIGINT)
                order.append("inner end")
            order.append("outer end")
    assert order == ["inner end", "outer end"]


def test_a_handler_set_outside_python_is_replaced_by_pythons_default_afterwards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = signal.signal
    replaced = []

    def as_if_set_in_c(sig: int, handler: object) -> object:
        previous = real(sig, handler)  # type: ignore[arg-type]
        if not replaced or len(replaced) < 2:
            replaced.append(sig)
            return None  # what signal.signal returns for a handler set outside Python
        return previous

    monkeypatch.setattr(signal, "signal", as_if_set_in_c)
    with stop_requests():
        pass
    monkeypatch.setattr(signal, "signal", real)
    assert sorted(replaced) == sorted([signal.SIGINT, signal.SIGTERM])
    # not left with the run's handler, which would swallow every later Ctrl-C
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
