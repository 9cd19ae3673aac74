"""The runtime container built and run as a hospital would: podman or docker, the default
target of the Dockerfile, an exported bundle mounted at /models/model.

Build, start, the health check passes; the three real chest series zipped through the API
give predict's rows (PyTorch path, |Δp| <= 1e-4); C-ECHO to the published DICOM port; a
study sent by C-STORE comes back as an SR at the destination the environment names;
``stop`` takes under 15 s; without weights the container exits with code 2 and one
sentence, and ``on-failure:3`` does not restart it for ever.

Skipped where neither podman nor docker can run a container, or where
``CTSCREEN_SKIP_IMAGE_TEST`` is set (the test takes about 6.5 minutes on 2 shared cores).
Where no base image is at hand and none can be pulled, a Debian bookworm base is
bootstrapped once with debootstrap from the apt source this machine already uses
(``apt-get indextargets``) and kept in the engine's image store (tag :data:`LOCAL_BASE`,
root file system under ``/var/tmp``). pip inside the build uses this machine's index and
CA bundle (``pip config list``, ``PIP_*``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_helpers import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "localhost/ctscreen-test-base:bookworm"
BOOTSTRAP_DIR = Path("/var/tmp/ctscreen-test-base")
TOKEN = "image-test-token"


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


def _engine() -> str | None:
    for name in ("podman", "docker"):
        path = shutil.which(name)
        if path and _run([path, "info"], timeout=60).returncode == 0:
            return path
    return None


def _image_exists(engine: str, tag: str) -> bool:
    return _run([engine, "image", "inspect", tag], timeout=60).returncode == 0


def _apt_source() -> str | None:
    """The Debian mirror apt already uses for bookworm (read here, never written down)."""
    if not shutil.which("apt-get"):
        return None
    fields = "--format=$(REPO_URI) $(CODENAME) $(TARGET_OF)"
    listed = _run(["apt-get", "indextargets", fields, "Identifier: Packages"], timeout=60)
    rows = [line.split() for line in listed.stdout.splitlines() if len(line.split()) == 3]
    for uri, codename, kind in rows:
        if codename == "bookworm" and kind == "deb":
            return uri
    return next((uri for uri, _, kind in rows if kind == "deb"), None)


def _bootstrap_base(engine: str) -> str | None:
    """A Debian bookworm base with python3-venv, made by debootstrap and imported (podman)."""
    mirror = _apt_source()
    if not (Path(engine).name == "podman" and shutil.which("debootstrap") and mirror):
        return None
    rootfs = BOOTSTRAP_DIR / "rootfs"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        BOOTSTRAP_DIR.mkdir(parents=True, exist_ok=True)
        command = ["nice", "-n", "10", "debootstrap", "--variant=minbase"]
        command += ["--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs)]
        if _run([*command, mirror], timeout=1800).returncode != 0:
            return None
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        [engine, "import", "--change", 'CMD ["/bin/bash"]', "-", LOCAL_BASE],
        stdin=tar.stdout,
        capture_output=True,
    )
    tar.wait()
    return LOCAL_BASE if imported.returncode == 0 and tar.returncode == 0 else None


def _base_image(engine: str) -> str | None:
    for tag in (OFFICIAL_BASE, LOCAL_BASE):
        if _image_exists(engine, tag):
            return tag
    if _run([engine, "pull", OFFICIAL_BASE], timeout=120).returncode == 0:
        return OFFICIAL_BASE
    return _bootstrap_base(engine)


def _run_flags(engine: str, base: str) -> list[str] | None:
    """Flags ``run`` and ``build`` need on this host: none, or (podman on a host whose
    cgroups crun refuses and whose limits cannot be raised) runc with the current limits."""
    probe = [engine, "run", "--rm", base, "true"]
    if _run(probe, timeout=120).returncode == 0:
        return []
    import resource

    files = resource.getrlimit(resource.RLIMIT_NOFILE)
    processes = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 8192)
    flags = ["--ulimit", f"nofile={files[0]}:{files[1]}", "--ulimit", f"nproc={processes}"]
    if shutil.which("runc"):
        flags = ["--runtime", "runc", *flags]
    probe = [engine, "run", "--rm", *flags, base, "true"]
    return flags if _run(probe, timeout=120).returncode == 0 else None


def _pip_build_args(engine: str) -> list[str]:
    """This machine's pip index and CA bundle, handed to the build (read at run time)."""
    config = _run(["pip", "config", "list"], timeout=60).stdout.splitlines()
    settings = dict(line.split("=", 1) for line in config if "=" in line)
    settings = {key.split(".", 1)[-1]: value.strip("'\"") for key, value in settings.items()}
    index = os.environ.get("PIP_INDEX_URL") or settings.get("index-url")
    cert = os.environ.get("PIP_CERT") or settings.get("cert")
    args: list[str] = []
    if index and index.startswith(("http://", "https://")):
        args += ["--build-arg", f"PIP_INDEX_URL={index}"]
    if cert and Path(cert).is_file():
        args += ["--secret", f"id=pip_cert,src={cert}"]
    return args


