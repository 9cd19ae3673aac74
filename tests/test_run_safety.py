"""A run loses nothing finished: checks before reading, journal, interrupts, resume, time limits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

import ctscreen
from ctscreen.errors import ConfigError, WeightsError
from ctscreen.pipeline import PreparedStudy, with_deadline
from ctscreen.runs import Journal, check_output_path, journal_path, read_journal
from ctscreen.train.checkpoint import save_train_state
from ctscreen.weights import load_checkpoint

SRC = Path(ctscreen.__file__).resolve().parents[1]


@pytest.fixture()
def no_study_read(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every input the pipeline starts to read (the tests assert there are none)."""
    import ctscreen.pipeline as pipeline

    read: list[Path] = []
    real = pipeline.discover

    def spy(path, **kwargs):  # type: ignore[no-untyped-def]
        read.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(pipeline, "discover", spy)
    return read


# --------------------------------------------------------------------------- before reading


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("results.txt", "unknown suffix '.txt'"),
        ("folder.xlsx", "is a folder; name a file in it"),
        ("missing/results.xlsx", "does not exist; create it first"),
        ("afile/results.xlsx", "is not a folder"),
        ("existing.xlsx", "already exists; pass --overwrite"),
    ],
)
def test_a_bad_output_fails_before_any_study_is_read(
    run_cli, tmp_path: Path, tiny_checkpoint: Path, make_series, no_study_read, output, message
) -> None:
    paths, _ = make_series(seed=1)
    (tmp_path / "folder.xlsx").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "existing.xlsx").write_bytes(b"old table")
    result = run_cli("predict", paths[0].parent, "-w", tiny_checkpoint, "-o", tmp_path / output)
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert message in line
    assert no_study_read == []
    assert (tmp_path / "existing.xlsx").read_bytes() == b"old table"


def test_a_training_resume_state_as_weights_is_refused_naming_the_file_to_use(
    run_cli, tmp_path: Path, tiny_checkpoint: Path, make_series, no_study_read
) -> None:
    paths, _ = make_series(seed=1)
    model_state = load_checkpoint(tiny_checkpoint).model.state_dict()
    resume = tmp_path / "run" / "last_state.pth"
    resume.parent.mkdir()
    save_train_state(resume, {"model": model_state, "optimizer": {}, "epoch": 3})
    with pytest.raises(WeightsError, match="training resume state"):
        load_checkpoint(resume)
    result = run_cli("predict", paths[0].parent, "-w", resume, "-o", tmp_path / "r.xlsx")
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "last_state.pth is a training resume state" in line
    assert str(tmp_path / "run" / "best.pth") in line
    assert no_study_read == [] and not (tmp_path / "r.xlsx").exists()


def test_check_output_path_accepts_a_new_file_and_an_existing_one_when_asked(
    tmp_path: Path,
) -> None:
    assert check_output_path(tmp_path / "r.csv") == tmp_path / "r.csv"
    (tmp_path / "r.csv").write_text("old")
    with pytest.raises(ConfigError):
        check_output_path(tmp_path / "r.csv")
    assert check_output_path(tmp_path / "r.csv", overwrite=True) == tmp_path / "r.csv"


# --------------------------------------------------------------------------- journal


def test_the_journal_is_locked_and_an_unfinished_one_is_not_overwritten(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "r.xlsx")
    assert path.name == "r.xlsx.journal.jsonl"
    first = Journal.open(path)
    with pytest.raises(ConfigError, match="another ctscreen run is writing r.xlsx"):
        Journal.open(path, overwrite=True)
    first.finish_input("/a")
    first.close(remove=False)
    with pytest.raises(ConfigError, match="pass --resume to finish that run"):
        Journal.open(path)


