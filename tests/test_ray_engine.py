"""``predict --engine ray``: the same rows as a plain ``predict``, on a local Ray with 2 CPUs.

One Ray is started for the module; the engine joins it (as it would join a cluster
given with ``--address``) and leaves it running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import ctscreen  # noqa: E402
from ctscreen.report import REQUIRED_COLUMNS  # noqa: E402
from ctscreen.runs import input_key, read_journal  # noqa: E402
from ctscreen.synth.dataset import generate_dataset  # noqa: E402

SRC = Path(ctscreen.__file__).resolve().parents[1]

COMMON = ("--device", "cpu", "--backend", "torch", "--precision", "fp32")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.ERROR,
        object_store_memory=256 * 1024 * 1024,
    )
    yield
    ray.shutdown()


def _zip(folders: list[Path], archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder in folders:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    zf.write(f, f"{folder.name}/{f.relative_to(folder).as_posix()}")
    return archive


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six zip archives in a deliberate order: four of one study, one cut in half (damaged)
    third, and one holding two studies (so one input gives two rows)."""
    root = tmp_path_factory.mktemp("ray-archives")
    generate_dataset(root / "synth", n_studies=6, seed=3, zip_archives=False)
    studies = sorted((root / "synth" / "studies").iterdir())
    out = root / "archives"
    out.mkdir()
    single = [_zip([s], out / f"{s.name}.zip") for s in studies[:4]]
    whole = single[3].read_bytes()
    damaged = out / "damaged.zip"
    damaged.write_bytes(whole[: len(whole) // 2])
    both = _zip(studies[4:], out / "two-studies.zip")
    return [single[2], single[0], damaged, both, single[3], single[1]]


def test_ray_engine_gives_the_same_rows_as_plain_predict(
    local_ray, archives: list[Path], tiny_checkpoint: Path, tmp_path: Path, run_cli
) -> None:
    plain = run_cli(
        "predict", *archives, "--weights", tiny_checkpoint, "-o", tmp_path / "plain.parquet",
        *COMMON,
    )  # fmt: skip
    assert plain.code == 1, plain.err  # one Failure row
    on_ray = run_cli(
        "predict", *archives, "--weights", tiny_checkpoint, "-o", tmp_path / "ray.parquet",
        "--engine", "ray", "--ray-scorers", 1, *COMMON,
    )  # fmt: skip
    assert on_ray.code == 1, on_ray.err
    expected = pd.read_parquet(tmp_path / "plain.parquet")
    got = pd.read_parquet(tmp_path / "ray.parquet")

    assert list(got.columns) == list(expected.columns)
    assert list(got.columns[:7]) == list(REQUIRED_COLUMNS)
    assert len(got) == 7  # six archives, one of them with two studies
    same = ["path_to_study", "study_uid", "series_uid", "pathology", "processing_status"]
    same += ["error", "warnings", "series_reason", "n_slices", "input_path"]
    pd.testing.assert_frame_equal(got[same], expected[same])
    assert list(got["processing_status"]) == ["Success"] * 2 + ["Failure"] + ["Success"] * 4
    assert list(got["input_path"]) == [str(a) for a in archives[:4]] + [str(archives[3])] + [
        str(a) for a in archives[4:]
    ]
    damaged = got.loc[2]
    assert damaged["path_to_study"] == str(archives[2])
    assert "not a readable zip archive" in damaged["error"]
    assert np.isnan(damaged["probability_of_pathology"])

    p_ray = got["probability_of_pathology"].to_numpy()
    p_plain = expected["probability_of_pathology"].to_numpy()
    ok = ~np.isnan(p_plain)
    assert np.ptp(p_plain[ok]) > 1e-4  # the studies differ, so equality means something
    np.testing.assert_allclose(p_ray[ok], p_plain[ok], atol=1e-4)

    run = json.loads((tmp_path / "ray.run.json").read_text())
    assert run["engine"] == "ray" and run["ray_scorers"] == 1
    assert (run["backend"], run["precision"], run["device"]) == ("torch", "fp32", "cpu")
    assert (run["studies"], run["failures"]) == (7, 1)
    assert not (tmp_path / "ray.parquet.journal.jsonl").exists()  # a finished run removes it


def _journal_rows(journal: Path) -> int:
    if not journal.exists():
        return 0
    return sum('"row"' in line for line in journal.read_text(encoding="utf-8").splitlines())


def test_sigint_writes_the_finished_rows_and_resume_on_ray_completes_the_table(
    local_ray, archives: list[Path], tiny_checkpoint: Path, tmp_path: Path, run_cli
) -> None:
    copies = tmp_path / "copies"
    copies.mkdir()
    inputs = []
    for k in range(12):  # enough inputs that Ctrl-C lands mid-run (after 2 rows)
        inputs.append(copies / f"copy{k:02d}.zip")
        inputs[-1].write_bytes(archives[k % 2].read_bytes())
    out = tmp_path / "results.csv"
    journal = tmp_path / "results.csv.journal.jsonl"
    command = [sys.executable, "-m", "ctscreen", "--no-progress", "predict", *map(str, inputs)]
    command += ["-w", str(tiny_checkpoint), "-o", str(out), "--engine", "ray", "--ray-cpus", "2"]
    scratch = tmp_path / "tmp"  # where the run's temporary folders go
    scratch.mkdir()
    # Ray's own session folder stays where it was: its socket paths must stay short.
    env = dict(os.environ, PYTHONPATH=str(SRC), TMPDIR=str(scratch))
    env.setdefault("RAY_TMPDIR", tempfile.gettempdir())
    proc = subprocess.Popen(command + list(COMMON), stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and _journal_rows(journal) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "--resume" in err
    partial = pd.read_csv(out)
    assert 2 <= len(partial) < len(inputs)
    assert journal.exists()
    # The reading tasks stopped mid-archive left no unpacked study behind.
    left = [p for p in scratch.iterdir() if p.name.startswith("ctscreen")]
    assert left == [], sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))

    before = dict(zip(partial["path_to_study"], partial["time_of_processing"], strict=True))
    done = read_journal(journal)
    resumed = run_cli(
        "predict", *inputs, "-w", tiny_checkpoint, "-o", out, "--resume", "--engine", "ray",
        *COMMON,
    )  # fmt: skip
    assert resumed.code == 0, resumed.err
    assert f"({len(done)} input(s) taken from the journal)" in resumed.err
    final = pd.read_csv(out)
    assert list(final["input_path"]) == [str(p) for p in inputs]
    assert (final["processing_status"] == "Success").all()
    for row in final.itertuples():  # the inputs finished before were not scored again
        if input_key(row.input_path) in done:
            assert row.time_of_processing == before[row.path_to_study]
    assert not journal.exists()


# A Ray started with the crash hook in every worker (tests/ray_crash_hook.py), then the CLI.
CRASHING_RAY = """
import logging, sys
import ray
ray.init(
    num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
    object_store_memory=256 * 1024 * 1024,
    runtime_env={
        "worker_process_setup_hook": "ray_crash_hook.install",
        "env_vars": {"PYTHONPATH": sys.argv[1], "CTSCREEN_CRASH_LOG": sys.argv[2]},
    },
)
from ctscreen.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_an_input_that_kills_its_worker_is_a_failure_row_not_a_stall(
    archives: list[Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from ctscreen.engines.ray_engine import TASK_RETRIES

    inputs = [archives[1], tmp_path / "crash-read.zip", archives[5], tmp_path / "crash-score.zip"]
    inputs[1].write_bytes(archives[0].read_bytes())
    inputs[3].write_bytes(archives[4].read_bytes())
    crashes = tmp_path / "crashes.txt"
    out = tmp_path / "results.csv"
    paths = os.pathsep.join([str(Path(__file__).parent), str(SRC)])
    command = [sys.executable, "-c", CRASHING_RAY, paths, str(crashes), "--no-progress"]
    command += ["predict", *map(str, inputs), "-w", str(tiny_checkpoint), "-o", str(out)]
    command += ["--engine", "ray", "--ray-scorers", "1", *COMMON]
    env = dict(os.environ, PYTHONPATH=paths)
    # Ray's default (retry for ever) never ends: the timeout makes that a failure.
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 1, done.stderr  # 1: the table has Failure rows

    table = pd.read_csv(out)
    assert list(table["input_path"]) == [str(p) for p in inputs]
    assert list(table["processing_status"]) == ["Success", "Failure", "Success", "Failure"]
    for row in (table.loc[1], table.loc[3]):
        assert "Ray task" in row["error"] and "--engine local" in row["error"]
    tries = crashes.read_text().split()
    assert tries.count("read") == tries.count("score") == TASK_RETRIES + 1