class Image:
    """The built runtime image and how to run it here."""

    def __init__(self, engine: str, tag: str, flags: list[str], seconds: float) -> None:
        self.engine, self.tag, self.flags, self.seconds = engine, tag, flags, seconds

    def run(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return _run([self.engine, "run", "-d", "--name", name, *self.flags, *args, self.tag])

    def remove(self, name: str) -> None:
        _run([self.engine, "rm", "-f", "-v", "-t", "0", name], timeout=120)

    def inspect(self, name: str, template: str) -> str:
        return _run([self.engine, "inspect", name, "--format", template]).stdout.strip()


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    if os.environ.get("CTSCREEN_SKIP_IMAGE_TEST"):
        pytest.skip("CTSCREEN_SKIP_IMAGE_TEST is set")
    engine = _engine()
    if engine is None:
        pytest.skip("no container engine (podman or docker) can run containers here")
    base = _base_image(engine)
    if base is None:
        pytest.skip("no base image: none at hand, none could be pulled or bootstrapped")
    flags = _run_flags(engine, base)
    if flags is None:
        pytest.skip(f"{Path(engine).name} cannot run a container on this host")
    tag = f"localhost/ctscreen-test:{uuid.uuid4().hex[:8]}"
    build = ["nice", "-n", "10", engine, "build", *flags, "--pull=never", "-t", tag]
    if Path(engine).name == "podman":
        # HEALTHCHECK is a docker-format instruction; no intermediate images stay behind.
        build += ["--format", "docker", "--layers=false"]
    build += ["--build-arg", f"BASE_IMAGE={base}", *_pip_build_args(engine), str(ROOT)]
    started = time.monotonic()
    built = _run(build, timeout=3600)
    seconds = time.monotonic() - started
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    size = _run([engine, "image", "inspect", tag, "--format", "{{.Size}}"]).stdout.strip()
    print(f"\nruntime image {tag}: built in {seconds:.0f} s from {base}, {int(size) / 1e9:.2f} GB")
    try:
        yield Image(engine, tag, flags, seconds)
    finally:
        _run([engine, "rmi", "-f", tag], timeout=300)


def _readable_bundle(tmp_path: Path, weights: Path) -> Path:
    """``ctscreen export`` of ``weights``, readable by the container's user."""
    from ctscreen.cli import main

    bundle = tmp_path / "bundle"
    assert main(["export", str(weights), "-o", str(bundle)]) == 0
    for path in (bundle, *bundle.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return bundle


def test_the_image_holds_no_pytorch_and_runs_as_10001(image: Image) -> None:
    once = [image.engine, "run", "--rm", "--tmpfs", "/data", *image.flags]  # no volume left
    listed = _run([*once, "--entrypoint", "pip", image.tag, "list", "--format", "json"])
    assert listed.returncode == 0, listed.stderr
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"openvino", "pynetdicom", "highdicom", "fastapi", "ctscreen"} <= names
    assert not {n for n in names if n in ("torch", "torchvision") or n.startswith("nvidia")}
    size = int(_run([image.engine, "image", "inspect", image.tag, "--format", "{{.Size}}"]).stdout)
    assert size <= 1.5e9, f"{size / 1e9:.2f} GB"
    who = _run([*once, "--entrypoint", "id", image.tag])
    assert who.stdout.split()[:2] == ["uid=10001(ctscreen)", "gid=10001(ctscreen)"]


def _storage_scp(port: int) -> tuple[object, list]:
    """A DICOM receiver (AE ``RECEIVER``) on every interface; returns (server, received)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list = []

    def on_store(event: object) -> int:
        received.append(event.dataset)  # type: ignore[attr-defined]
        return 0x0000

    ae = AE(ae_title="RECEIVER")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("0.0.0.0", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    return server, received


def test_the_image_serves_scores_like_predict_and_answers_dicom(
    image: Image, tiny_checkpoint: Path, tmp_path: Path, dicom_root: Path, make_series
) -> None:
    import pydicom
    import requests

    from ctscreen import Screener
    from dicom_helpers import echo, store
    from service_helpers import free_port, wait_for

    bundle = _readable_bundle(tmp_path, tiny_checkpoint)
    http_port, dicom_port, receiver_port = free_port(), free_port(), free_port()
    server, received = _storage_scp(receiver_port)
    name = f"ctscreen-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-data"
    host = "host.containers.internal"
    extra = [] if Path(image.engine).name == "podman" else [f"--add-host={host}:host-gateway"]
    started = image.run(
        name,
        *extra,
        "-p", f"127.0.0.1:{http_port}:8000",
        "-p", f"127.0.0.1:{dicom_port}:11112",
        "-e", f"CTSCREEN_TOKEN={TOKEN}",
        "-e", f"CTSCREEN_SEND_TO=RECEIVER@{host}:{receiver_port}",
        "-v", f"{bundle}:/models/model:ro",
        "-v", f"{volume}:/data",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    base = f"http://127.0.0.1:{http_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:

        def healthy() -> bool:
            if image.inspect(name, "{{.State.Running}}") != "true":
                logs = _run([image.engine, "logs", name]).stderr[-3000:]
                raise AssertionError(f"the container stopped: {logs}")
            if Path(image.engine).name == "podman":  # its timer needs systemd: run it now
                return _run([image.engine, "healthcheck", "run", name]).returncode == 0
            return image.inspect(name, "{{.State.Health.Status}}") == "healthy"

        wait_for(healthy, timeout=300, interval=2.0)

        # The three real chest series, one zip each, through the API.
        zips = []
        for folder in sorted(dicom_root.glob("chest-*")):
            archive = tmp_path / f"{folder.name}.zip"
            with zipfile.ZipFile(archive, "w") as zf:
                for path in sorted(folder.rglob("*")):
                    if path.is_file():
                        zf.write(path, f"{folder.name}/{path.relative_to(folder)}")
            zips.append(archive)
        files = [("files", (z.name, z.read_bytes())) for z in zips]
        job = requests.post(f"{base}/api/v1/jobs", files=files, headers=headers, timeout=300)
        assert job.status_code == 202, job.text

        def finished() -> dict | None:
            answer = requests.get(f"{base}/api/v1/jobs/{job.json()['id']}", headers=headers)
            state = answer.json()
            return state if state["status"] in ("done", "failed", "timeout") else None

        done = wait_for(finished, timeout=900, interval=2.0)
        assert done["status"] == "done", done
        screener = Screener(tiny_checkpoint, device="cpu", backend="torch", precision="fp32")
        theirs = list(screener.score(zips))
        assert len(done["rows"]) == len(theirs) == 3
        for row, result in zip(done["rows"], theirs, strict=True):
            assert row["processing_status"] == "Success" == result.status, row
            assert (row["study_uid"], row["series_uid"]) == (result.study_uid, result.series_uid)
            assert abs(row["probability_of_pathology"] - result.probability) <= 1e-4
            assert row["pathology"] == result.pathology

        # The DICOM node, on by default: C-ECHO, then a study by C-STORE gets its SR back.
        assert echo(dicom_port) == 0x0000
        paths, _ = make_series(seed=21, pathology="consolidation", name="stored")
        assert set(store(dicom_port, paths)) == {0x0000}
        study_uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)

        def sr_back() -> bool:
            return any(
                ds.Modality == "SR" and str(ds.StudyInstanceUID) == study_uid for ds in received
            )

        wait_for(sr_back, timeout=300, interval=1.0)

        began = time.monotonic()
        stopped = _run([image.engine, "stop", "-t", "30", name], timeout=60)
        seconds = time.monotonic() - began
        assert stopped.returncode == 0 and seconds < 15, f"stop took {seconds:.1f} s"
        print(f"\nstop: {seconds:.1f} s, exit code {image.inspect(name, '{{.State.ExitCode}}')}")
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        image.remove(name)
        _run([image.engine, "volume", "rm", "-f", volume], timeout=120)


def test_without_weights_it_stops_at_once_with_one_sentence_and_no_restart_loop(
    image: Image,
) -> None:
    name = f"ctscreen-test-{uuid.uuid4().hex[:8]}"
    expected = (
        "ctscreen: error: weight file /models/model not found; pass --weights PATH (a .pth "
        "checkpoint or a bundle folder from `ctscreen export`)."
    )
    try:
        started = image.run(name, "-e", f"CTSCREEN_TOKEN={TOKEN}", "--restart", "on-failure:3")
        assert started.returncode == 0, started.stderr

        def settled() -> bool:
            return image.inspect(name, "{{.State.Status}}") in ("exited", "stopped")

        wait_for(settled, timeout=120, interval=1.0)
        time.sleep(10)  # a restart loop would have started it again by now
        assert image.inspect(name, "{{.State.Status}}") in ("exited", "stopped")
        assert image.inspect(name, "{{.State.ExitCode}}") == "2"
        restarts = int(image.inspect(name, "{{.RestartCount}}") or 0)
        assert restarts <= 3
        logs = _run([image.engine, "logs", name])
        lines = [line for line in (logs.stdout + logs.stderr).splitlines() if line.strip()]
        assert lines == [expected] * (restarts + 1), lines
        print(f"\nwithout weights: exit code 2, {restarts} restart(s), log {lines[0]!r}")
    finally:
        image.remove(name)


def test_a_bad_setting_names_its_variable(image: Image) -> None:
    name = f"ctscreen-test-{uuid.uuid4().hex[:8]}"
    try:
        image.run(name, "-e", f"CTSCREEN_TOKEN={TOKEN}", "-e", "CTSCREEN_DICOM_PORT=eleven")
        wait_for(lambda: image.inspect(name, "{{.State.Status}}") == "exited", timeout=120)
        assert image.inspect(name, "{{.State.ExitCode}}") == "2"
        logs = _run([image.engine, "logs", name])
        assert (logs.stdout + logs.stderr).strip() == (
            "ctscreen: error: CTSCREEN_DICOM_PORT='eleven' is not accepted ('eleven' is not an "
            "integer); fix or unset it."
        )
    finally:
        image.remove(name)
