"""Nothing leaves the machine: OpenVINO's telemetry never runs under ctscreen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_CI_VARIABLES = ("CI", "TF_BUILD", "JENKINS_URL")


def _run(code: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    # openvino_telemetry writes to ~/intel, and stays silent where it sees a CI variable
    env = {k: v for k, v in os.environ.items() if k not in _CI_VARIABLES}
    env["HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_plain_openvino_counts_its_runs_in_the_home_folder(tmp_path: Path) -> None:
    """The control: without ctscreen, importing OpenVINO writes ~/intel/stats."""
    done = _run("import openvino", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "intel" / "stats").is_file()


def test_an_openvino_predict_run_leaves_no_telemetry(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from service_helpers import study_zip

    archive = study_zip(tmp_path, "study", seed=2)
    home = tmp_path / "home"
    home.mkdir()
    code = (
        "import sys; from ctscreen.cli import main; "
        "code = main(sys.argv[1:]); "
        "assert sys.modules.get('openvino_telemetry') is None, 'telemetry imported'; "
        "assert 'openvino' in sys.modules; sys.exit(code)"
    )
    weights = Path(tmp_path / "model.pth")
    weights.write_bytes(tiny_checkpoint.read_bytes())  # the export cache goes beside it
    args = ["--no-progress", "predict", str(archive), "--weights", str(weights)]
    args += ["--backend", "openvino", "--precision", "fp32", "-o", str(tmp_path / "rows.csv")]
    done = _run(code, home, *args)
    assert done.returncode == 0, done.stderr
    assert not (home / "intel").exists(), sorted(p.name for p in (home / "intel").iterdir())
