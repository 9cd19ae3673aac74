"""Scoring on a Ray cluster with Ray Data: the Screener's two stages, spread out.

The pipeline is the one :meth:`ctscreen.Screener.score` runs, cut at its two
public stages and handed to Ray Data's streaming executor::

    from_items(inputs)                      one row per input, in input order
      .flat_map(read_input)                 CPU tasks: pipeline.prepare -> PreparedStudy
      .map_batches(ScoreStage, ...)         one Screener per worker (GPU when there is one):
                                            Screener.score_prepared -> StudyResult
      .iter_rows()                          back in this process, in input order

Nothing is read, preprocessed, scored or turned into a row differently: the
reading tasks run :func:`ctscreen.pipeline.prepare` with the settings of the model
(:func:`ctscreen.screener.read_settings`), the scoring workers run
:meth:`ctscreen.Screener.score_prepared`, and :class:`RayScorer` hands the results
to :func:`ctscreen.runs.score_to_table`, which journals and writes them as a plain
``predict`` does. Studies cross the process boundary pickled (a prepared network
input and the volume's geometry, never its voxels; see ``Volume.__reduce__``), in
blocks of one input, so the object store holds a few studies per worker.

Every input gives a row: a damaged one gives its Failure row from the reading
stage as locally, and an input whose Ray task died (a worker killed, a decoder
crash) ``TASK_RETRIES + 1`` times gives a Failure row saying so instead of ending
or stalling the job.

This module imports Ray; import it only after :func:`ctscreen.engines.require_ray`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data import DataContext

from .._version import __version__
from ..errors import ConfigError
from ..interrupts import raise_if_stop_requested
from ..pipeline import PreparedStudy, ReadSettings, prepare
from ..results import StudyResult
from ..screener import Screener, read_settings
from ..weights import load_checkpoint

log = logging.getLogger(__name__)

#: Tries after the first of a reading task, or of a scoring batch, whose worker process
#: died (a decoder's crash, the kernel's out-of-memory killer, a lost node). Ray Data's
#: default is to try for ever, so one input that always kills its worker stalled the
#: whole run; after these it is a Failure row and the run goes on.
TASK_RETRIES = 2

#: A file in the run's temporary folder on the driver's machine while the run goes on.
RUN_MARKER = "RUNNING"

#: Object store of a Ray started here: room for a few dozen prepared studies in
#: flight (14 MB each at 96x192x192); Ray Data's backpressure keeps within it.
LOCAL_OBJECT_STORE_BYTES = 1 << 30


@contextlib.contextmanager
def _quiet_ray_logs(quiet: bool) -> Iterator[None]:
    """Ray's and Ray Data's own INFO and WARNING lines (execution plans, progress-bar
    notes) off stderr while ``quiet``; errors still show. Restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    saved = [lg.level for lg in loggers]
    if quiet:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def ray_session(
    address: str | None = None, *, cpus: int | None = None, quiet: bool = True
) -> Iterator[dict[str, Any]]:
    """Join the Ray cluster at ``address``, or start a local Ray with ``cpus`` CPUs.

    The Ray this starts (or joins) is shut down (left) when the block ends, however it
    ends; a Ray already running in this process (a notebook, a test) is used as it
    is and left running.

    Args:
        address: a cluster's address (``ray://host:10001``, ``host:6379`` or ``auto``);
            None starts a local Ray without its dashboard.
        cpus: CPUs of the local Ray (default: every core); only without ``address``.
        quiet: keep Ray's own INFO and WARNING lines off stderr (errors still show).

    Yields:
        The cluster's resources (``ray.cluster_resources()``: ``CPU``, ``GPU``, ...).

    Raises:
        ConfigError: Ray could not start, or the cluster could not be joined.
    """
    with _quiet_ray_logs(quiet):
        if ray.is_initialized():
            yield ray.cluster_resources()
            return
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.ERROR if quiet else logging.INFO,
        }
        if address is None:
            options |= {"num_cpus": cpus, "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
        else:
            options["address"] = address
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            raise ConfigError(
                f"could not {where} ({exc}); check the address, or run without --address."
            ) from exc
        try:
            yield ray.cluster_resources()
        finally:
            # A local Ray's workers outlive its shutdown by seconds, one of them perhaps
            # still unpacking a study: they are found while they are still ours.
            local = _ray_processes() if address is None else []
            ray.shutdown()
            _stop_processes(local)


def _ray_processes() -> list[Any]:
    """This process's descendants that belong to Ray (raylet, GCS, agents, workers);
    empty without psutil."""
    try:
        import psutil
    except ImportError:
        return []
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("ray" in part for part in child.cmdline()):
                found.append(child)
    return found


def _stop_processes(processes: list[Any], timeout: float = 10.0) -> None:
    """Kill those of ``processes`` still running and wait for them."""
    if not processes:
        return
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=timeout)