def test_a_line_cut_by_a_kill_and_unfinished_inputs_are_dropped_on_reading(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    lines = [
        {"input": "/a", "row": {"path_to_study": "a", "processing_status": "Failure"}},
        {"input": "/a", "done": True},
        {"input": "/b", "row": {"path_to_study": "b", "processing_status": "Failure"}},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"input": "/b", "ro')
    assert list(read_journal(path)) == ["/a"]


# --------------------------------------------------------------------------- time limit


def test_a_study_that_never_arrives_becomes_a_failure_and_the_rest_is_kept(tmp_path) -> None:
    release = threading.Event()

    def make() -> Iterator[PreparedStudy]:
        yield PreparedStudy(input_path="x", location="x/a", study_uid="1")
        release.wait()  # a reader stuck forever (a device, a hung decoder)
        yield PreparedStudy(input_path="x", location="x/b", study_uid="2")

    try:
        items = list(with_deadline(make, input_path=tmp_path / "x", limit=0.2))
    finally:
        release.set()
    assert [i.location for i in items] == ["x/a", str(tmp_path / "x")]
    assert items[1].error.startswith("reading x took longer than the time limit of 0.2 s")


# --------------------------------------------------------------------------- whole runs


def _subprocess_predict(args: list[object], tmpdir: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC), TMPDIR=str(tmpdir))
    cmd = [sys.executable, "-m", "ctscreen", "--no-progress", "predict", *map(str, args)]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _journal_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "row" in entry:
            rows.append(entry["row"])
    return rows


def test_sigint_mid_run_keeps_every_finished_row_and_resume_completes_it(
    tmp_path: Path, tiny_checkpoint: Path, make_series
) -> None:
    inputs = [make_series(seed=s, name=f"in{s:02d}")[0][0].parent for s in range(20)]
    out = tmp_path / "results.xlsx"
    journal = journal_path(out)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    common = ["-w", tiny_checkpoint, "-o", out, "--precision", "fp32", "--backend", "torch"]
    proc = _subprocess_predict([*inputs, *common], tmpdir)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(_journal_rows(journal)) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "--resume" in err
    finished = _journal_rows(journal)
    partial = pd.read_excel(out)
    assert 3 <= len(finished) < 20
    assert len(partial) >= len(finished)
    assert set(r["path_to_study"] for r in finished) <= set(partial["path_to_study"])
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("ctscreen-")] == []

    before = dict(zip(partial["path_to_study"], partial["time_of_processing"], strict=True))
    done_inputs = read_journal(journal)  # the input in progress at the signal is not done
    assert len(done_inputs) >= len(finished) - 1
    proc = _subprocess_predict([*inputs, *common, "--resume"], tmpdir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"({len(done_inputs)} input(s) taken from the journal)" in err
    final = pd.read_excel(out)
    assert list(final["path_to_study"]) == [str(p) for p in inputs]
    assert (final["processing_status"] == "Success").all()
    for row in final.itertuples():  # the inputs finished before were not scored again
        if row.path_to_study in done_inputs:
            assert row.time_of_processing == before[row.path_to_study]
    assert not journal.exists()
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("ctscreen-")] == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_fifos_among_the_inputs_still_give_a_row_per_input(
    run_cli, tmp_path: Path, tiny_checkpoint: Path, make_series
) -> None:
    good, _ = make_series(seed=2, name="good")
    os.mkfifo(good[0].parent / "stuck-pipe")  # inside a study folder
    os.mkfifo(tmp_path / "pipe-input")  # given as an input itself
    out = tmp_path / "r.csv"
    result = run_cli(
        "predict", good[0].parent, tmp_path / "pipe-input", "-w", tiny_checkpoint, "-o", out
    )
    assert result.code == 1
    table = pd.read_csv(out)
    assert list(table["processing_status"]) == ["Success", "Failure"]
    assert "stuck-pipe (a named pipe (FIFO))" in table.loc[0, "warnings"]
    assert "pipe-input is a named pipe (FIFO), not a regular file" in table.loc[1, "error"]


