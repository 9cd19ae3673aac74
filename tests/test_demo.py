"""The demo's orchestration end to end, at a tiny size (the real run takes minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ctscreen.backends import ModelSource, choose_backend
from ctscreen.cli.demo import demo_model_caveat
from ctscreen.demo import STAGES, DemoConfig, disk_budget, run_demo
from ctscreen.report import REQUIRED_COLUMNS
from ctscreen.weights import load_checkpoint


def test_demo_writes_every_artefact_and_a_table_for_each_holdout_archive(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    config = DemoConfig(
        out=out,
        train_studies=16,
        holdout_studies=4,
        epochs=1,
        shape=(8, 16, 16),
        batch_size=4,
        # In-process: forking DataLoader workers from a test process in which other
        # tests already started OpenVINO's thread pool crashed that process later.
        workers=0,
    )
    lines: list[str] = []
    result = run_demo(config, progress=False, echo=lines.append)
    for name in ("registry.csv", "train_keys.txt", "val_keys.txt", "holdout_metrics.json"):
        assert (out / name).is_file(), name
    for name in ("metrics.csv", "learning_curves.png", "best.pth", "config.json"):
        assert (out / "run" / name).is_file(), name
    for name in ("metrics.json", "roc.png", "pr.png", "calibration.png"):
        assert (out / "evaluation" / name).is_file(), name
    table = pd.read_excel(result.results_table)
    assert list(table.columns[:7]) == list(REQUIRED_COLUMNS)
    assert len(table) == 4 and set(table["processing_status"]) == {"Success"}
    card = load_checkpoint(result.weights).card
    assert card.preprocess.shape == (8, 16, 16) and card.threshold_rule == "youden"
    metrics = json.loads((out / "holdout_metrics.json").read_text())
    assert metrics["n_studies"] == 4 and "roc_auc" in metrics
    train_keys = set((out / "train_keys.txt").read_text().split())
    val_keys = set((out / "val_keys.txt").read_text().split())
    assert train_keys and val_keys and not train_keys & val_keys

    # what it said: an overall estimate, the disk budget, a header per stage, epoch lines
    assert lines[0].startswith(f"ctscreen demo: {len(STAGES)} stages, about")
    assert lines[1].startswith("disk: about")
    headers = [line for line in lines if line.startswith("[")]
    assert [h.split("]")[0] for h in headers] == [f"[{i}/5" for i in range(1, 6)]
    assert any(line.startswith("epoch 1/1") and "val ROC-AUC" in line for line in lines)
    # what it left: best and the final model, no resume state, no per-epoch weights,
    # within the budget it stated
    assert not (out / "run" / "last_state.pth").exists()
    assert not list((out / "run").glob("epochs/*/*.pth"))
    assert result.disk_bytes <= 1.1 * sum(disk_budget(config).values())
    # the table says the demo's model was trained on synthetic data at a small input
    assert table["warnings"].str.contains("synthetic studies only").all()
    assert any("synthetic studies only" in w for w in result.model_warnings)
    caveat = demo_model_caveat(result.model_warnings)
    assert "synthetic studies only" in caveat and "trained on real labelled CT" in caveat

    # the demo measured how to run the model it leaves, as predict asks (auto/auto):
    # the first predict after it finds the measurement kept instead of timing again
    import torch

    loaded = load_checkpoint(result.weights)
    choice, built = choose_backend(ModelSource.of(loaded), device=torch.device("cpu"))
    assert choice.from_cache and not built