def _as_given(item: PreparedStudy, given: str, read_as: str) -> PreparedStudy:
    """``item`` read from the absolute path ``read_as``, named as the user gave it."""
    location = item.location
    if location.startswith(read_as):
        location = given + location[len(read_as) :]
    return replace(item, input_path=given, location=location)


def read_input(
    row: Mapping[str, Any], *, settings: ReadSettings, scratch: str, driver_node: str = ""
) -> list[dict[str, Any]]:
    """The reading stage as a Ray Data ``flat_map``: one input -> its prepared studies.

    Args:
        row: ``input_index``, ``given`` (the input as named on the command line) and
            ``path`` (its absolute path, as a worker elsewhere must open it).
        settings: the model's reading settings.
        scratch: the run's temporary folder: each task unpacks into a folder of its
            own inside it and removes that; the driver removes the whole folder at
            the end, so a task killed mid-way (Ctrl-C, a lost worker) leaves nothing
            on the driver's machine.
        driver_node: the Ray node id of the driver. A task there that finds the
            run's marker (:data:`RUN_MARKER` in ``scratch``) gone belongs to a run
            that has ended (Ctrl-C): it reads nothing, and one that was unpacking
            when the driver removed the folder (and so made it again) removes it.

    Returns:
        One row per study (per eligible series in ``series`` mode): ``input_index``
        and the pickled :class:`~ctscreen.pipeline.PreparedStudy`.
    """
    folder = Path(scratch)
    on_driver = ray.get_runtime_context().get_node_id() == driver_node
    if on_driver and not (folder / RUN_MARKER).exists():
        return []  # the run stopped and removed its folder: nothing to do
    folder.mkdir(parents=True, exist_ok=True)  # another node's first task
    work_root = Path(tempfile.mkdtemp(prefix="ctscreen-", dir=folder))
    out = []
    try:
        # Each study is pickled as it comes, so an input of many studies holds one
        # unpickled network input at a time.
        for item in prepare(row["path"], settings, work_root=work_root):
            blob = pickle.dumps(_as_given(item, row["given"], row["path"]), protocol=5)
            out.append({"input_index": row["input_index"], "prepared": blob})
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
        if on_driver and not (folder / RUN_MARKER).exists():
            shutil.rmtree(folder, ignore_errors=True)
    return out


class ScoreStage:
    """The model stage as a Ray Data ``map_batches`` class: one Screener per worker.

    Args:
        weights: the checkpoint, at a path every worker can open.
        options: keyword arguments of :class:`ctscreen.Screener`.
    """

    def __init__(self, weights: str, options: Mapping[str, Any]) -> None:
        self.screener = Screener(weights, **options)
        self.run_info = json.dumps(self.screener.run_info(), default=str)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(blob) for blob in batch["prepared"]]
        results = [pickle.dumps(r, protocol=5) for r in self.screener.score_prepared(items)]
        return {
            "input_index": np.asarray(batch["input_index"]),
            "result": np.array(results, dtype=object),
            "run_info": np.array([self.run_info] * len(results), dtype=object),
        }


@contextlib.contextmanager
def _data_context(*, progress: bool) -> Iterator[None]:
    """Ray Data settings of one run: results in input order, a failed block dropped
    (its input becomes a Failure row) instead of ending the run; restored after."""
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.max_errored_blocks)
    saved_bars = ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.max_errored_blocks = -1
    ctx.enable_progress_bars = progress
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.max_errored_blocks = saved
        ctx.enable_progress_bars = saved_bars


