"""``auto``, chosen by measurement on the machine where it runs.

No CPU flag says which way of running the network is fastest: the same code ran
bf16 twice as fast as fp32 on an AMD EPYC and slower than fp32 on an Intel Xeon
with the same AVX-512 bf16 flag. So the first run of a checkpoint on a machine
runs every installed candidate (backend x precision) on one synthetic study at
the model's own input shape, drops those that fail the accuracy gate, times the
rest in interleaved rounds (so that a shared machine's drift hits them all
alike) and keeps the fastest. Plain PyTorch fp32 is always a candidate and
always passes, so the winner is never slower than it was measured to be.

The winner and the whole table are kept as JSON in the user cache
(:func:`choices_path`), keyed by everything that can change the answer: the
CPU model and the cores this process may use, the device, the runtime versions,
the weight file's SHA-256 and the input shape (:func:`choice_key`). Later runs
reuse it; a changed key measures again.

**The accuracy gate.** A candidate passes when, on the gate studies, the logits it
gives differ from PyTorch fp32's by at most :data:`GATE_MAX_LOGIT`: the largest
probability move a logit error ``d`` can cause anywhere on the sigmoid is
``tanh(|d| / 4)`` (at a probability of 0.5, where decisions flip), so the gate
bounds every probability move by :data:`GATE_MAX_DP` = 0.01, whatever
probability the gate study happens to get. The gate studies are synthetic chest
phantoms (:mod:`ctscreen.synth`, one normal, one with consolidation) at the
model's shape, so the gate needs no data and sees a chest, not noise. That is the
gate of every candidate that has no recorded check. A candidate that carries one
(an INT8 graph made by ``ctscreen quantize``, checked on the user's real studies:
max |p - p_fp32| <= 0.01 and ROC-AUC within 0.005) is judged by that check
instead: a failed check excludes it without running it, a passed one admits it
(it must still give finite outputs; its phantom logit error is shown in the
table for information). The real check is the better judge: a phantom is not
the user's data, and the logit bound is stricter than any probability move on
studies far from the threshold.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import write_text_atomic
from .export_cache import user_cache_dir

log = logging.getLogger(__name__)

#: Largest probability move a candidate may cause (see the module docstring).
GATE_MAX_DP = 0.01
#: The logit error that moves a probability by at most :data:`GATE_MAX_DP`.
GATE_MAX_LOGIT = 4.0 * math.atanh(GATE_MAX_DP)
#: Timed runs of each candidate (after the untimed one that the gate uses).
DEFAULT_ROUNDS = 3
#: Bumped when the record's meaning changes.
CHOICE_FORMAT = 1

#: A way to run the network: ``x [B, 1, D, H, W] -> (logits [B], cam)``.
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, order=True)
class Candidate:
    """One way to run the network.

    Attributes:
        backend: ``torch`` or ``openvino``.
        precision: ``fp32``, ``bf16``, ``fp16`` (GPU) or ``int8`` (OpenVINO).
    """

    backend: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"

    @classmethod
    def parse(cls, label: str) -> Candidate:
        backend, _, precision = label.partition("/")
        return cls(backend, precision)


#: The reference every candidate is judged and timed against.
REFERENCE = Candidate("torch", "fp32")


@dataclass(frozen=True)
class Trial:
    """What one candidate did.

    Attributes:
        candidate: the candidate.
        passed: it passed the gate (and its recorded check, where it has one).
        worst_dp: the largest probability move its logit error can cause
            (``tanh(|d| / 4)``), None when it did not run.
        seconds: median seconds per forward over the timed rounds; None when not timed.
        times: every timed forward, in seconds.
        note: why it failed, or "" when it passed.
    """

    candidate: Candidate
    passed: bool
    worst_dp: float | None = None
    seconds: float | None = None
    times: tuple[float, ...] = ()
    note: str = ""


def worst_probability_move(reference: np.ndarray, logits: np.ndarray) -> float:
    """The largest probability move the logit errors ``logits - reference`` can cause.

    A logit error ``d`` moves ``sigmoid`` by at most ``tanh(|d| / 4)`` (the move
    at probability 0.5); non-finite logits count as 1.
    """
    error = np.abs(np.asarray(logits, np.float64) - np.asarray(reference, np.float64))
    if error.size == 0:
        return 0.0
    if not np.all(np.isfinite(error)):
        return 1.0
    return float(np.tanh(error.max() / 4.0))


def measure_candidates(
    runners: Mapping[Candidate, Runner],
    gate_inputs: Sequence[np.ndarray],
    *,
    rounds: int = DEFAULT_ROUNDS,
    recorded: Mapping[Candidate, str] | None = None,
    checked: Sequence[Candidate] = (),
    max_dp: float = GATE_MAX_DP,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Trial]:
    """Gate every candidate against :data:`REFERENCE`, then time those that pass.

    Each runner first scores every gate input once (untimed: it also warms the
    runner up); a runner that raises, gives non-finite logits or moves a
    probability by more than ``max_dp`` fails. The candidates that pass are then
    run on the first gate input ``rounds`` times each, in interleaved rounds.

    Args:
        runners: the candidates and how to run each; must hold :data:`REFERENCE`.
        gate_inputs: network inputs ``[1, 1, D, H, W]`` (float32).
        rounds: timed forwards per candidate.
        recorded: candidates with a recorded check that failed, and why (they
            fail here without running).
        checked: candidates whose recorded check passed: judged by it, not by
            ``max_dp`` (they must still give finite logits).
        max_dp: the gate (see :func:`worst_probability_move`).
        clock: seconds, for timing.

    Returns:
        One trial per candidate, in the order of ``runners``.

    Raises:
        ValueError: no reference runner, or no gate input.
    """
    if REFERENCE not in runners:
        raise ValueError(f"the candidates must include the reference {REFERENCE.label}")
    if not gate_inputs:
        raise ValueError("the gate needs at least one input")
    recorded = recorded or {}
    reference = np.concatenate([runners[REFERENCE](x)[0] for x in gate_inputs])
    failed: dict[Candidate, Trial] = {}
    moves: dict[Candidate, float] = {REFERENCE: 0.0}
    for candidate, run in runners.items():
        if candidate == REFERENCE:
            continue
        if candidate in recorded:
            failed[candidate] = Trial(candidate, False, note=recorded[candidate])
            continue
        try:
            logits = np.concatenate([run(x)[0] for x in gate_inputs])
        except Exception as exc:  # a candidate that cannot run is simply not chosen
            failed[candidate] = Trial(candidate, False, note=f"{type(exc).__name__}: {exc}")
            continue
        move = worst_probability_move(reference, logits)
        admitted = move < 1.0 if candidate in checked else move <= max_dp
        if not admitted:
            failed[candidate] = Trial(
                candidate, False, worst_dp=move, note=f"moves a probability by up to {move:.4f}"
            )
        else:
            moves[candidate] = move
    passing = [c for c in runners if c in moves]
    times: dict[Candidate, list[float]] = {c: [] for c in passing}
    for _ in range(max(1, rounds)):
        for candidate in passing:
            start = clock()
            runners[candidate](gate_inputs[0])
            times[candidate].append(clock() - start)
    trials = []
    for candidate in runners:
        if candidate in failed:
            trials.append(failed[candidate])
        else:
            spent = times[candidate]
            trials.append(
                Trial(
                    candidate,
                    True,
                    worst_dp=moves[candidate],
                    seconds=statistics.median(spent),
                    times=tuple(spent),
                    note="judged by its recorded check" if candidate in checked else "",
                )
            )
    return trials


def pick(trials: Sequence[Trial], allowed: Sequence[Candidate] | None = None) -> Candidate:
    """The fastest candidate that passed (among ``allowed``, when given).

    Raises:
        ValueError: no allowed candidate passed.
    """
    timed = [
        t
        for t in trials
        if t.passed and t.seconds is not None and (allowed is None or t.candidate in allowed)
    ]
    if not timed:
        raise ValueError("no candidate passed the accuracy gate")
    return min(timed, key=lambda t: (t.seconds, t.candidate != REFERENCE)).candidate


# ------------------------------------------------------------------ the cached record


def choices_path() -> Path:
    """The JSON file that keeps measured choices: ``<user cache>/backend-choices.json``."""
    return user_cache_dir() / "backend-choices.json"


def choice_key(
    *,
    machine: str,
    cores: int,
    device: str,
    versions: Mapping[str, str | None],
    weights_sha256: str,
    shape: Sequence[int],
    requested: tuple[str, str],
) -> str:
    """The key of one measured choice: SHA-256 of everything that can change the answer.

    Args:
        machine: the CPU model (:func:`ctscreen.hardware.cpu_model`) or GPU name.
        cores: the cores this process may run on.
        device: ``cpu`` or ``cuda:N``.
        versions: runtime versions (PyTorch, OpenVINO, ...; None for not installed).
        weights_sha256: SHA-256 of the weight file.
        shape: the model's input ``(D, H, W)``.
        requested: the ``(backend, precision)`` asked for (``auto`` in one or both).
    """
    facts = {
        "format": CHOICE_FORMAT,
        "machine": machine,
        "cores": int(cores),
        "device": device,
        "versions": dict(sorted(versions.items())),
        "weights_sha256": weights_sha256,
        "shape": [int(s) for s in shape],
        "requested": list(requested),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _read_all(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_choice(key: str, path: Path | None = None) -> dict[str, Any] | None:
    """The record stored under ``key``, or None when there is none (or the file is unreadable)."""
    record = _read_all(path or choices_path()).get(key)
    return record if isinstance(record, dict) and "winner" in record else None


def save_choice(
    key: str,
    *,
    winner: Candidate,
    trials: Sequence[Trial],
    facts: Mapping[str, Any],
    path: Path | None = None,
) -> dict[str, Any]:
    """Store the winner and its table under ``key`` (atomically; other keys are kept).

    Returns:
        The record as stored. A cache folder that cannot be written only costs a
        measurement next time (logged).
    """
    path = path or choices_path()
    record = {
        "winner": winner.label,
        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "facts": dict(facts),
        "trials": [trial_to_dict(t) for t in trials],
    }
    everything = _read_all(path)
    everything[key] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(everything, indent=2, sort_keys=True))
    except OSError as exc:
        log.warning("cannot keep the measured backend choice in %s (%s)", path, exc)
    return record


def trial_to_dict(trial: Trial) -> dict[str, Any]:
    """A trial as plain JSON types."""
    d = asdict(trial)
    d["candidate"] = trial.candidate.label
    d["times"] = list(trial.times)
    return d


def trial_from_dict(data: Mapping[str, Any]) -> Trial:
    """The inverse of :func:`trial_to_dict`."""
    return Trial(
        candidate=Candidate.parse(str(data["candidate"])),
        passed=bool(data["passed"]),
        worst_dp=data.get("worst_dp"),
        seconds=data.get("seconds"),
        times=tuple(data.get("times", ())),
        note=str(data.get("note", "")),
    )


def format_trials(trials: Sequence[Trial], winner: Candidate | None = None) -> str:
    """The measured table as text: candidate, gate, seconds per forward, ratio to fp32."""
    base = next((t.seconds for t in trials if t.candidate == REFERENCE and t.seconds), None)
    lines = [f"{'candidate':<16} {'gate':<5} {'max dp':>8} {'s/forward':>10} {'x fp32':>7}  note"]
    for t in trials:
        dp = "-" if t.worst_dp is None else f"{t.worst_dp:.5f}"
        secs = "-" if t.seconds is None else f"{t.seconds:.3f}"
        ratio = "-" if t.seconds is None or not base else f"{t.seconds / base:.2f}"
        mark = "  <- chosen" if winner is not None and t.candidate == winner else ""
        gate = "pass" if t.passed else "FAIL"
        lines.append(
            f"{t.candidate.label:<16} {gate:<5} {dp:>8} {secs:>10} {ratio:>7}  {t.note}{mark}"
        )
    return "\n".join(lines)
