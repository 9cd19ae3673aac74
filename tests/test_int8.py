"""INT8: quantized from the user's calibration studies, carried in the checkpoint, checked
against fp32, cached like the other exports, and run by ``--precision int8``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ctscreen import backends
from ctscreen.card import ModelCard
from ctscreen.cli import main
from ctscreen.config import PreprocessConfig
from ctscreen.data.cache import save_entry
from ctscreen.model import build_model
from ctscreen.quantize import AUTO_KEEP, compare, read_studies
from ctscreen.screener import Screener
from ctscreen.weights import load_checkpoint, save_checkpoint

pytest.importorskip("openvino")
pytest.importorskip("nncf")

SHAPE = (16, 32, 32)
CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model()
    nn.init.normal_(model.fc.weight, 0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def calibration() -> list[np.ndarray]:
    """Phantom chests at the model's shape (what ``gate_inputs`` draws), plus noise."""
    phantoms = [x[0, 0] for x in backends.gate_inputs(PreprocessConfig(shape=SHAPE))]
    rng = np.random.default_rng(0)
    return phantoms + [np.clip(p + rng.normal(0, 0.05, p.shape), 0, 1) for p in phantoms]


@pytest.fixture(scope="module")
def graph(calibration: list[np.ndarray]) -> backends.Int8Graph:
    return backends.quantize_openvino(_model(), shape=SHAPE, calibration=calibration)


def test_keep_names_find_the_stem_and_head_by_graph_order() -> None:
    ov_graph = backends.openvino_int8.convert_cam_network(_model(), SHAPE)
    stem = backends.openvino_int8.keep_names(ov_graph, ["stem"])
    assert len(stem) == 1
    (first_conv,) = [op for op in ov_graph.get_ordered_ops() if op.get_friendly_name() == stem[0]]
    assert first_conv.input_value(0).get_node().get_type_name() == "Parameter"  # reads x
    head = backends.openvino_int8.keep_names(ov_graph, ["head"])
    assert {n for n in head if "fc" in n} and len(head) == 2
    assert len(backends.openvino_int8.keep_names(ov_graph, ["layer2", "layer3"])) == 10
    with pytest.raises(Exception, match="choose from"):
        backends.openvino_int8.keep_names(ov_graph, ["layer5"])


def test_int8_graph_runs_close_to_fp32_and_keeps_the_cam_decomposition(
    graph: backends.Int8Graph, calibration: list[np.ndarray], tmp_path: Path
) -> None:
    model = _model()
    engine = backends.load_openvino_int8(
        model, graph, weights_sha256="ab" * 32, weights_path=None, shape=SHAPE, cache_root=tmp_path
    )
    assert engine.precision == "int8" and not engine.from_cache
    x = np.stack(calibration[:2])[:, None]
    logits, cam = engine.run(x)
    ref_logits, ref_cam = backends.TorchBackend(model, CPU, "fp32").run(x)
    bias = float(model.fc.bias.detach()[0])
    np.testing.assert_allclose(cam.mean(axis=(1, 2, 3)) + bias, logits, atol=1e-5)
    assert cam.shape == ref_cam.shape
    assert np.abs(logits - ref_logits).max() < 0.1 * max(1.0, np.abs(ref_logits).max())
    again = backends.load_openvino_int8(
        model, graph, weights_sha256="ab" * 32, weights_path=None, shape=SHAPE, cache_root=tmp_path
    )
    assert again.from_cache  # written into the export cache once, then reused
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert entry.name.startswith("openvino_int8-") and manifest["shape"] == list(SHAPE)
    assert (entry / "model.bin").read_bytes() == graph.weights


def test_the_checkpoint_carries_the_graph_and_int8_runs_from_it(
    graph: backends.Int8Graph, tmp_path: Path
) -> None:
    record = {"calibration": {"n_studies": 4}, "check": {"passed": True, "summary": "passed"}}
    card = ModelCard(preprocess=PreprocessConfig(shape=SHAPE), quantization=record)
    save_checkpoint(tmp_path / "q.pth", _model(), card, int8_graph=graph)
    loaded = load_checkpoint(tmp_path / "q.pth")
    assert loaded.int8_graph == graph and loaded.card.quantization == record
    scorer = Screener(tmp_path / "q.pth", device="cpu", precision="int8")
    assert (scorer.engine.name, scorer.engine.precision) == ("openvino", "int8")
    assert scorer.run_info()["precision"] == "int8"
    exports = (tmp_path / ".ctscreen-export").iterdir()
    assert any(p.name.startswith("openvino_int8-") for p in exports)
    plain = tmp_path / "plain.pth"
    save_checkpoint(plain, _model(), ModelCard(preprocess=PreprocessConfig(shape=SHAPE)))
    assert load_checkpoint(plain).int8_graph is None


