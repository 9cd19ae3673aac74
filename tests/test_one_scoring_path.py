"""One scoring path: predict, evaluate and the training cache see the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctscreen import Screener
from ctscreen.config import PreprocessConfig
from ctscreen.data.cache import build_cache, entry_path, load_entry, read_manifest
from ctscreen.data.registry import REGISTRY_COLUMNS, read_registry, write_registry
from ctscreen.report import REQUIRED_COLUMNS, result_rows, rows_to_frame
from ctscreen.weights import load_checkpoint

#: Synthetic studies: (seed, pathology); half normal, half with a large finding.
STUDIES = [(0, None), (1, "consolidation"), (2, None), (3, "effusion"), (4, None), (5, "nodule")]


@pytest.fixture()
def registry(make_series, tmp_path: Path) -> Path:
    rows = []
    for seed, pathology in STUDIES:
        paths, _ = make_series(seed=seed, pathology=pathology, name=f"study{seed}")
        rows.append(
            {
                "study_key": f"synth:{seed}",
                "path": str(paths[0].parent),
                "path_type": "dicom",
                "label": str(int(pathology is not None)),
                "dataset": "synth",
                "patient_id": f"p{seed}",
                "study_uid": "",
                "source_category": pathology or "normal",
            }
        )
    path = tmp_path / "registry.csv"
    write_registry(pd.DataFrame(rows, columns=list(REGISTRY_COLUMNS)), path)
    (tmp_path / "keys.txt").write_text("".join(f"{r['study_key']}\n" for r in rows))
    return path


def test_evaluate_and_predict_give_the_same_probabilities_and_decisions(
    registry: Path, tiny_checkpoint: Path, tmp_path: Path, run_cli
) -> None:
    chosen = tmp_path / "chosen.pth"
    common = ("--device", "cpu", "--backend", "torch", "--precision", "fp32")
    evaluated = run_cli(
        "evaluate",
        "--weights", tiny_checkpoint,
        "--registry", registry,
        "--keys", tmp_path / "keys.txt",
        "--out", tmp_path / "eval",
        "--threshold-rule", "youden",
        "--write-threshold", chosen,
        "--n-boot", 50,
        *common,
    )  # fmt: skip
    assert evaluated.code == 0, evaluated.err
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert list(predictions["status"]) == ["ok"] * len(STUDIES)

    paths = read_registry(registry)["path"].tolist()  # paths relative to the registry file
    table_path = tmp_path / "results.csv"
    predicted = run_cli("predict", *paths, "--weights", chosen, "-o", table_path, *common)
    assert predicted.code == 0, predicted.err
    table = pd.read_csv(table_path)
    assert list(table.columns[:7]) == list(REQUIRED_COLUMNS)

    by_path = dict(zip(table["path_to_study"], table["probability_of_pathology"], strict=True))
    p_predict = np.array([by_path[p] for p in paths])
    p_evaluate = predictions["probability"].to_numpy()
    assert np.ptp(p_evaluate) > 1e-4  # the studies differ, so equality below means something
    np.testing.assert_allclose(p_predict, p_evaluate, atol=1e-4)

    threshold = load_checkpoint(chosen).card.threshold
    assert load_checkpoint(chosen).card.threshold_rule == "youden"
    decisions = dict(zip(table["path_to_study"], table["pathology"], strict=True))
    assert [decisions[p] for p in paths] == predictions["prediction"].tolist()
    assert predictions["prediction"].tolist() == [int(p >= threshold) for p in p_evaluate]
    assert 0 < sum(decisions.values()) < len(paths)  # the chosen threshold splits them


def test_training_cache_holds_the_predict_input_to_its_quantisation(
    registry: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Training reads uint8 cache entries; the network input of predict is float.
    They differ by at most half a quantisation step (1/510 of the [0, 1] range, 2.9 HU
    of the lung window)."""
    screener = Screener(tiny_checkpoint, device="cpu", backend="torch", precision="fp32")
    frame = read_registry(registry)
    report = build_cache(frame, tmp_path / "cache", screener.config, progress=False)
    assert report.n_failed == 0
    results = list(screener.score(frame["path"].tolist(), keep_image=True))
    for (_, row), result in zip(frame.iterrows(), results, strict=True):
        cached = load_entry(
            entry_path(tmp_path / "cache", screener.config, row.study_key, row.path)
        )
        assert result.image is not None and cached.shape == result.image.shape
        assert np.abs(cached - result.image).max() <= 0.5 / 255 + 1e-6


