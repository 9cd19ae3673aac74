"""What a training run tells its user: the time estimate, one line per epoch, disk use.

Pure functions over plain numbers (torch-free), so that the wording can be tested
without training anything. :func:`ctscreen.train.loop.train` calls them and hands the
lines to its ``echo`` callback (the CLI prints them above the progress bars).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..fileio import format_bytes

#: Batches timed before the estimate is given (the first batch of a run is not timed:
#: it pays for worker start-up and lazy initialisation).
ESTIMATE_BATCHES = 3
#: A validation batch (forward only) costs about this share of a training batch
#: (forward + backward, about three forwards).
VAL_BATCH_COST = 0.35
#: Beyond this many seconds on a CPU, the estimate comes with advice.
SLOW_CPU_SECONDS = 3600.0
#: Bytes per element of the float32 weights; AdamW keeps two more tensors per weight.
_FLOAT_BYTES = 4
_ADAMW_MOMENTS = 2


def format_duration(seconds: float) -> str:
    """``42`` -> ``"42 s"``, ``200`` -> ``"3 min 20 s"``, ``7500`` -> ``"2 h 05 min"``."""
    if not math.isfinite(seconds):
        return "unknown"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest:02d} min"


@dataclass(frozen=True)
class RunEstimate:
    """How long a training run should take, from the first timed batches.

    Attributes:
        seconds_per_batch: median time of a training batch.
        train_batches: training batches per epoch.
        val_batches: validation batches per validated epoch.
        epochs_left: epochs still to run (this one included).
        validated_epochs: how many of those are validated.
    """

    seconds_per_batch: float
    train_batches: int
    val_batches: int
    epochs_left: int
    validated_epochs: int

    @property
    def epoch_seconds(self) -> float:
        """One validated epoch."""
        return self.seconds_per_batch * (self.train_batches + VAL_BATCH_COST * self.val_batches)

    @property
    def total_seconds(self) -> float:
        """The rest of the run."""
        spb = self.seconds_per_batch
        return spb * (
            self.epochs_left * self.train_batches
            + VAL_BATCH_COST * self.validated_epochs * self.val_batches
        )


def estimate_from_batches(
    batch_seconds: Sequence[float],
    *,
    train_batches: int,
    val_batches: int,
    epochs_left: int,
    validated_epochs: int,
) -> RunEstimate:
    """A :class:`RunEstimate` from the durations of the first training batches.

    Args:
        batch_seconds: durations of the batches timed so far, first batch excluded
            when there are others.
        train_batches: training batches per epoch.
        val_batches: validation batches per validated epoch.
        epochs_left: epochs still to run, the current one included.
        validated_epochs: how many of those will be validated.

    Raises:
        ValueError: no batch was timed.
    """
    if not batch_seconds:
        raise ValueError("no batch was timed")
    ordered = sorted(float(s) for s in batch_seconds)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])
    return RunEstimate(median, train_batches, val_batches, epochs_left, validated_epochs)


def estimate_lines(estimate: RunEstimate, *, device: str, batch_size: int) -> list[str]:
    """The estimate as text, with advice when the run takes hours on a CPU."""
    lines = [
        f"measured {estimate.seconds_per_batch:.2f} s per training batch of {batch_size} "
        f"on {device}: an epoch ({estimate.train_batches} train + {estimate.val_batches} val "
        f"batches) takes about {format_duration(estimate.epoch_seconds)}, "
        f"the {estimate.epochs_left} epoch(s) to go about "
        f"{format_duration(estimate.total_seconds)}"
    ]
    if device == "cpu" and estimate.total_seconds > SLOW_CPU_SECONDS:
        lines.append(
            f"that is {format_duration(estimate.total_seconds)} on the CPU: train on a GPU "
            "(--device cuda), use a smaller input (--shape 48 96 96 is about 8x less "
            "work than 96 192 192) or fewer --epochs; Ctrl-C stops at any time and "
            "--resume continues from the last finished epoch"
        )
    return lines


def _ci_text(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return "undefined (one class)"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} (95% CI {low:.2f}-{high:.2f})"


def epoch_line(
    row: dict[str, float],
    *,
    epochs: int,
    eta_seconds: float | None,
    best: bool,
) -> str:
    """One line for a finished epoch: losses, val ROC-AUC with its CI, time, ETA.

    Args:
        row: the epoch's metrics row (``epoch``, ``train_loss``, ``val_loss``,
            ``val_roc_auc``, ``val_roc_auc_ci_low``, ``val_roc_auc_ci_high``, ``seconds``).
        epochs: the run's last epoch.
        eta_seconds: time still to go (None after the last epoch).
        best: whether this epoch became ``best.pth``.
    """
    epoch = int(row["epoch"])
    width = len(str(epochs))
    parts = [f"epoch {epoch:>{width}}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if math.isfinite(row.get("val_loss", math.nan)):
        parts.append(f"val loss {row['val_loss']:.4f}")
        parts.append(
            "val ROC-AUC "
            + _ci_text(
                row.get("val_roc_auc", math.nan),
                row.get("val_roc_auc_ci_low", math.nan),
                row.get("val_roc_auc_ci_high", math.nan),
            )
        )
    else:
        parts.append("not validated")
    parts.append(format_duration(row["seconds"]))
    if eta_seconds is not None:
        parts.append(f"ETA {format_duration(eta_seconds)}")
    line = "  ".join(parts)
    return line + ("  * best" if best else "")


@dataclass(frozen=True)
class DiskPlan:
    """Bytes a run folder will hold, stated before training starts.

    Attributes:
        weights_bytes: one inference checkpoint (``best.pth``).
        state_bytes: the resume state (weights, AdamW moments); 0 when it is only
            written on Ctrl-C.
        per_epoch_bytes: all per-epoch checkpoints (0 unless requested).
        state_on_interrupt: the resume state is written only when the run is stopped.
        epochs: epochs the plan covers.
    """

    weights_bytes: int
    state_bytes: int
    per_epoch_bytes: int
    state_on_interrupt: bool
    epochs: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.state_bytes + self.per_epoch_bytes


def disk_plan(
    n_parameters: int, *, epochs: int, save_every_epoch: bool, state_on_interrupt: bool
) -> DiskPlan:
    """Sizes of ``best.pth``, the resume state and the per-epoch checkpoints.

    Args:
        n_parameters: weights and buffers of the model (float32).
        epochs: epochs still to run (per-epoch checkpoints are one per epoch).
        save_every_epoch: whether ``epochs/epoch_XXX/weights.pth`` are kept.
        state_on_interrupt: whether the resume state is written only on Ctrl-C.
    """
    weights = n_parameters * _FLOAT_BYTES
    state = weights * (1 + _ADAMW_MOMENTS)
    return DiskPlan(
        weights_bytes=weights,
        state_bytes=0 if state_on_interrupt else state,
        per_epoch_bytes=weights * epochs if save_every_epoch else 0,
        state_on_interrupt=state_on_interrupt,
        epochs=epochs,
    )


def disk_line(plan: DiskPlan, out_dir: str) -> str:
    """The disk plan as one sentence."""
    parts = [f"best.pth {format_bytes(plan.weights_bytes)}"]
    state = format_bytes(plan.weights_bytes * (1 + _ADAMW_MOMENTS))
    if plan.state_on_interrupt:
        parts.append(f"last_state.pth {state} only if stopped with Ctrl-C")
    else:
        parts.append(f"last_state.pth {state} (rewritten after every epoch)")
    if plan.per_epoch_bytes:
        parts.append(
            f"per-epoch weights {format_bytes(plan.weights_bytes)} x {plan.epochs} = "
            f"{format_bytes(plan.per_epoch_bytes)}"
        )
    else:
        parts.append("no per-epoch weights (--save-every-epoch keeps them)")
    return f"{out_dir} will hold about {format_bytes(plan.total_bytes)}: " + ", ".join(parts)