class RayScorer:
    """Scores inputs on Ray through the Screener's stages; what
    :func:`ctscreen.runs.score_to_table` needs of a scorer (``score``, ``run_info``).

    The checkpoint is checked and its model card read here, before Ray runs
    anything; each scoring worker then loads it once.

    Args:
        weights: the checkpoint, at a path every Ray worker can open.
        options: keyword arguments of :class:`ctscreen.Screener` (``device``,
            ``backend``, ``precision``, ``threshold``, ``mode``, ``min_slices``,
            ``localize``, ``batch_size``, ``study_timeout``).

    Raises:
        WeightsError: the checkpoint is missing, damaged or not a model.
        ConfigError: an unknown mode.

    Example:
        >>> with ray_session(cpus=2) as resources:  # doctest: +SKIP
        ...     scorer = RayScorer("model.pth", device="cpu")
        ...     scorer.place(resources)
        ...     results = list(scorer.score(["a.zip", "b.zip"]))
    """

    def __init__(self, weights: Path | str, **options: Any) -> None:
        self.weights = Path(weights).resolve()
        loaded = load_checkpoint(self.weights, device="cpu")
        self.settings = read_settings(
            loaded,
            **{k: options[k] for k in ("mode", "min_slices", "study_timeout") if k in options},
        )
        threshold = options.get("threshold")
        self.threshold = loaded.card.threshold if threshold is None else float(threshold)
        self.sha256 = loaded.sha256
        self.options = dict(options)
        self.options["readers"] = 1  # reading happens in the Ray tasks
        self.scorers = 1
        self.gpus_per_scorer = 0.0
        self.batch_size = int(options.get("batch_size") or 1)
        self._scorer_info: dict[str, Any] = {}
        self._scratch: list[Path] = []

    @property
    def warnings(self) -> tuple[str, ...]:
        """Sentences about the model that every result carries (as ``Screener.warnings``)."""
        return self.settings.warnings

    def place(self, resources: Mapping[str, Any], *, scorers: int | None = None) -> None:
        """Size the scoring stage for a cluster with ``resources``.

        Scoring workers hold one GPU each when the cluster has GPUs and the device
        allows them (``auto`` or ``cuda``), else one CPU each. Their default number
        is one per GPU, else one per two CPUs (at least one), so that reading tasks
        keep CPUs of their own; the default batch is 4 studies on a GPU, 1 on a CPU.

        Raises:
            ConfigError: ``scorers`` below 1, or ``cuda`` asked of a cluster without GPUs.
        """
        device = str(self.options.get("device", "auto"))
        gpus = int(resources.get("GPU", 0))
        if device.startswith("cuda") and gpus == 0:
            raise ConfigError(
                f"--device {device} asks for a GPU but the Ray cluster has none; use "
                "--device cpu or auto, or join a cluster with GPUs."
            )
        if scorers is not None and scorers < 1:
            raise ConfigError(f"the number of Ray scorers must be at least 1, not {scorers}.")
        use_gpu = gpus > 0 and device != "cpu"
        self.gpus_per_scorer = 1.0 if use_gpu else 0.0
        self.scorers = scorers or default_scorers(resources, use_gpu=use_gpu)
        self.batch_size = int(self.options.get("batch_size") or (4 if use_gpu else 1))
        self.options["batch_size"] = self.batch_size

    def lost_input(self, given: str) -> StudyResult:
        """The Failure result of an input whose Ray task failed and gave nothing."""
        return StudyResult(
            input_path=given,
            location=given,
            error=(
                f"the Ray task reading or scoring {Path(given).name} failed, so it has no "
                "result (the Ray log says why); score it again with --engine local to see "
                "the error."
            ),
            warnings=self.settings.warnings,
            threshold=self.threshold,
        )

    def score(
        self,
        inputs: Sequence[Path | str],
        *,
        keep_image: bool = False,
        keep_volume: bool = False,
        progress: bool = False,
    ) -> Generator[StudyResult, None, None]:
        """Score every study of every input on the Ray cluster this process has joined.

        Args:
            inputs: zip archives, folders, DICOM or NIfTI files, at paths every Ray
                worker can open.
            keep_image: not supported (the network input stays on the workers).
            keep_volume: not supported (the volume stays on the workers).
            progress: draw Ray Data's own progress bars.

        Yields:
            One result per study, in input order then study order, as
            :meth:`ctscreen.Screener.score` yields them.

        Raises:
            ConfigError: ``keep_image`` or ``keep_volume`` was asked for.
        """
        if keep_image or keep_volume:
            raise ConfigError(
                "the Ray engine keeps study images on its workers, so it cannot draw an "
                "HTML report; use --engine local with --report."
            )
        given = [str(p) for p in inputs]
        if not given:
            return
        rows = [
            {"input_index": i, "given": g, "path": os.path.abspath(g)} for i, g in enumerate(given)
        ]
        gpu = {"num_gpus": self.gpus_per_scorer} if self.gpus_per_scorer else {}
        scratch = Path(tempfile.mkdtemp(prefix="ctscreen-ray-"))
        (scratch / RUN_MARKER).touch()
        self._scratch.append(scratch)
        try:
            yield from self._score_rows(rows, given, scratch=scratch, progress=progress, gpu=gpu)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _score_rows(
        self,
        rows: list[dict[str, Any]],
        given: list[str],
        *,
        scratch: Path,
        progress: bool,
        gpu: Mapping[str, float],
    ) -> Generator[StudyResult, None, None]:
        reading = {
            "settings": self.settings,
            "scratch": str(scratch),
            "driver_node": ray.get_runtime_context().get_node_id(),
        }
        with _data_context(progress=progress):
            dataset = (
                ray.data.from_items(rows, override_num_blocks=len(rows))
                .flat_map(read_input, fn_kwargs=reading, num_cpus=1, max_retries=TASK_RETRIES)
                .map_batches(
                    ScoreStage,
                    fn_constructor_kwargs={"weights": str(self.weights), "options": self.options},
                    batch_size=self.batch_size,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=self.scorers),
                    num_cpus=1,
                    max_restarts=-1,  # a scorer that died is replaced ...
                    max_task_retries=TASK_RETRIES,  # ... but its batch is not tried for ever
                    **gpu,
                )
            )
            expected = 0  # the next input that has given no row yet
            for row in dataset.iter_rows():
                index = int(row["input_index"])
                for lost in range(expected, index):
                    raise_if_stop_requested()  # a Ctrl-C that killed tasks is no lost input
                    log.error("%s: its Ray task failed and gave no result", given[lost])
                    yield self.lost_input(given[lost])
                expected = max(expected, index + 1)
                if not self._scorer_info:
                    self._scorer_info = json.loads(row["run_info"])
                yield pickle.loads(row["result"])
            for lost in range(expected, len(given)):
                raise_if_stop_requested()
                log.error("%s: its Ray task failed and gave no result", given[lost])
                yield self.lost_input(given[lost])

    def remove_scratch(self) -> None:
        """Remove the runs' temporary folders once more, after the Ray session ended: a
        reading task still unpacking when a run stopped can make its folder again after
        :meth:`score` removed it (a local Ray's workers are stopped by then)."""
        for scratch in self._scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    def run_info(self) -> dict[str, Any]:
        """Facts for the table's ``run`` sheet: a scoring worker's own (backend,
        precision, device as it ran) and the Ray engine's."""
        base = self._scorer_info or {
            "ctscreen_version": __version__,
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "threshold": self.threshold,
        }
        resources = ray.cluster_resources() if ray.is_initialized() else {}
        return base | {
            "engine": "ray",
            "ray_version": ray.__version__,
            "ray_scorers": self.scorers,
            "ray_gpus_per_scorer": self.gpus_per_scorer,
            "ray_cluster_cpus": resources.get("CPU"),
            "ray_cluster_gpus": resources.get("GPU", 0.0),
            "readers": "Ray tasks",
        }


def default_scorers(resources: Mapping[str, Any], *, use_gpu: bool) -> int:
    """Scoring workers for a cluster: one per GPU, else one per two CPUs (at least one),
    so that reading tasks keep CPUs of their own."""
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // 2)
