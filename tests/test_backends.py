"""Backends give the fp32 answer, the export cache is safe, auto picks and falls back."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctscreen import backends
from ctscreen.backends import FallbackBackend, TorchBackend, make_backend, resolve_backend
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


@pytest.fixture(scope="module")
def ort_cache(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the ONNX export of ``model`` (exported once per module)."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("ort-cache")
    backends.cached_export(
        model,
        weights_sha256=MODEL_SHA,
        shape=SHAPE,
        cache_root=root,
        recipe=backends.onnxruntime_recipe(),
    )
    return root


@pytest.fixture()
def no_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import openvino`` fail, as on a machine without the extra."""
    monkeypatch.setitem(sys.modules, "openvino", None)


@pytest.fixture()
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import onnxruntime`` fail, as on a machine without the extra."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


# --------------------------------------------------------------------------- torch


def test_torch_fp32_matches_the_model_and_bf16_stays_close(
    model: nn.Module, batch: np.ndarray
) -> None:
    ref_logits, ref_cam = _reference(model, batch)
    logits32, cam32 = TorchBackend(model, CPU, "fp32").run(batch)
    logits16, cam16 = TorchBackend(model, CPU, "bf16").run(batch)
    assert logits32.shape == (3,) and cam32.shape == (3, 2, 2, 2)
    np.testing.assert_allclose(logits32, ref_logits, atol=1e-4)
    np.testing.assert_allclose(cam32, ref_cam, atol=1e-4)
    assert np.abs(logits16 - ref_logits).max() < 0.05
    assert np.abs(cam16 - ref_cam).max() < 0.05 * np.abs(ref_cam).max() + 0.05
    # the inputs differ enough for the logits to differ: the check above is not vacuous
    assert np.ptp(ref_logits) > 10 * np.abs(logits16 - ref_logits).max()


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
        ("onnxruntime", "fp32", 1e-4),
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
    cache_fixture = {"openvino": "ov_cache", "onnxruntime": "ort_cache"}.get(name)
    cache = request.getfixturevalue(cache_fixture) if cache_fixture else None
    exports = _count_exports(monkeypatch)
    engine = make_backend(
        model,
        device=CPU,
        backend=name,
        precision=precision,
        weights_sha256=MODEL_SHA,
        shape=SHAPE,
        cache_root=cache,
    )
    assert engine.name == name and not exports  # the module's export is reused
    logits, cam = engine.run(batch)
    ref_logits, ref_cam = _reference(model, batch)
    bias = float(model.fc.bias.detach()[0])
    assert cam.shape == ref_cam.shape and cam.dtype == np.float32
    np.testing.assert_allclose(cam.mean(axis=(1, 2, 3)) + bias, logits, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=tolerance)
    np.testing.assert_allclose(cam, ref_cam, atol=tolerance * max(1.0, np.abs(ref_cam).max()))


# --------------------------------------------------------------------------- openvino cache


def _count_exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the output folder of every OpenVINO or ONNX export from now on."""
    calls: list[Path] = []
    for module, name in (
        (backends.openvino_backend, "export_openvino"),
        (backends.onnx_backend, "export_onnx"),
    ):
        real = getattr(module, name)

        def counting(
            model: nn.Module, *, shape: tuple[int, int, int], out_dir: Path, real=real
        ) -> None:
            calls.append(out_dir)
            real(model, shape=shape, out_dir=out_dir)

        monkeypatch.setattr(module, name, counting)
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
    if backends.openvino_hint("bf16") != "bf16":
        pytest.skip("this CPU has no native bf16, so OpenVINO runs fp32 throughout")
    model = _model(3)
    with torch.no_grad():  # stem activations far beyond fp16's largest value, 65504
        model.stem[1].weight.mul_(1e7)
        model.stem[1].bias.mul_(1e7)
    engine = make_backend(
        model,
        device=CPU,
        backend="openvino",
        precision="bf16",
        weights_sha256="cd" * 32,
        shape=SHAPE,
        cache_root=tmp_path,
    )
    assert engine.name == "openvino"
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        logits, cam = engine.run(_inputs(1))
    assert engine.name == "torch" and len(caplog.records) == 1
    assert "beyond fp16" in caplog.records[0].getMessage()
    assert np.isfinite(logits).all() and np.isfinite(cam).all()


# --------------------------------------------------------------------------- onnxruntime


def _load_ort(
    model: nn.Module, cache_root: Path, precision: str = "fp32"
) -> backends.OnnxRuntimeBackend:
    return backends.load_onnxruntime(
        model,
        weights_sha256=MODEL_SHA,
        weights_path=None,
        shape=SHAPE,
        precision=precision,
        cache_root=cache_root,
    )


def _make_ort(
    model: nn.Module, cache_root: Path, precision: str = "fp32", device: torch.device = CPU
) -> backends.Backend:
    """``make_backend`` asked for ONNX Runtime with the module model's weight hash."""
    return make_backend(
        model,
        device=device,
        backend="onnxruntime",
        precision=precision,
        weights_sha256=MODEL_SHA,
        shape=SHAPE,
        cache_root=cache_root,
    )