def test_the_head_ct_is_a_failure_not_a_probability(
    dicom_root: Path, tiny_checkpoint: Path
) -> None:
    from ctscreen import Screener

    screener = Screener(tiny_checkpoint, device="cpu", backend="torch", precision="fp32")
    head, abdomen, chest = (
        dicom_root / "edge-gantry-tilt-ge-head",
        dicom_root / "edge-empty-uids-totalseg-abdomen",
        dicom_root / "chest-lung-pet-ct-dx-a0002",
    )
    results = list(screener.score([head, abdomen, chest]))
    assert [r.status for r in results] == ["Failure", "Failure", "Success"]
    for result in results[:2]:
        assert result.error.startswith("not a chest CT: aerated lung")
        assert result.probability is None
    assert 0.0 <= results[2].probability <= 1.0
    assert torch.isfinite(torch.tensor(results[2].probability))


# --------------------------------------------------------------------------- a full disk

# A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the kernel refuse a write part-way
# (EFBIG), as a disk that fills during the run does (ENOSPC): the same error path.
SIZE_LIMITED_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
from ctscreen.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_a_journal_write_refused_by_the_disk_is_one_sentence_and_resume_finishes(
    tmp_path: Path, tiny_checkpoint: Path, make_series
) -> None:
    inputs = [make_series(seed=s, name=f"in{s}")[0][0].parent for s in range(6)]
    out = tmp_path / "results.csv"
    args = [*inputs, "-w", tiny_checkpoint, "-o", out, "--precision", "fp32", "--backend", "torch"]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    command = [sys.executable, "-c", SIZE_LIMITED_CLI, "3000", "--no-progress", "predict"]
    done = subprocess.run(
        [*command, *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (sentence,) = [line for line in done.stderr.splitlines() if "error:" in line]
    assert f"cannot write the run's journal {journal_path(out)} (File too large)" in sentence
    assert "free space on that disk" in sentence and "--resume" in sentence
    kept = read_journal(journal_path(out))
    assert 1 <= len(kept) < len(inputs)

    resumed = _subprocess_predict([*args, "--resume"], tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"({len(kept)} input(s) taken from the journal)" in err
    table = pd.read_csv(out)
    assert list(table["path_to_study"]) == [str(p) for p in inputs]
    assert (table["processing_status"] == "Success").all()


def test_a_table_the_disk_refuses_keeps_its_rows_for_resume(
    run_cli, tmp_path: Path, tiny_checkpoint: Path, make_series, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import ctscreen.report as report

    inputs = [make_series(seed=s, name=f"in{s}")[0][0].parent for s in range(2)]
    out = tmp_path / "results.csv"
    args = [*inputs, "-w", tiny_checkpoint, "-o", out, "--precision", "fp32", "--backend", "torch"]
    real_writer = report._write_csv

    def full_disk(frame: pd.DataFrame, tmp: Path) -> None:
        tmp.write_bytes(b"half a tab")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "_write_csv", full_disk)
    failed = run_cli("predict", *args)
    assert failed.code == 2
    assert failed.err.strip().splitlines()[-1] == (
        f"ctscreen: error: cannot write the result table {out} (No space left on device); "
        "there is no room for it: free space on that disk or choose another folder; the 2 "
        f"row(s) are kept in {journal_path(out)}: run the same command with --resume to "
        "write the table without scoring again."
    )
    assert not out.exists() and [p.name for p in tmp_path.glob(".results*")] == []

    monkeypatch.setattr(report, "_write_csv", real_writer)
    resumed = run_cli("predict", *args, "--resume")
    assert resumed.code == 0, resumed.err
    assert "(2 input(s) taken from the journal)" in resumed.err
    assert list(pd.read_csv(out)["path_to_study"]) == [str(p) for p in inputs]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_any_command_whose_file_the_disk_refuses_names_it_in_one_sentence(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    command = [sys.executable, "-c", SIZE_LIMITED_CLI, "4096", "--no-progress", "synth", str(out)]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    done = subprocess.run(
        [*command, "--studies", "1"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()  # one sentence, no traceback
    named = line.removeprefix("ctscreen: error: cannot write ").split(" (File too large)")[0]
    assert Path(named).is_file() and Path(named).is_relative_to(out), line
    assert line.endswith(
        " (File too large); there is no room for it: free space on that disk or choose "
        "another folder."
    )
