"""The command line's first answers: the command list, global options anywhere, and
mistakes refused before torch is imported (which takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctscreen.cli import COMMANDS, EXIT_ERROR, build_parser, main
from ctscreen.errors import ConfigError
from ctscreen.hardware import check_device_name


def _main_in_fresh_process(args: list[str]) -> tuple[int, bool, str]:
    """Run ``main(args)`` in a new interpreter: its exit code, whether torch got
    imported, and its stderr."""
    code = (
        "import json, sys\n"
        "from ctscreen.cli import main\n"
        f"rc = main({args!r})\n"
        "print(json.dumps([rc, 'torch' in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    rc, torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    return rc, torch_loaded, done.stderr


@pytest.mark.parametrize(
    ("extra", "weights", "expected"),
    [
        ((), "missing.pth", "weight file"),
        ((), "notes.txt", "is not a PyTorch file"),
        (("--device", "gpu0"), "missing.pth", "unknown device 'gpu0'"),
        (("--device", "cuda:x"), "missing.pth", "cannot parse device 'cuda:x'"),
    ],
)
def test_mistakes_are_refused_before_torch_loads(
    tmp_path: Path, extra: tuple[str, ...], weights: str, expected: str
) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "study").mkdir()
    args = ["predict", str(tmp_path / "study"), "-w", str(tmp_path / weights), *extra]
    rc, torch_loaded, err = _main_in_fresh_process([*args, "-o", str(tmp_path / "r.csv")])
    assert rc == EXIT_ERROR
    assert not torch_loaded
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctscreen: error:") and expected in lines[0]
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("command", ["evaluate", "serve", "info", "quantize", "dicomweb"])
def test_every_command_with_weights_checks_the_file_first(tmp_path: Path, command: str) -> None:
    missing = str(tmp_path / "missing.pth")
    argv = {
        "evaluate": ["evaluate", "--weights", missing, "--registry", "r.csv", "--keys", "k.txt"],
        "serve": ["serve", "--weights", missing],
        "info": ["info", missing],
        "quantize": ["quantize", missing, "--calibration", str(tmp_path), "-o", "q.pth"],
        "dicomweb": ["dicomweb", "--weights", missing, "--url", "http://127.0.0.1:9/"]
        + ["--study", "1.2"],
    }[command]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.skip(f"the {command} arguments of this test no longer parse")
    rc, torch_loaded, err = _main_in_fresh_process(argv)
    assert (rc, torch_loaded) == (EXIT_ERROR, False), err
    assert f"weight file {missing} does not exist" in err
    assert args.weights == Path(missing)


def test_device_names() -> None:
    assert [check_device_name(n) for n in ("auto", " CPU ", "cuda", "cuda:1")] == [
        "auto",
        "cpu",
        "cuda",
        "cuda:1",
    ]
    for bad in ("gpu", "cuda:", "cuda:-1", "mps"):
        with pytest.raises(ConfigError):
            check_device_name(bad)


def test_ctscreen_alone_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "usage: ctscreen" in err
    listed = [name for name in COMMANDS if f"\n    {name} " in err]
    assert listed == list(COMMANDS)


def test_global_options_after_the_command_are_accepted() -> None:
    parser = build_parser()
    after = parser.parse_args(
        ["predict", "x", "-w", "m.pth", "--no-progress", "--log-level", "INFO", "--debug"]
    )
    assert (after.no_progress, after.log_level, after.debug) == (True, "INFO", True)
    before = parser.parse_args(["--no-progress", "--log-level", "ERROR", "predict", "x", "-w", "m"])
    assert (before.no_progress, before.log_level, before.debug) == (True, "ERROR", False)
    neither = parser.parse_args(["predict", "x", "-w", "m.pth"])
    assert (neither.no_progress, neither.log_level, neither.debug) == (False, "WARNING", False)


def test_predict_help_names_every_kind_of_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "zip archive, folder, DICOM file or NIfTI file (.nii, .nii.gz)" in text
    assert "--no-progress" in text  # the global options are listed with the command's


def test_a_warning_logged_under_a_progress_bar_gets_a_line_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from tqdm import tqdm

    import ctscreen.cli.info as info

    def run(args: object) -> int:
        bar = tqdm(total=3, file=sys.stderr, desc="scoring")
        bar.update(1)
        logging.getLogger("ctscreen.somewhere").warning("study 2 looks odd")
        bar.update(2)
        bar.close()
        return 0

    monkeypatch.setattr(info, "run", run)
    weights = tmp_path / "m.pth"
    weights.write_bytes(b"PK\x03\x04 enough to look like a torch file")
    assert main(["info", str(weights)]) == 0
    lines = [part.strip() for part in capsys.readouterr().err.replace("\r", "\n").split("\n")]
    assert "WARNING ctscreen.somewhere: study 2 looks odd" in lines
    assert any(line.startswith("scoring: 100%") for line in lines)
    assert logging.getLogger("ctscreen").handlers[-1].stream is sys.stderr  # restored after
