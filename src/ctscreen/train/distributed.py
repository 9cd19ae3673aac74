"""Training on several processes launched by ``torchrun`` (PyTorch DDP).

Everything the training loop needs to know about other processes lives here:

- :func:`world_from_env` reads the launch from torchrun's environment
  (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); without it a run is one process;
- :func:`process_group` joins the group (NCCL on CUDA, each process on
  ``cuda:LOCAL_RANK``; gloo on the CPU) and leaves it at the end, also on errors
  and Ctrl-C;
- :class:`ShardSampler` gives every process its shard of one epoch sample that all
  processes draw alike from ``(seed, epoch)``, weighted for class balance or not,
  padded so that every process gets the same number of batches;
- :func:`gather_parts`, :func:`merge_parts`, :func:`stop_agreed`,
  :func:`sync_buffers`, :func:`run_on_main` are the collectives the loop uses.

Every collective here is called by every process at the same point of the loop,
so none can wait for a process that went elsewhere: a stop request (Ctrl-C, a
scheduler's SIGTERM) is acted on only when all processes agree on it at the end
of a batch (:func:`stop_agreed`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import Sampler

from ..errors import ConfigError
from ..interrupts import stop_requested

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long the other processes wait for rank 0's work in :func:`run_on_main` (building
#: the cache of a large registry takes hours; the group's own timeout is 10-30 minutes).
MAIN_ONLY_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class World:
    """Where this process stands among the training processes.

    Attributes:
        rank: global rank, 0 .. size - 1 (0 writes the run folder).
        local_rank: rank on this machine (selects ``cuda:LOCAL_RANK``).
        size: number of processes (1: a plain single-process run).
    """

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        """More than one process trains."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """This process writes files and prints (rank 0)."""
        return self.rank == 0


SINGLE = World()


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"{name}={text!r} is not a whole number; launch with torchrun.") from exc


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in ``env`` (default ``os.environ``).

    Raises:
        ConfigError: the variables are not whole numbers or contradict each other.
    """
    env = os.environ if env is None else env
    size = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ConfigError(
            f"WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local_rank} do not describe a "
            "launch; start several processes with torchrun."
        )
    return World(rank=rank, local_rank=local_rank, size=size)


