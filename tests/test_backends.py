"""Backends give the fp32 answer, the export cache is safe, a failing backend falls back."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctscreen import backends
from ctscreen.backends import FallbackBackend, ModelSource, TorchBackend, make_backend
from ctscreen.card import ModelCard
from ctscreen.config import PreprocessConfig
from ctscreen.errors import ConfigError
from ctscreen.model import build_model, forward_with_cam
from ctscreen.screener import Screener
from ctscreen.weights import save_checkpoint

SHAPE = (16, 32, 32)
CPU = torch.device("cpu")
#: Stands for the hash of the weight file of the module's ``model`` fixture.
MODEL_SHA = "ab" * 32


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model()
    nn.init.normal_(model.fc.weight, 0.0, 0.2)  # a head that gives logits far from 0
    nn.init.constant_(model.fc.bias, 0.3)
    return model.eval()


def _save(path: Path, seed: int) -> Path:
    save_checkpoint(path, _model(seed), ModelCard(preprocess=PreprocessConfig(shape=SHAPE)))
    return path


def _inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, *SHAPE), dtype=np.float32)


def _reference(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The plain fp32 forward: the model's own head output, and the fp32 map."""
    with torch.inference_mode():
        tensor = torch.from_numpy(x)
        logits = model(tensor)[:, 0].numpy()
        _, cam = forward_with_cam(model, tensor)
    return logits, cam.numpy()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model(0)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return _inputs(3)


