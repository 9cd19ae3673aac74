"""The training path as a new user runs it: synth -> registry -> split -> cache -> train
-> evaluate from the command line, from another directory; Ctrl-C and --resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ctscreen.cli import main
from ctscreen.data.registry import read_registry

REPO = Path(__file__).resolve().parents[1]
TINY = ["--shape", "8", "16", "16"]


def test_synth_output_goes_through_every_step_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made = tmp_path / "made"
    made.mkdir()
    monkeypatch.chdir(made)
    assert main(["--no-progress", "synth", "data", "--studies", "8", "--matrix", "tiny"]) == 0
    assert main(["registry", "build", "synthetic", "data", "-o", "data/registry.csv"]) == 0
    stored = pd.read_csv(made / "data" / "registry.csv", dtype=str)
    # paths are stored relative to the registry file, not to the directory it was built in
    assert stored["path"].str.startswith("studies/synth_").all()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    registry = "../made/data/registry.csv"
    frame = read_registry(registry)
    assert all(Path(p).is_absolute() and Path(p).is_dir() for p in frame["path"])
    assert set(frame["label"]) == {0, 1} and frame["patient_id"].ne("").all()

    assert main(["split", registry, "--out-dir", "keys", "--val-fraction", "0.5"]) == 0
    code = main(
        ["--no-progress", "cache", registry, "--cache-dir", "cache", "--workers", "1"] + TINY
    )
    assert code == 0
    assert "8 studies, 0 reused, 8 built, 0 failed" in capsys.readouterr().out
    train_argv = [
        "--no-progress",
        "train",
        "--registry",
        registry,
        "--train-keys",
        "keys/train_keys.txt",
        "--val-keys",
        "keys/val_keys.txt",
        "--out",
        "run",
        "--cache-dir",
        "cache",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    assert main(train_argv + TINY) == 0
    printed = capsys.readouterr()
    # the cache built from the registry file is the one training reads: nothing rebuilt
    assert "best: run/best.pth (epoch 1" in printed.out
    assert not (elsewhere / "run" / "epochs" / "epoch_001" / "weights.pth").exists()
    code = main(
        [
            "--no-progress",
            "evaluate",
            "--weights",
            "run/best.pth",
            "--registry",
            registry,
            "--keys",
            "keys/val_keys.txt",
            "--out",
            "eval",
            "--device",
            "cpu",
            "--n-boot",
            "50",
        ]
    )
    assert code == 0
    predictions = pd.read_csv(elsewhere / "eval" / "predictions.csv")
    val_keys = (elsewhere / "keys" / "val_keys.txt").read_text().split()
    assert predictions["study_key"].tolist() == val_keys
    assert (predictions["status"] == "ok").all()


def test_registry_build_synthetic_names_the_missing_labels(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["registry", "build", "synthetic", str(tmp_path / "empty"), "-o", "r.csv"]) == 2


def _ctscreen(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "ctscreen", "--no-progress", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # its own process group, so that SIGINT reaches the DataLoader workers too,
        # as Ctrl-C in a terminal does
        start_new_session=True,
    )


def test_ctrl_c_stops_training_and_resume_finishes_it(tmp_path: Path) -> None:
    assert (
        main(
            ["--no-progress", "synth", str(tmp_path / "data"), "--studies", "8", "--matrix", "tiny"]
        )
        == 0
    )
    assert (
        main(
            [
                "registry",
                "build",
                "synthetic",
                str(tmp_path / "data"),
                "-o",
                str(tmp_path / "r.csv"),
            ]
        )
        == 0
    )
    assert (
        main(
            ["split", str(tmp_path / "r.csv"), "--out-dir", str(tmp_path), "--val-fraction", "0.5"]
        )
        == 0
    )
    common = [
        "train",
        "--registry",
        "r.csv",
        "--train-keys",
        "train_keys.txt",
        "--val-keys",
        "val_keys.txt",
        "--out",
        "run",
        "--cache-dir",
        "cache",
        "--batch-size",
        "2",
        "--num-workers",
        "2",
        "--device",
        "cpu",
        "--resume-state",
        "on-interrupt",
        *TINY,
    ]
    run = tmp_path / "run"
    proc = _ctscreen([*common, "--epochs", "1000"], tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.csv").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)  # a guard against a hang, not a timing
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output
    assert "add --resume to the same command to continue" in output
    assert "Traceback" not in output
    done = len(pd.read_csv(run / "metrics.csv"))
    assert done >= 1 and (run / "last_state.pth").is_file()

    resumed = _ctscreen([*common, "--epochs", str(done + 1), "--resume"], tmp_path)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming {Path('run')} at epoch {done + 1}" in output
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == list(range(1, done + 2))
    # on-interrupt: a finished run keeps no stale resume state
    assert not (run / "last_state.pth").exists()