def process_device(world: World, device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` on CUDA, else ``device``.

    Raises:
        ConfigError: a fixed ``cuda:N`` under torchrun, or fewer GPUs than local processes.
    """
    if not world.distributed or device.type != "cuda":
        return device
    if device.index is not None and device.index != world.local_rank:
        raise ConfigError(
            f"under torchrun each process trains on cuda:LOCAL_RANK; use --device cuda "
            f"instead of {device}."
        )
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"process {world.rank} has LOCAL_RANK {world.local_rank} but this machine has "
            f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node."
        )
    return torch.device("cuda", world.local_rank)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group for the block (nothing for a single process).

    A group the caller has already started is used and left running; one started
    here is destroyed when the block ends, however it ends.
    """
    if not world.distributed:
        yield
        return
    if dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    dist.init_process_group(backend=backend)
    log.info("process %d of %d joined the %s group on %s", world.rank, world.size, backend, device)
    try:
        yield
    finally:
        dist.destroy_process_group()


def epoch_sample(labels: np.ndarray, *, weighted: bool, shuffle: bool, seed: int) -> np.ndarray:
    """The indices one epoch visits, the same in every process for the same ``seed``.

    Args:
        labels: 0/1 label of every item.
        weighted: draw ``len(labels)`` items with replacement, each class equally
            likely (what a ``WeightedRandomSampler`` with inverse class counts does).
        shuffle: without ``weighted``, a random permutation; else items in order.
        seed: seed of this epoch's draw.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = int(labels.size)
    generator = torch.Generator().manual_seed(int(seed))
    if weighted:
        counts = np.bincount(labels, minlength=2).astype(np.float64)
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        drawn = torch.multinomial(weights, n, replacement=True, generator=generator)
        return drawn.numpy().astype(np.int64)
    if shuffle:
        return torch.randperm(n, generator=generator).numpy().astype(np.int64)
    return np.arange(n, dtype=np.int64)


def shard(indices: np.ndarray, rank: int, size: int) -> np.ndarray:
    """Process ``rank``'s share of ``indices``: every ``size``-th item from ``rank`` on,
    after padding with the first items so that all shards have the same length."""
    indices = np.asarray(indices, dtype=np.int64)
    per_rank = math.ceil(indices.size / size) if indices.size else 0
    padded = np.resize(indices, per_rank * size) if indices.size else indices
    return padded[rank::size]


class ShardSampler(Sampler[int]):
    """This process's shard of the epoch sample (:func:`epoch_sample` + :func:`shard`).

    Call :meth:`set_epoch` before every epoch; all processes then draw the same
    sample and each takes its shard, of one length in every process.
    """

    def __init__(
        self, labels: np.ndarray, *, world: World, weighted: bool, shuffle: bool, seed: int
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.world = world
        self.weighted = weighted
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch_seed = self.seed

    def set_epoch(self, epoch_seed: int) -> None:
        """Seed the next epoch's draw (the same value in every process)."""
        self.epoch_seed = int(epoch_seed)

    def indices(self) -> np.ndarray:
        """This process's indices for the current epoch, in visiting order."""
        sample = epoch_sample(
            self.labels, weighted=self.weighted, shuffle=self.shuffle, seed=self.epoch_seed
        )
        return shard(sample, self.world.rank, self.world.size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return math.ceil(self.labels.size / self.world.size)


def gather_parts(part: T, world: World) -> list[T]:
    """Every process's ``part`` (picklable), in rank order, in every process."""
    if not world.distributed:
        return [part]
    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, part)
    return parts


def merge_parts(
    parts: Sequence[Mapping[str, np.ndarray]], *, dedupe: bool
) -> dict[str, np.ndarray]:
    """Join per-process arrays that share an ``index`` key.

    Args:
        parts: one mapping per process of equal-length arrays, one being ``index``
            (the dataset index of every item).
        dedupe: keep each dataset index once, in index order (validation, where
            padding repeats items); else all items in rank order (a training epoch).
    """
    keys = list(parts[0])
    joined = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}
    if not dedupe:
        return joined
    _, first = np.unique(joined["index"], return_index=True)
    return {k: v[first] for k, v in joined.items()}


def sum_across(values: Sequence[float], world: World) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    if not world.distributed:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.cpu()]


def stop_agreed(world: World) -> bool:
    """Whether any process was asked to stop; every process gets the same answer.

    A collective: call it in every process at the same point (end of a batch).
    """
    local = stop_requested()
    if not world.distributed:
        return local
    return sum_across([1.0 if local else 0.0], world)[0] > 0


def sync_buffers(model: nn.Module, world: World) -> None:
    """Copy rank 0's buffers (batch norm running statistics) to every process.

    DDP sends them at the start of each training forward pass, so after the last
    step they differ; validation and the saved weights must use rank 0's.
    """
    if not world.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


@dataclass(frozen=True)
class _Outcome:
    value: Any = None
    error: BaseException | None = None


def run_on_main(fn: Callable[[], T], world: World) -> T:
    """Run ``fn`` in rank 0 only and give its result (or its exception) to every process.

    The other processes wait meanwhile (e.g. while rank 0 builds the cache or reads
    the resume state, which other machines may not see) and raise what rank 0
    raised, so all of them stop together.
    """
    if not world.distributed:
        return fn()
    # A gloo group of its own: CPU objects, and a wait as long as rank 0's work.
    group = dist.new_group(backend="gloo", timeout=MAIN_ONLY_TIMEOUT)
    box: list[Any] = [None]
    try:
        if world.is_main:
            try:
                box[0] = _Outcome(value=fn())
            except (Exception, KeyboardInterrupt) as exc:
                box[0] = _Outcome(error=exc)
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    outcome: _Outcome = box[0]
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when several processes train."""
    if not world.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