def test_training_cache_refuses_a_head_ct_with_predicts_reason(
    dicom_root: Path, make_series, tiny_checkpoint: Path, tmp_path: Path, run_cli
) -> None:
    """The cache reads the way predict does: the chest check refuses a real head CT
    (GE, gantry tilt) for training with predict's sentence, and the report lists it."""
    head = dicom_root / "edge-gantry-tilt-ge-head"
    if not head.is_dir():
        pytest.skip(f"{head} not found")
    chest, _ = make_series(seed=0, name="chest")
    rows = [
        {"study_key": "real:head", "path": str(head), "label": "0"},
        {"study_key": "synth:chest", "path": str(chest[0].parent), "label": "1"},
    ]
    frame = pd.DataFrame(
        [{**r, "path_type": "dicom", "dataset": "t", "patient_id": r["study_key"]} for r in rows],
        columns=list(REGISTRY_COLUMNS),
    )
    registry = write_registry(frame, tmp_path / "registry.csv")

    table_path = tmp_path / "results.csv"
    common = ("--device", "cpu", "--backend", "torch", "--precision", "fp32")
    predicted = run_cli("predict", head, "--weights", tiny_checkpoint, "-o", table_path, *common)
    table = pd.read_csv(table_path)
    assert list(table["processing_status"]) == ["Failure"]
    refusal = table.loc[0, "error"]
    assert refusal.startswith("not a chest CT: ") and "BodyPartExamined 'HEAD'" in refusal

    cache_dir = tmp_path / "cache"
    shape = ("--shape", "8", "16", "16")
    cached = run_cli("cache", registry, "--cache-dir", cache_dir, *shape, "--workers", "1")
    assert cached.code == predicted.code == 1, cached.err  # partial: one study refused
    assert "1 built, 1 failed" in cached.out
    assert f"FAILED real:head (NOT_CHEST): {refusal}" in cached.out
    config = PreprocessConfig(shape=(8, 16, 16))
    report = build_cache(read_registry(registry), cache_dir, config, progress=False)
    (failure,) = report.failures  # a known refusal is reported again without reading
    assert (failure.study_key, failure.code, failure.message) == ("real:head", "NOT_CHEST", refusal)
    statuses = {r["study_key"]: r["status"] for r in read_manifest(report.root).values()}
    assert statuses == {"real:head": "failed", "synth:chest": "ok"}


def test_study_rows_slice_rows_and_failures_come_from_one_result(
    make_series, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    good, _ = make_series(seed=7, pathology="consolidation", name="good")
    thin, _ = make_series(seed=8, name="thin", shape=(8, 64, 64))
    screener = Screener(
        tiny_checkpoint, device="cpu", backend="torch", precision="fp32", threshold=0.0
    )
    scored, failed = screener.score([good[0].parent, thin[0].parent])
    assert scored.ok and scored.status == "Success" and scored.pathology == 1
    assert not failed.ok and "too few slices" in failed.error and failed.probability is None

    (study,) = result_rows(scored)
    assert study.probability_of_pathology == round(scored.probability, 6)
    assert study.pathology_localization == scored.box and scored.box is not None
    slices = result_rows(scored, "slice")
    assert len(slices) == scored.n_slices == 24
    assert [r.extras["sop_instance_uid"] for r in slices] == [
        s.sop_instance_uid for s in scored.slices
    ]
    np.testing.assert_allclose(
        [r.probability_of_pathology for r in slices], scored.slice_scores, atol=1e-6
    )
    # the slice logits average to the study logit (one forward pass, exact decomposition)
    logits = np.log(scored.slice_scores / (1 - scored.slice_scores))
    assert scored.cam is not None and scored.bias is not None
    assert abs(float(scored.cam.mean()) + scored.bias - scored.logit) < 1e-5
    assert abs(logits.mean() - scored.logit) < 0.05
    frame = rows_to_frame([*result_rows(scored), *result_rows(failed)])
    assert list(frame["processing_status"]) == ["Success", "Failure"]
    assert frame.loc[1, "error"] == failed.error


def test_a_nifti_copy_scores_like_its_dicom_series(
    make_series, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from ctscreen.pipeline import prepare_one_study
    from ctscreen.synth.nifti_writer import write_nifti

    paths, _ = make_series(seed=9, pathology="consolidation", name="dicom")
    read = prepare_one_study(
        paths[0].parent, config=PreprocessConfig(shape=(8, 16, 16)), nifti=False, keep_volume=True
    )
    assert read.volume is not None, read.error
    nifti = write_nifti(read.volume, path=tmp_path / "copy.nii.gz")
    screener = Screener(tiny_checkpoint, device="cpu", backend="torch", precision="fp32")
    from_dicom, from_nifti = screener.score([paths[0].parent, nifti])
    assert from_dicom.ok and from_nifti.ok, from_nifti.error
    assert from_nifti.location == str(nifti) and "NIfTI" in from_nifti.series_reason
    assert abs(from_dicom.probability - from_nifti.probability) < 1e-4
    np.testing.assert_allclose(from_dicom.geometry.affine, from_nifti.geometry.affine, atol=1e-4)
