"""The one scoring path: checkpoint + inputs -> :class:`~ctscreen.results.StudyResult`.

Everything that scores studies — the ``predict`` command, ``evaluate``, the
demo, the HTML report, the service and the DICOM node — goes through
:class:`Screener`, so they read the same series, preprocess it the same way, run
the same backend and give the same numbers.

Example:
    >>> from ctscreen import Screener
    >>> screener = Screener("model.pth", device="cpu")  # doctest: +SKIP
    >>> for result in screener.score([Path("study.zip")]):  # doctest: +SKIP
    ...     print(result.location, result.status, result.probability)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._version import __version__
from .backends import Backend, ModelSource, bundle_backend, make_backend
from .bundle import LoadedBundle, is_bundle, load_bundle
from .card import ModelCard
from .config import PreprocessConfig, SelectionConfig
from .errors import ConfigError, needs_torch
from .explain import localization_box, sigmoid, slice_scores
from .hardware import HostCpu, bundle_device, default_batch_size, default_readers, select_device
from .pipeline import (
    STUDY_TIMEOUT_S,
    PreparedStudy,
    ReadSettings,
    batches,
    prefetched,
    prepare_inputs,
)
from .results import StudyResult

if TYPE_CHECKING:
    import torch

    from .weights import LoadedModel

log = logging.getLogger(__name__)

#: ``study``: one result per study (its chosen series); ``series``: one per eligible series.
MODES: tuple[str, ...] = ("study", "series")


def model_warnings(loaded: LoadedModel | LoadedBundle) -> tuple[str, ...]:
    """Sentences about a model that every result scored with it carries (a legacy
    file, a model trained on synthetic data or at another input shape)."""
    return loaded.warnings + loaded.card.caveats()


def read_settings(
    loaded: LoadedModel | LoadedBundle,
    *,
    mode: str = "study",
    min_slices: int = 16,
    study_timeout: float | None = STUDY_TIMEOUT_S,
    keep_volume: bool = False,
) -> ReadSettings:
    """How inputs are read for ``loaded``, without a backend: what a process that only
    reads (a Ray reading task) needs to prepare studies exactly as :class:`Screener`.

    Raises:
        ConfigError: an unknown ``mode``.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}.")
    return ReadSettings(
        config=loaded.card.preprocess,
        selection=SelectionConfig(min_slices=min_slices),
        all_series=mode == "series",
        warnings=model_warnings(loaded),
        study_timeout=study_timeout,
        keep_volume=keep_volume,
    )