def test_onnxruntime_gives_the_torch_fp32_answer_for_any_batch(
    model: nn.Module, ort_cache: Path
) -> None:
    engine = _load_ort(model, ort_cache)
    assert engine.name == "onnxruntime" and engine.precision == "fp32" and engine.from_cache
    x = _inputs(2, seed=3)
    logits, cam = engine.run(x)
    torch_logits, torch_cam = TorchBackend(model, CPU, "fp32").run(x)
    assert cam.shape == (2, 2, 2, 2) and cam.dtype == np.float32 and logits.dtype == np.float32
    np.testing.assert_allclose(cam, torch_cam, atol=1e-4)
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4)
    assert abs(float(logits[0] - logits[1])) > 1e-2  # two different answers, both matched
    one_logit, one_cam = engine.run(x[1:])  # the graph takes any batch size
    np.testing.assert_allclose(one_cam[0], cam[1], atol=1e-5)
    with pytest.raises(ConfigError, match="takes"):
        engine.run(np.zeros((1, 1, 16, 32, 16), np.float32))


def test_onnxruntime_export_is_one_file_cached_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: nn.Module
) -> None:
    pytest.importorskip("onnxruntime")
    exports = _count_exports(monkeypatch)
    first = _load_ort(model, tmp_path)
    assert len(exports) == 1 and not first.from_cache
    (entry,) = tmp_path.iterdir()
    assert entry.name.startswith(f"onnxruntime-{MODEL_SHA[:16]}-")
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["shape"] == list(SHAPE)
    assert manifest["backend_version"] == backends.onnxruntime_version()
    assert manifest["exporter"].startswith("torch ") and "onnxscript" in manifest["exporter"]
    stamp = (entry / "model.onnx").stat().st_mtime_ns

    second = _load_ort(model, tmp_path)
    assert len(exports) == 1 and second.from_cache, "the second load must reuse the export"
    assert (entry / "model.onnx").stat().st_mtime_ns == stamp
    x = _inputs(2, seed=4)
    for a, b in zip(first.run(x), second.run(x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_onnxruntime_damaged_export_is_rebuilt_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: nn.Module, ort_cache: Path
) -> None:
    shutil.copytree(ort_cache, tmp_path, dirs_exist_ok=True)
    exports = _count_exports(monkeypatch)
    assert _load_ort(model, tmp_path).from_cache and not exports
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    data = (entry / "model.onnx").read_bytes()
    (entry / "model.onnx").write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))

    engine = _load_ort(model, tmp_path)
    assert len(exports) == 1 and not engine.from_cache
    x = _inputs(1, seed=7)
    np.testing.assert_allclose(engine.run(x)[0], _reference(model, x)[0], atol=1e-4)
    assert _load_ort(model, tmp_path).from_cache
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left


def test_openvino_and_onnxruntime_exports_of_one_weight_file_coexist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    weights = _save(tmp_path / "model.pth", seed=0)
    cache = tmp_path / ".ctscreen-export"

    def entries() -> dict[str, str]:
        """Backend -> name of its one entry (fails when a backend has two)."""
        found: dict[str, str] = {}
        for entry in cache.iterdir():
            backend = entry.name.split("-")[0]
            assert backend not in found, f"two {backend} entries"
            found[backend] = entry.name
        return found

    for backend in ("openvino", "onnxruntime"):
        scorer = Screener(weights, device="cpu", precision="fp32", backend=backend)
        assert scorer.engine.name == backend
    old = entries()
    assert set(old) == {"openvino", "onnxruntime"}

    _save(weights, seed=1)  # same path, new weights: the ONNX export is replaced ...
    x = _inputs(1, seed=5)[:, 0]
    ort = Screener(weights, device="cpu", precision="fp32", backend="onnxruntime")
    now = entries()
    assert now["onnxruntime"] != old["onnxruntime"] and now["openvino"] == old["openvino"]
    np.testing.assert_allclose(ort.forward(x)[0], _reference(_model(1), x[:, None])[0], atol=1e-4)
    Screener(weights, device="cpu", precision="fp32", backend="openvino")  # ... then the IR
    last = entries()
    assert last["openvino"] != old["openvino"] and last["onnxruntime"] == now["onnxruntime"]


