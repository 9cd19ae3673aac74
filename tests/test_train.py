"""A short CPU training run: artefacts, resume, train_binary.py, evaluation, config."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ctscreen.cli import evaluate as cli_evaluate
from ctscreen.cli import train as cli_train
from ctscreen.config import PreprocessConfig
from ctscreen.data.registry import write_registry
from ctscreen.data.split import write_keys
from ctscreen.errors import ConfigError, DatasetError
from ctscreen.train.config import (
    TrainConfig,
    learning_rate,
    load_train_config,
    with_overrides,
)
from ctscreen.train.loop import METRICS_COLUMNS, train
from ctscreen.weights import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL = PreprocessConfig(shape=(8, 16, 16))
OPTIONS = {
    "batch_size": 2,
    "num_workers": 0,
    "device": "cpu",
    "seed": 5,
    "balance": "both",
    "augment": True,
    "preprocess": SMALL.to_dict(),
}


def _write_study(path: Path, label: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    hu = np.full((20, 20, 12), -1000.0, dtype=np.float32)
    hu[:, :, 1:-1] = 40.0  # a body around the "lung", so the chest check passes
    hu[3:-3, 3:-3, 2:-2] = rng.normal(-750, 150, (14, 14, 8))
    if label:
        hu[8:13, 8:13, 4:8] = 40.0  # a dense "lesion"
    nib.save(nib.Nifti1Image(hu, np.diag([0.9, 0.9, 2.0, 1.0])), str(path))


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--log-level", default="WARNING")
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_data")
    rows = []
    for i in range(8):
        label = i % 2
        path = root / f"s{i}.nii.gz"
        _write_study(path, label, seed=i)
        rows.append(
            {
                "study_key": f"syn:{i}",
                "path": str(path),
                "path_type": "nifti",
                "label": label,
                "dataset": "syn",
                "patient_id": f"p{i}",
                "study_uid": "",
                "source_category": "",
            }
        )
    registry = write_registry(pd.DataFrame(rows), root / "merged.csv")
    train_keys = write_keys([f"syn:{i}" for i in range(4)], root / "train_keys.txt")
    val_keys = write_keys([f"syn:{i}" for i in range(4, 8)], root / "val_keys.txt")
    config = root / "tiny.json"
    config.write_text(json.dumps(OPTIONS))
    return {
        "root": root,
        "registry": registry,
        "train": train_keys,
        "val": val_keys,
        "config": config,
        "cache": root / "cache",
    }


@pytest.fixture(scope="module")
def runs(data) -> dict[str, Path]:
    """Run A: 1 epoch via the API, then resumed to 2 via the CLI, keeping per-epoch
    weights. Run B: 2 epochs straight, default folder (best + last only)."""
    run_a = data["root"] / "run_a"
    config = load_train_config(data["config"]).replace(epochs=1, save_every_epoch=True)
    lines: list[str] = []
    first = train(
        registry=data["registry"],
        train_keys=data["train"],
        val_keys=data["val"],
        out_dir=run_a,
        config=config,
        cache_dir=data["cache"],
        progress=False,
        echo=lines.append,
    )
    assert first.last_epoch == 1
    (run_a / "first_lines.txt").write_text("\n".join(lines))
    args = _parse(
        cli_train,
        [
            "--no-progress",
            "train",
            "--registry",
            str(data["registry"]),
            "--train-keys",
            str(data["train"]),
            "--val-keys",
            str(data["val"]),
            "--out",
            str(run_a),
            "--config",
            str(data["config"]),
            "--epochs",
            "2",
            "--cache-dir",
            str(data["cache"]),
            "--resume",
            "--save-every-epoch",
        ],
    )
    assert args.func(args) == 0

    spec = importlib.util.spec_from_file_location("train_binary", REPO / "train_binary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_b = data["root"] / "run_b"
    code = module.main(
        [
            "--studies_csv",
            str(data["registry"]),
            "--train_list",
            str(data["train"]),
            "--val_list",
            str(data["val"]),
            "--epochs",
            "2",
            "--batch_size",
            "2",
            "--lr",
            "1e-4",
            "--out_dir",
            str(run_b),
            "--config",
            str(data["config"]),
            "--cache_dir",
            str(data["cache"]),
        ]
    )
    assert code == 0
    return {"a": run_a, "b": run_b}


def test_run_folder_artefacts(runs) -> None:
    run = runs["a"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert tuple(metrics.columns) == METRICS_COLUMNS
    assert metrics["epoch"].tolist() == [1, 2]
    assert metrics[["train_loss", "val_loss", "val_roc_auc", "val_accuracy"]].notna().all().all()
    assert ((metrics["val_roc_auc"] >= 0) & (metrics["val_roc_auc"] <= 1)).all()
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in jsonl] == [1, 2]
    assert jsonl[1]["val_loss"] == pytest.approx(metrics["val_loss"][1])

    for epoch in (1, 2):
        folder = run / "epochs" / f"epoch_{epoch:03d}"
        for name in ("train_cm.png", "val_cm.png"):
            assert (folder / name).read_bytes()[:4] == b"\x89PNG"
        for name in ("train_report.txt", "val_report.txt"):
            text = (folder / name).read_text()
            assert "pathology" in text and "recall" in text
        loaded = load_checkpoint(folder / "weights.pth")
        assert loaded.card.validation_metrics["epoch"] == epoch
        # the resumed epoch records the configuration it ran with
        assert loaded.card.train_config["epochs"] == epoch
    assert (run / "learning_curves.png").stat().st_size > 5000

    best = load_checkpoint(run / "best.pth")
    assert best.card.preprocess == SMALL
    assert best.card.threshold == 0.5 and best.card.threshold_rule == "default"
    assert best.card.train_config["balance"] == "both"
    assert best.card.training_data["train_labels"] == {"0": 2, "1": 2}
    best_epoch = int(metrics["val_roc_auc"].idxmax()) + 1
    assert best.card.validation_metrics["roc_auc"] == pytest.approx(metrics["val_roc_auc"].max())
    assert best.card.validation_metrics["epoch"] == best_epoch
    out = best.model(torch.zeros(1, 1, *SMALL.shape))
    assert out.shape == (1, 1)

    resolved = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(resolved).epochs == 2
    state = torch.load(run / "last_state.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2


def test_default_run_keeps_best_and_last_only(runs) -> None:
    run = runs["b"]
    assert (run / "best.pth").is_file() and (run / "last_state.pth").is_file()
    assert sorted(p.name for p in run.glob("epochs/*/*.pth")) == []
    for epoch in (1, 2):
        assert (run / "epochs" / f"epoch_{epoch:03d}" / "val_report.txt").is_file()
    # outputs get the mode a plain open() gives, not mkstemp's 0600
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1 and all(m & 0o044 for m in modes.values()), modes


def test_run_states_its_disk_use_estimate_and_one_line_per_epoch(runs) -> None:
    lines = (runs["a"] / "first_lines.txt").read_text().splitlines()
    disk = next(line for line in lines if "will hold about" in line)
    # the sizes stated before training are those of the files written
    stated = {
        m[0]: float(m[1]) for m in re.findall(r"(best.pth|last_state.pth) ([0-9.]+) MB", disk)
    }
    for name in ("best.pth", "last_state.pth"):
        actual = (runs["a"] / name).stat().st_size / 1e6
        assert stated[name] == pytest.approx(actual, rel=0.01), name
    assert "per-epoch weights" in disk
    estimate = next(line for line in lines if line.startswith("measured"))
    assert "s per training batch of 2 on cpu" in estimate
    epoch_lines = [line for line in lines if line.startswith("epoch 1/1")]
    assert len(epoch_lines) == 1
    assert "val ROC-AUC" in epoch_lines[0] and "95% CI" in epoch_lines[0]
    metrics = pd.read_csv(runs["a"] / "metrics.csv")
    low, auc, high = metrics.loc[0, ["val_roc_auc_ci_low", "val_roc_auc", "val_roc_auc_ci_high"]]
    assert low <= auc <= high


def test_resume_gives_the_uninterrupted_history(runs) -> None:
    a = pd.read_csv(runs["a"] / "metrics.csv").drop(columns="seconds")
    b = pd.read_csv(runs["b"] / "metrics.csv").drop(columns="seconds")
    assert a["epoch"].tolist() == b["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-5, atol=1e-6)


def test_existing_run_needs_resume(runs, data) -> None:
    config = load_train_config(data["config"]).replace(epochs=1)
    with pytest.raises(ConfigError, match="--resume"):
        train(
            registry=data["registry"],
            train_keys=data["train"],
            val_keys=data["val"],
            out_dir=runs["b"],
            config=config,
            progress=False,
        )


def test_evaluate_with_threshold_choice(runs, data, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    written = tmp_path / "with_threshold.pth"
    args = _parse(
        cli_evaluate,
        [
            "--no-progress",
            "evaluate",
            "--weights",
            str(runs["b"] / "best.pth"),
            "--registry",
            str(data["registry"]),
            "--keys",
            str(data["val"]),
            "--out",
            str(out),
            "--threshold-rule",
            "youden",
            "--write-threshold",
            str(written),
            "--n-boot",
            "200",
        ],
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "ROC-AUC" in table and "95% CI" in table

    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions["study_key"].tolist() == [f"syn:{i}" for i in range(4, 8)]
    assert (predictions["status"] == "ok").all()
    assert predictions["probability"].between(0, 1).all()
    report = json.loads((out / "metrics.json").read_text())
    assert report["threshold_rule"] == "youden" and report["n"] == 4
    for name in ("roc_auc", "pr_auc", "accuracy", "f1", "sensitivity", "specificity"):
        m = report["metrics"][name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
    # the threshold is one of the predicted probabilities and reproduces the metrics
    thr = report["threshold"]
    assert np.isclose(predictions["probability"], thr).any()
    assert (predictions["prediction"] == (predictions["probability"] >= thr)).all()
    for name in ("roc.png", "pr.png", "calibration.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 5000
    # the shortcut baseline on the same 4 studies (2 of each class: 2 folds)
    base = report["shortcut_baseline"]
    assert base["n"] == 4 and base["folds"] == 2
    assert base["model_roc_auc"] == pytest.approx(report["metrics"]["roc_auc"]["value"])
    assert 0.0 <= base["roc_auc"]["value"] <= 1.0
    assert (base["warning"] is None) == (base["model_roc_auc"] > base["roc_auc"]["ci_high"])
    assert "shortcut baseline (HU histogram" in table
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Shortcut baseline" in page and "data:image/png;base64," in page

    loaded = load_checkpoint(written)
    assert loaded.card.threshold == pytest.approx(thr)
    assert loaded.card.threshold_rule == "youden"
    assert loaded.card.validation_metrics["roc_auc"]["value"] == pytest.approx(
        report["metrics"]["roc_auc"]["value"]
    )
    assert loaded.card.preprocess == SMALL


def test_tensorboard_missing_is_a_config_error(data, tmp_path) -> None:
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    config = load_train_config(data["config"]).replace(epochs=1, tensorboard=True)
    with pytest.raises(ConfigError, match="tensorboard"):
        train(
            registry=data["registry"],
            train_keys=data["train"],
            val_keys=data["val"],
            out_dir=tmp_path / "tb",
            config=config,
            progress=False,
        )


def test_split_problems_are_dataset_errors(data, tmp_path) -> None:
    config = load_train_config(data["config"]).replace(epochs=1)
    common = {
        "registry": data["registry"],
        "out_dir": tmp_path / "r",
        "config": config,
        "progress": False,
    }
    with pytest.raises(DatasetError, match="both classes"):
        train(train_keys=["syn:0", "syn:2"], val_keys=["syn:1"], **common)
    with pytest.raises(DatasetError, match="both the train and the val"):
        train(train_keys=["syn:0", "syn:1"], val_keys=["syn:1"], **common)
    with pytest.raises(DatasetError, match="not in the registry"):
        train(train_keys=["syn:0", "nope"], val_keys=["syn:1"], **common)


def test_train_config_round_trip_and_overrides(tmp_path) -> None:
    config = TrainConfig(epochs=3, preprocess=SMALL, kinetics_weights="k.pth")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ConfigError, match="balance"):
        TrainConfig(balance="oversample")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 3e-4, "preprocess": {"shape": [4, 8, 8]}}))
    loaded = load_train_config(path)
    assert loaded.lr == 3e-4 and loaded.preprocess == PreprocessConfig(shape=(4, 8, 8))
    changed = with_overrides(loaded, epochs=7, lr=None, window_width=400.0)
    assert changed.epochs == 7 and changed.lr == 3e-4
    assert changed.preprocess.window_width == 400.0 and changed.preprocess.shape == (4, 8, 8)
    cosine = TrainConfig(epochs=5, lr=1.0, lr_schedule="cosine", warmup_epochs=1)
    lrs = [learning_rate(e, cosine) for e in range(1, 6)]
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert math.isclose(learning_rate(4, TrainConfig(lr=0.5)), 0.5)


def test_train_binary_keeps_the_original_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "train_binary.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for flag in (
        "--studies_csv",
        "--train_list",
        "--val_list",
        "--epochs",
        "--batch_size",
        "--lr",
        "--out_dir",
        "--tensorboard",
    ):
        assert flag in done.stdout