@pytest.fixture(scope="module")
def ov_cache(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the OpenVINO export of ``model`` (exported once per module)."""
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("ov-cache")
    backends.cached_export(
        model,
        weights_sha256=MODEL_SHA,
        shape=SHAPE,
        cache_root=root,
        recipe=backends.openvino_recipe(),
    )
    return root


@pytest.fixture()
def no_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import openvino`` fail, as on a machine without the extra."""
    monkeypatch.setitem(sys.modules, "openvino", None)


# --------------------------------------------------------------------------- torch


def test_torch_fp32_matches_the_model(model: nn.Module, batch: np.ndarray) -> None:
    ref_logits, ref_cam = _reference(model, batch)
    logits32, cam32 = TorchBackend(model, CPU, "fp32").run(batch)
    assert logits32.shape == (3,) and cam32.shape == (3, 2, 2, 2)
    np.testing.assert_allclose(logits32, ref_logits, atol=1e-4)
    np.testing.assert_allclose(cam32, ref_cam, atol=1e-4)


def test_torch_refuses_fp16_on_the_cpu(model: nn.Module) -> None:
    with pytest.raises(ConfigError, match="fp16"):
        TorchBackend(model, CPU, "fp16")


# --------------------------------------------------------------------------- every backend


@pytest.mark.parametrize(
    ("name", "precision", "tolerance"),
    [
        ("torch", "fp32", 1e-4),
        ("torch", "bf16", 0.05),
        ("openvino", "fp32", 1e-4),
        ("openvino", "bf16", 0.05),
    ],
)
def test_every_backend_keeps_the_cam_decomposition(
    name: str,
    precision: str,
    tolerance: float,
    model: nn.Module,
    batch: np.ndarray,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = request.getfixturevalue("ov_cache") if name == "openvino" else None
    exports = _count_exports(monkeypatch)
    engine = make_backend(
        ModelSource(model, MODEL_SHA, PreprocessConfig(shape=SHAPE), cache_root=cache),
        device=CPU,
        backend=name,
        precision=precision,
    )
    assert engine.name == name and not exports  # the module's export is reused
    logits, cam = engine.run(batch)
    ref_logits, ref_cam = _reference(model, batch)
    bias = float(model.fc.bias.detach()[0])
    assert cam.shape == ref_cam.shape and cam.dtype == np.float32
    np.testing.assert_allclose(cam.mean(axis=(1, 2, 3)) + bias, logits, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=tolerance)
    np.testing.assert_allclose(cam, ref_cam, atol=tolerance * max(1.0, np.abs(ref_cam).max()))
    # the inputs differ enough for the logits to differ: the checks above are not vacuous
    assert np.ptp(ref_logits) > 10 * np.abs(logits - ref_logits).max()


# --------------------------------------------------------------------------- openvino cache


def _count_exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the output folder of every OpenVINO export from now on."""
    calls: list[Path] = []
    real = backends.openvino_backend.export_openvino

    def counting(model: nn.Module, *, shape: tuple[int, int, int], out_dir: Path) -> None:
        calls.append(out_dir)
        real(model, shape=shape, out_dir=out_dir)

    monkeypatch.setattr(backends.openvino_backend, "export_openvino", counting)
    return calls


def test_openvino_export_is_cached_and_rebuilt_when_the_weights_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    exports = _count_exports(monkeypatch)
    weights = _save(tmp_path / "model.pth", seed=0)
    x = _inputs(1, seed=5)[:, 0]

    first = Screener(weights, device="cpu", precision="fp32", backend="openvino")
    entries = list((tmp_path / ".ctscreen-export").iterdir())
    assert len(exports) == 1 and len(entries) == 1 and first.engine.name == "openvino"
    bin_file = entries[0] / "model.bin"
    stamp = bin_file.stat().st_mtime_ns
    logits_a, _ = first.forward(x)

    second = Screener(weights, device="cpu", precision="fp32", backend="openvino")
    assert len(exports) == 1, "the second load must reuse the export"
    assert bin_file.stat().st_mtime_ns == stamp
    np.testing.assert_allclose(second.forward(x)[0], logits_a, atol=1e-6)

    _save(weights, seed=1)  # same path, new weights
    third = Screener(weights, device="cpu", precision="fp32", backend="openvino")
    assert len(exports) == 2
    remaining = list((tmp_path / ".ctscreen-export").iterdir())
    assert len(remaining) == 1 and remaining[0] != entries[0]  # the stale entry is gone
    logits_c, _ = third.forward(x)
    np.testing.assert_allclose(logits_c, _reference(_model(1), x[:, None])[0], atol=1e-4)
    assert abs(float(logits_c[0]) - float(logits_a[0])) > 1e-3


def test_openvino_damaged_export_is_rebuilt_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: nn.Module, ov_cache: Path
) -> None:
    shutil.copytree(ov_cache, tmp_path, dirs_exist_ok=True)
    exports = _count_exports(monkeypatch)
    kwargs = dict(
        weights_sha256=MODEL_SHA,
        weights_path=None,
        shape=SHAPE,
        precision="fp32",
        cache_root=tmp_path,
    )
    assert backends.load_openvino(model, **kwargs).from_cache and not exports
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    data = (entry / "model.bin").read_bytes()
    (entry / "model.bin").write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))

    engine = backends.load_openvino(model, **kwargs)
    assert len(exports) == 1 and not engine.from_cache
    x = _inputs(1, seed=7)
    np.testing.assert_allclose(engine.run(x)[0], _reference(model, x)[0], atol=1e-4)
    assert backends.load_openvino(model, **kwargs).from_cache
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left


def test_openvino_runs_batch_one_of_the_static_shape_only(model: nn.Module, ov_cache: Path) -> None:
    engine = backends.load_openvino(
        model,
        weights_sha256=MODEL_SHA,
        weights_path=None,
        shape=SHAPE,
        precision="fp32",
        cache_root=ov_cache,
    )
    with pytest.raises(ConfigError, match="takes"):
        engine.run(np.zeros((1, 1, 16, 32, 16), np.float32))
    logits, cam = engine.run(_inputs(2))  # a batch runs as two batch-1 requests
    assert logits.shape == (2,) and cam.shape == (2, 2, 2, 2)


def test_openvino_bf16_hands_fp16_on_between_the_largest_stages(ov_cache: Path) -> None:
    import openvino as ov

    (entry,) = [p for p in ov_cache.iterdir() if p.name.startswith("openvino-")]
    core = ov.Core()
    graphs = [
        core.read_model(str(entry / f"{stage}.xml"))
        for stage in backends.openvino_backend._OV_STAGES
    ]
    half = backends.half_boundaries(graphs)
    f16, f32 = ov.Type.f16, ov.Type.f32
    assert [g.input(0).get_element_type() for g in half] == [f32, f16, f16, f32, f32]
    assert [g.output(0).get_element_type() for g in half[:4]] == [f16, f16, f32, f32]
    assert half[-1].output(1).get_element_type() == f32  # the map comes back in fp32


def test_finite_half_reads_infinities_and_nans_from_the_bits() -> None:
    values = np.linspace(-65504, 65504, 1001).astype(np.float16)
    assert backends.finite_half(values)
    for bad in (np.inf, -np.inf, np.nan):
        spoiled = values.copy()
        spoiled[500] = bad
        assert not backends.finite_half(spoiled)
    with np.errstate(over="ignore"):  # 70000 is past fp16's largest value
        assert not backends.finite_half(np.array([70000.0], np.float32).astype(np.float16))
    assert backends.finite_half(np.array([np.inf], np.float32))  # only fp16 is checked
    assert backends.finite_half(np.zeros(0, np.float16))


def test_openvino_output_beyond_fp16_hands_the_run_to_torch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("openvino")
    if not backends.openvino_bf16_capable():
        pytest.skip("this CPU has no native bf16, so OpenVINO runs fp32 throughout")
    model = _model(3)
    with torch.no_grad():  # stem activations far beyond fp16's largest value, 65504
        model.stem[1].weight.mul_(1e7)
        model.stem[1].bias.mul_(1e7)
    engine = make_backend(
        ModelSource(model, "cd" * 32, PreprocessConfig(shape=SHAPE), cache_root=tmp_path),
        device=CPU,
        backend="openvino",
        precision="bf16",
    )
    assert engine.name == "openvino"
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        logits, cam = engine.run(_inputs(1))
    assert engine.name == "torch" and len(caplog.records) == 1
    assert "beyond fp16" in caplog.records[0].getMessage()
    assert np.isfinite(logits).all() and np.isfinite(cam).all()


# --------------------------------------------------------------------------- fallback


def test_auto_falls_back_to_torch_without_openvino(
    no_openvino: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = _save(tmp_path / "model.pth", seed=0)
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        auto = Screener(weights, device="cpu", precision="fp32", backend="auto")
    assert auto.engine.name == "torch" and not caplog.records  # one candidate: nothing to time
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        asked = Screener(weights, device="cpu", precision="fp32", backend="openvino")
    assert asked.engine.name == "torch"
    assert len(caplog.records) == 1 and "not installed" in caplog.records[0].getMessage()
    x = _inputs(1)[:, 0]
    np.testing.assert_allclose(asked.forward(x)[0], _reference(_model(0), x[:, None])[0], atol=1e-4)
    assert not (tmp_path / ".ctscreen-export").exists()


def test_a_backend_that_fails_to_load_falls_back_with_one_warning(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backends, "openvino_version", lambda: "0.0-test")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("compile failed")

    monkeypatch.setattr(backends, "load_openvino", broken)
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        engine = make_backend(
            ModelSource(model, "", PreprocessConfig(shape=SHAPE)),
            device=CPU,
            backend="openvino",
            precision="fp32",
        )
    assert engine.name == "torch"
    assert len(caplog.records) == 1 and "compile failed" in caplog.records[0].getMessage()


class _FailingRun:
    name = "openvino"
    precision = "bf16"

    def __init__(self) -> None:
        self.calls = 0

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        raise RuntimeError("infer request failed")


def test_a_backend_that_fails_to_run_switches_to_torch_once(
    model: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    primary = _FailingRun()
    made: list[TorchBackend] = []

    def fallback() -> TorchBackend:
        made.append(TorchBackend(model, CPU, "fp32"))
        return made[-1]

    engine = FallbackBackend(primary, fallback)
    x = _inputs(1)
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        first = engine.run(x)
        second = engine.run(x)
    assert primary.calls == 1 and len(made) == 1 and engine.name == "torch"
    assert engine.precision == "fp32" and len(caplog.records) == 1
    np.testing.assert_allclose(first[0], _reference(model, x)[0], atol=1e-4)
    np.testing.assert_array_equal(first[0], second[0])


def test_scorer_checks_the_input_shape(tmp_path: Path) -> None:
    scorer = Screener(_save(tmp_path / "m.pth", seed=0), device="cpu", precision="fp32")
    with pytest.raises(ConfigError, match="16, 32, 32"):
        scorer.forward(np.zeros((1, 16, 32, 30), np.float32))


def test_export_cache_goes_to_the_user_cache_without_a_weights_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTSCREEN_CACHE_DIR", str(tmp_path / "cache"))
    assert backends.export_cache_root(None) == tmp_path / "cache" / "export"
    (tmp_path / "w").mkdir()
    weights = _save(tmp_path / "w" / "m.pth", seed=0)
    assert backends.export_cache_root(weights) == tmp_path / "w" / ".ctscreen-export"
    beside = tmp_path / "w" / ".ctscreen-export"
    # the folder beside the weights is read-only
    monkeypatch.setattr(backends.export_cache, "_writable_dir", lambda p: p != beside)
    assert backends.export_cache_root(weights) == tmp_path / "cache" / "export"