def test_onnxruntime_runs_fp32_and_says_so_when_bf16_is_asked(
    model: nn.Module, ort_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = _inputs(2, seed=6)
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        quiet = _load_ort(model, ort_cache, precision="auto")
        fp32 = _load_ort(model, ort_cache, precision="fp32")
    assert not caplog.records and quiet.precision == fp32.precision == "fp32"
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        engine = _make_ort(model, ort_cache, "bf16")
    assert engine.name == "onnxruntime" and engine.precision == "fp32"
    assert len(caplog.records) == 1 and "fp32" in caplog.records[0].getMessage()
    np.testing.assert_array_equal(engine.run(x)[1], fp32.run(x)[1])
    with pytest.raises(ConfigError, match="fp16"):
        _make_ort(model, ort_cache, "fp16")


def test_onnxruntime_that_fails_to_run_switches_to_torch_once(
    model: nn.Module, ort_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _make_ort(model, ort_cache)
    assert isinstance(engine, FallbackBackend) and engine.name == "onnxruntime"

    class BrokenSession:
        def run(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("session run failed")

    engine.primary.session = BrokenSession()
    x = _inputs(2)
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        first = engine.run(x)
        second = engine.run(x)
    assert engine.name == "torch" and len(caplog.records) == 1
    assert "onnxruntime" in caplog.records[0].getMessage()
    np.testing.assert_allclose(first[0], _reference(model, x)[0], atol=1e-4)
    np.testing.assert_array_equal(first[0], second[0])


def test_onnxruntime_asked_but_not_installed_runs_torch_with_one_warning(
    no_onnxruntime: None, model: nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert backends.onnxruntime_version() is None
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        engine = _make_ort(model, tmp_path)
    assert engine.name == "torch" and len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "ONNX Runtime is not installed" in message and "ctscreen[onnxruntime]" in message
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- choice, fallback


def test_auto_picks_openvino_on_the_cpu_only_when_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the order with it: tests below
    expected = "torch" if backends.openvino_version() is None else "openvino"
    assert resolve_backend("auto", CPU) == expected
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ConfigError, match="CPU"):
        resolve_backend("openvino", torch.device("cuda"))
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backend("tensorrt", CPU)
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert resolve_backend("auto", CPU) == "torch"


@pytest.mark.parametrize(
    ("openvino", "native_bf16", "onnxruntime", "precision", "expected"),
    [
        ("2026.4", True, "1.32", "auto", "openvino"),
        ("2026.4", False, "1.32", "fp32", "openvino"),
        (None, True, "1.32", "auto", "torch"),  # bf16 autocast beats ONNX Runtime fp32
        (None, True, "1.32", "bf16", "torch"),
        (None, True, "1.32", "fp32", "onnxruntime"),  # fp32 asked: ONNX Runtime beats torch
        (None, False, "1.32", "auto", "onnxruntime"),
        (None, False, "1.32", "fp32", "onnxruntime"),
        (None, False, "1.32", "bf16", "torch"),  # bf16 asked: only torch runs it
        (None, False, None, "auto", "torch"),
        (None, True, None, "auto", "torch"),
    ],
)
def test_auto_on_the_cpu_picks_openvino_then_torch_bf16_then_onnxruntime(
    openvino: str | None,
    native_bf16: bool,
    onnxruntime: str | None,
    precision: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backends, "openvino_version", lambda: openvino)
    monkeypatch.setattr(backends, "onnxruntime_version", lambda: onnxruntime)
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: native_bf16)
    assert resolve_backend("auto", CPU, precision) == expected
    assert resolve_backend("auto", torch.device("cuda"), precision) == "torch"


def test_onnxruntime_runs_on_the_cpu_only(model: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ONNX Runtime backend runs on the CPU"):
        resolve_backend("onnxruntime", torch.device("cuda"))
    with pytest.raises(ConfigError, match="--device cpu"):
        _make_ort(model, tmp_path, "bf16", torch.device("cuda"))
    assert resolve_backend("onnxruntime", CPU) == "onnxruntime"


def test_auto_falls_back_to_torch_without_openvino(
    no_openvino: None, no_onnxruntime: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = _save(tmp_path / "model.pth", seed=0)
    with caplog.at_level(logging.WARNING, logger="ctscreen.backends"):
        auto = Screener(weights, device="cpu", precision="fp32", backend="auto")
    assert auto.engine.name == "torch" and not caplog.records  # auto: silent
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
        engine = make_backend(model, device=CPU, backend="auto", precision="fp32", shape=SHAPE)
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