class Screener:
    """A loaded model and how to run it; scores inputs study by study.

    Args:
        weights: a checkpoint file (or a model already loaded with
            :func:`ctscreen.weights.load_checkpoint`), or a bundle folder made by
            ``ctscreen export`` (or one loaded with :func:`ctscreen.bundle.load_bundle`),
            which runs with OpenVINO on the CPU and never imports PyTorch.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``
            (a bundle: ``auto`` or ``cpu``).
        backend: ``auto``, ``torch`` or ``openvino`` (see :mod:`ctscreen.backends`);
            a backend that fails falls back to PyTorch with one warning (a bundle:
            ``auto`` or ``openvino``, with nothing to fall back to).
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` (GPU only) or ``int8``
            (OpenVINO, a checkpoint made by ``ctscreen quantize``). ``auto`` in
            either is measured on this machine on first use (see
            :mod:`ctscreen.backends.choice`).
        threshold: decision threshold; None uses the model card's.
        mode: ``study`` or ``series`` (see :data:`MODES`).
        min_slices: series with fewer slices are not scored.
        localize: compute the localisation box of studies called pathological.
        batch_size: studies per forward pass (default 1 on the CPU, 4 on a GPU).
        readers: inputs read at once in threads (default 1 on the CPU, up to 4 on a GPU).
        prefetch: studies read ahead of the network (at least ``batch_size``).
        cache_dir: where an exported OpenVINO graph is kept (default beside
            the weights, or the user cache when that folder is read-only).
        study_timeout: seconds one study may take to read (its input's discovery
            included) before it becomes a failure and the run goes on; None: no limit.

    Raises:
        WeightsError: the checkpoint is missing, damaged or not a model.
        ConfigError: an unknown device, backend, precision or mode, or one this
            machine cannot run.
    """

    def __init__(
        self,
        weights: Path | str | LoadedModel | LoadedBundle,
        *,
        device: str | torch.device = "auto",
        backend: str = "auto",
        precision: str = "auto",
        threshold: float | None = None,
        mode: str = "study",
        min_slices: int = 16,
        localize: bool = True,
        batch_size: int | None = None,
        readers: int | None = None,
        prefetch: int = 2,
        cache_dir: Path | None = None,
        study_timeout: float | None = STUDY_TIMEOUT_S,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}.")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"the threshold must lie in [0, 1], not {threshold}.")
        if study_timeout is not None and not study_timeout > 0:
            raise ConfigError(f"the study time limit must be positive, not {study_timeout}.")
        self.study_timeout = study_timeout
        for name, value in (("batch size", batch_size), ("number of readers", readers)):
            if value is not None and value < 1:
                raise ConfigError(f"the {name} must be at least 1, not {value}.")
        bundle: LoadedBundle | None = None
        if isinstance(weights, LoadedBundle):
            bundle = weights
        elif isinstance(weights, (str, Path)) and is_bundle(weights):
            bundle = load_bundle(weights)
        self.device: torch.device | HostCpu
        self.loaded: LoadedModel | LoadedBundle
        if bundle is not None:
            # The torch-free path: OpenVINO graphs and their card, no PyTorch import.
            self.device = bundle_device(device)
            self.loaded = bundle
            self.bias = bundle.bias
        else:
            try:
                from .weights import LoadedModel, load_checkpoint
            except ModuleNotFoundError as exc:
                if exc.name not in ("torch", "torchvision"):
                    raise
                raise needs_torch(f"scoring the checkpoint {weights}") from exc

            self.device = device if not isinstance(device, str) else select_device(device)
            if isinstance(weights, LoadedModel):
                self.loaded = weights
            else:
                self.loaded = load_checkpoint(weights, device=self.device)
            self.loaded.model.to(self.device).eval()
            self.bias = float(self.loaded.model.fc.bias.detach().float().cpu()[0])
        self.mode = mode
        self.selection = SelectionConfig(min_slices=min_slices)
        self.localize = localize
        self.batch_size = batch_size or default_batch_size(self.device)
        self.readers = readers or default_readers(self.device)
        self.prefetch = max(prefetch, self.batch_size)
        self.threshold = self.card.threshold if threshold is None else float(threshold)
        self.threshold_rule = self.card.threshold_rule if threshold is None else "given"
        self.engine: Backend
        if bundle is not None:
            self.engine = bundle_backend(bundle, backend=backend, precision=precision)
        else:
            self.engine = make_backend(
                ModelSource.of(self.loaded, cache_root=cache_dir),
                device=self.device,
                backend=backend,
                precision=precision,
            )

    # ------------------------------------------------------------------ facts

    @property
    def card(self) -> ModelCard:
        """The model card of the checkpoint."""
        return self.loaded.card

    @property
    def config(self) -> PreprocessConfig:
        """The preprocessing the model was trained with (HU window, input shape)."""
        return self.loaded.card.preprocess

    @property
    def warnings(self) -> tuple[str, ...]:
        """Sentences about the model that every result carries (a legacy file, a model
        trained on synthetic data or at another input shape)."""
        return model_warnings(self.loaded)

    def run_info(self) -> dict[str, Any]:
        """Plain facts about this scorer for reports (the table's ``run`` sheet)."""
        pre = self.config
        return {
            "ctscreen_version": __version__,
            "weights": str(self.loaded.path),
            "weights_sha256": self.loaded.sha256,
            "threshold": self.threshold,
            "threshold_rule": self.threshold_rule,
            "preprocess": (
                f"HU window level {pre.window_level:g} / width {pre.window_width:g}, "
                f"input {' x '.join(str(s) for s in pre.shape)}"
            ),
            "device": str(self.device),
            "precision": self.engine.precision,
            "backend": self.engine.name,
            "mode": self.mode,
            "batch_size": self.batch_size,
            "readers": self.readers,
            "study_timeout_s": self.study_timeout,
            "model_warnings": "; ".join(self.warnings),
            "borderline_band": self.card.borderline_band,
            "note": "research tool, not for clinical use",
        }

    # ------------------------------------------------------------------ scoring

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[B]`` and activation maps ``[B, d', h', w']`` for ``batch [B, D, H, W]``.

        Raises:
            ConfigError: ``batch`` does not have the model card's input shape.
        """
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.config.shape):
            raise ConfigError(
                f"the model takes [B, {', '.join(map(str, self.config.shape))}] but got "
                f"{list(batch.shape)}; preprocess with the model card's settings."
            )
        return self.engine.run(np.ascontiguousarray(batch, dtype=np.float32)[:, None])

    def read_settings(self, *, keep_volume: bool = False) -> ReadSettings:
        """How this scorer reads inputs (the first stage of :meth:`score`), for
        :func:`ctscreen.pipeline.prepare` in another thread or process."""
        return read_settings(
            self.loaded,
            mode=self.mode,
            min_slices=self.selection.min_slices,
            study_timeout=self.study_timeout,
            keep_volume=keep_volume,
        )

    def score(
        self,
        inputs: Sequence[Path | str],
        *,
        keep_image: bool = False,
        keep_volume: bool = False,
    ) -> Generator[StudyResult, None, None]:
        """Score every study of every input.

        The two stages are public: :func:`ctscreen.pipeline.prepare` reads an input
        into prepared studies (with :meth:`read_settings`), and
        :meth:`score_prepared` runs the network on a group of them. This method
        chains them with a bounded read-ahead; the Ray engine spreads them over a
        cluster.

        Args:
            inputs: zip archives, folders, DICOM files or NIfTI files, in order.
            keep_image: attach the network input to each result (for pictures).
            keep_volume: attach the scored HU volume at the study's own resolution
                (for pictures drawn from its pixels; the largest array by far).

        Yields:
            One result per study (per eligible series in ``series`` mode), in
            input order then study order, whatever the batch size; a study that
            cannot be read or scored is a result with ``error`` set.
        """
        # Every temporary folder of this call lies under one run-owned root, removed at
        # the end however the call ends (finished, interrupted, or an abandoned reader).
        work_root = Path(tempfile.mkdtemp(prefix="ctscreen-run-"))
        items = prefetched(
            prepare_inputs(
                [Path(p) for p in inputs],
                self.read_settings(keep_volume=keep_volume),
                readers=self.readers,
                work_root=work_root,
            ),
            self.prefetch,
        )
        try:
            for group in batches(items, self.batch_size):
                yield from self.score_prepared(group, keep_image=keep_image)
        finally:
            items.close()
            shutil.rmtree(work_root, ignore_errors=True)

    def score_prepared(
        self, group: Sequence[PreparedStudy], *, keep_image: bool = False
    ) -> Iterator[StudyResult]:
        """The model stage: one result per prepared study of ``group``, in order.

        The studies that were read are scored in one forward pass (so ``group``
        should hold at most :attr:`batch_size` of them); one that failed to read
        gives its failure result. Each item's arrays are dropped once its result
        is made.

        Args:
            group: items from :func:`ctscreen.pipeline.prepare`, read with this
                scorer's :meth:`read_settings`.
            keep_image: attach the network input to each result.
        """
        scorable = [item for item in group if item.array is not None]
        outputs: dict[int, tuple[float, np.ndarray]] = {}
        share = 0.0
        if scorable:
            t0 = time.perf_counter()
            logits, cams = self.forward(np.stack([item.array for item in scorable]))
            share = (time.perf_counter() - t0) / len(scorable)  # each study's share
            outputs = {
                id(item): (float(lg), cam)
                for item, lg, cam in zip(scorable, logits, cams, strict=True)
            }
        for item in group:
            if item.array is None:
                yield self._failure(item)
            else:
                logit, cam = outputs[id(item)]
                yield self._success(item, logit, cam, model_seconds=share, keep_image=keep_image)
            item.array = None  # the batch's inputs are not kept past their results
            item.volume = None

    def _failure(self, item: PreparedStudy, *, error: str = "") -> StudyResult:
        return StudyResult(
            input_path=item.input_path,
            location=item.location,
            study_uid=item.study_uid,
            series_uid=item.series_uid,
            series_reason=item.reason,
            error=error or item.error,
            warnings=item.warnings,
            threshold=self.threshold,
            seconds=item.seconds,
            header=item.header,
        )

    def _success(
        self,
        item: PreparedStudy,
        logit: float,
        cam: np.ndarray,
        *,
        model_seconds: float,
        keep_image: bool,
    ) -> StudyResult:
        geometry = item.geometry
        assert geometry is not None
        if not np.isfinite(logit) or not np.all(np.isfinite(cam)):
            # A number nobody can trust is never a Success.
            return self._failure(
                item,
                error="the network gave a non-finite output for this study (the input values "
                "are not physical, or the weights are damaged); check both.",
            )
        probability = float(sigmoid(logit))
        pathology = int(probability >= self.threshold)
        box = localization_box(cam, geometry) if (self.localize and pathology) else None
        borderline = self.card.is_borderline(probability, self.threshold)
        warnings = item.warnings
        if self.localize and pathology and box is None:
            warnings += (
                "no localisation: the network's evidence is not in one region (more than "
                "half of the scan is as hot as its peak region, or no part is positive), so "
                "no box is given",
            )
        if borderline:
            warnings += (
                f"borderline: the probability {probability:.3f} lies within "
                f"{self.card.borderline_band:g} of the threshold {self.threshold:.3f}, so the "
                "decision is not a firm one",
            )
        return StudyResult(
            input_path=item.input_path,
            location=item.location,
            study_uid=item.study_uid,
            series_uid=item.series_uid,
            series_reason=item.reason,
            warnings=warnings,
            probability=probability,
            logit=logit,
            pathology=pathology,
            threshold=self.threshold,
            box=box,
            slice_scores=slice_scores(cam, self.bias, geometry.shape[0]),
            slices=geometry.slices,
            cam=cam,
            bias=self.bias,
            geometry=geometry,
            image=item.array if keep_image else None,
            volume=item.volume,
            borderline=borderline,
            seconds=item.seconds + model_seconds,
            timings={**item.timings, "model_s": model_seconds},
            header=item.header,
        )