def test_auto_never_runs_an_int8_graph_whose_recorded_check_failed(
    graph: backends.Int8Graph, tmp_path: Path
) -> None:
    record = {"check": {"passed": False, "summary": "FAILED: max |p - p_fp32| 0.06"}}
    card = ModelCard(preprocess=PreprocessConfig(shape=SHAPE), quantization=record)
    save_checkpoint(tmp_path / "bad.pth", _model(), card, int8_graph=graph)
    loaded = load_checkpoint(tmp_path / "bad.pth")
    source = backends.ModelSource(
        loaded.model,
        loaded.sha256,
        loaded.card.preprocess,
        cache_root=tmp_path / "export",
        int8_graph=loaded.int8_graph,
        int8_failed_check="FAILED: max |p - p_fp32| 0.06",
    )
    choice, built = backends.choose_backend(
        source, device=CPU, backend="openvino", choices_file=tmp_path / "choices.json", rounds=1
    )
    int8 = backends.Candidate("openvino", "int8")
    (trial,) = [t for t in choice.trials if t.candidate == int8]
    assert not trial.passed and "0.06" in trial.note and choice.winner != int8
    assert int8 not in built


def test_compare_lists_every_flip_with_its_fp32_probability() -> None:
    p32 = np.array([0.10, 0.49, 0.52, 0.90, 0.30])
    p8 = np.array([0.11, 0.51, 0.515, 0.89, 0.30])
    result = compare(p32, p8, names=list("abcde"), labels=[0, 1, 1, 1, None], threshold=0.5)
    assert [(f.name, f.p_fp32) for f in result.flips] == [("b", 0.49)]
    assert result.max_dp == pytest.approx(0.02) and not result.passed  # 0.02 > 0.01
    assert result.auc_fp32 == result.auc_int8 == 1.0 and result.n_labelled == 4
    assert compare(p32, p32, names=list("abcde"), labels=[None] * 5, threshold=0.5).passed


def test_quantize_command_calibrates_checks_and_records_it(
    calibration: list[np.ndarray], make_series, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "model.pth"
    save_checkpoint(weights, _model(), ModelCard(preprocess=PreprocessConfig(shape=SHAPE)))
    cache = tmp_path / "cache"
    cache.mkdir()
    for i, x in enumerate(calibration):
        save_entry(cache / f"{i:02d}.npy", x)
    check = tmp_path / "check"
    rows = []
    for seed, pathology in ((1, None), (2, "consolidation")):
        paths, _ = make_series(seed=seed, pathology=pathology, name=f"check/s{seed}")
        ds_uid = read_studies(paths[0].parent, PreprocessConfig(shape=SHAPE)).study_uids[0]
        rows.append({"study_uid": ds_uid, "label": int(pathology is not None)})
    pd.DataFrame(rows).to_csv(check / "labels.csv", index=False)
    out = tmp_path / "model-int8.pth"
    args = ["--calibration", str(cache), "--check", str(check), "-o", str(out)]
    code = main(["quantize", str(weights), *args])
    printed = capsys.readouterr().out
    loaded = load_checkpoint(out)
    q = loaded.card.quantization
    assert code in (0, 1) and loaded.int8_graph is not None
    assert q["calibration"]["kind"] == "cache" and q["calibration"]["n_studies"] == 4
    # --keep auto: stem and head first, more only while the check fails
    tried = [a["kept_in_floating_point"] for a in q.get("attempts", [])]
    assert tried == [list(k) for k in AUTO_KEEP[: len(tried)]]
    assert q["kept_in_floating_point"] == (tried[-1] if tried else ["stem", "head"])
    assert len(tried) in (0, 2, 3, 4) and (len(tried) in (0, 4) or q["check"]["passed"])
    assert q["check"]["n_studies"] == 2 and q["check"]["n_labelled"] == 2
    assert (code == 0) == q["check"]["passed"]
    assert q["check"]["summary"] in printed and "ROC-AUC" in printed
    assert f"{q['check']['max_dp']:.4f}" in printed
    assert main(["info", str(out)]) == 0
    assert "INT8 quantization" in capsys.readouterr().out
