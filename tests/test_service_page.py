"""The web page in a real browser: Debian's headless Chromium, driven over the Chrome
DevTools Protocol on a pipe (``--remote-debugging-pipe``: no browser download, no
websocket library). A person signs in with the token, picks a synthetic study, uploads
it, and the result row appears in the jobs table with the study's identifiers and the
model card's warnings; a study too short to score gets a row with its identifiers and
the failure's reason; a screenshot is saved."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from ctscreen.html_report import format_probability  # noqa: E402
from ctscreen.service.app import ServiceSettings, create_app  # noqa: E402
from ctscreen.service.worker import WorkerConfig  # noqa: E402
from service_helpers import free_port, study_zip, wait_for  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "page-test-token"
#: Where to keep the screenshot besides the test's tmp folder (for the docs or a report).
SCREENSHOT_ENV = "CTSCREEN_SCREENSHOT_DIR"


class Browser:
    """Headless Chromium over the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    def __init__(self, profile: Path) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Move the browser's ends above 3 and 4 first, so that dup2 cannot clobber them.
        high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)

        def wire() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--window-size=1280,900",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=wire,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (to_browser_r, from_browser_w, high_r, high_w):
            os.close(fd)
        self._out, self._in = to_browser_w, from_browser_r
        self._buffer = b""
        self._id = 0
        self.session = ""

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _next(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("the browser did not answer")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable")
        self.call("DOM.enable")
        self.go(url)

    def go(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        wait_for(lambda: self.js("document.readyState") == "complete", timeout=60)

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def set_files(self, selector: str, paths: list[Path]) -> None:
        found = self.call("Runtime.evaluate", expression=f"document.querySelector({selector!r})")
        self.call(
            "DOM.setFileInputFiles",
            files=[str(p) for p in paths],
            objectId=found["result"]["objectId"],
        )

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        os.close(self._out)
        os.close(self._in)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture()
def server(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[tuple[str, Any]]:
    weights = tiny_checkpoint
    settings = ServiceSettings(
        data_dir=tmp_path / "data",
        worker=WorkerConfig(weights=str(weights), precision="fp32", backend="torch"),
        token=TOKEN,
        load_timeout=300,
    )
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: uvicorn_server.started, timeout=60)
        app.state.worker.wait_ready(300)
        yield f"http://127.0.0.1:{port}", app
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_upload_through_the_page_shows_the_result_row(
    server: tuple[str, Any], tmp_path: Path
) -> None:
    base, app = server
    archive = study_zip(tmp_path, "pneumonia_anon", seed=9, pathology="consolidation")
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(f"{base}/?lang=ru")
        # Without a session the page asks for the token.
        assert browser.js("!!document.querySelector('input[name=token]')") is True
        browser.js(
            f"document.querySelector('input[name=token]').value = {TOKEN!r};"
            "document.querySelector('form.login').submit();"
        )
        wait_for(lambda: browser.js("!!document.getElementById('upload')"), timeout=60)
        assert "Загрузить и оценить" in browser.js("document.body.innerText")

        browser.set_files("#files", [archive])
        wait_for(
            lambda: (
                "pneumonia_anon.zip"
                in browser.js("document.getElementById('upload-status').textContent")
            ),
            timeout=30,
        )
        browser.js("document.querySelector('#upload button[type=submit]').click()")
        cells = wait_for(
            lambda: browser.js(
                "(() => { const r = document.querySelector("
                "'tr.job[data-status=\"done\"] tr.result');"
                "return r && ['.study', '.probability', '.decision'].map("
                "s => r.querySelector(s).textContent); })()"
            ),
            timeout=300,
            interval=0.5,
        )
        # A second job (through the API): a study of 8 slices, too few to score.
        short = study_zip(tmp_path, "short_anon", seed=7, shape=(8, 64, 64))
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            with short.open("rb") as f:
                reply = http.post("/api/v1/jobs", files={"files": (short.name, f)})
            assert reply.status_code == 202, reply.text
        failed = wait_for(
            lambda: browser.js(
                "(() => { const r = [...document.querySelectorAll('tr.result')].find("
                "r => r.querySelector('.reason').textContent);"
                "return r && ['.study', '.patient-id', '.accession', '.probability', '.reason']"
                ".map(s => r.querySelector(s).textContent); })()"
            ),
            timeout=120,
            interval=0.5,
        )
        shown = browser.js(
            "(() => { const r = [...document.querySelectorAll('tr.result')].find("
            "r => r.querySelector('.study').textContent.startsWith('pneumonia_anon'));"
            "return ['.patient-id', '.accession', '.study-date'].map("
            "s => r.querySelector(s).textContent).concat("
            "[r.querySelector('.study-uid span').title]); })()"
        )
        text = browser.js("document.body.innerText")
        browser.screenshot(tmp_path / "service-page.png")
    finally:
        browser.close()

    jobs = {j.inputs[0].name: j for j in app.state.store.list_jobs()}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        row = http.get(f"/api/v1/jobs/{jobs['pneumonia_anon.zip'].id}").json()["rows"][0]
        bad = http.get(f"/api/v1/jobs/{jobs['short_anon.zip'].id}").json()["rows"][0]
    threshold = app.state.worker.run_info["threshold"]
    study, probability, decision = cells
    assert study == "pneumonia_anon.zip/pneumonia_anon" == row["path_to_study"]
    assert probability == format_probability(row["probability_of_pathology"], threshold)
    assert decision == ("патология" if row["pathology"] == 1 else "без патологии")
    # The identifiers the synthetic writer put into the headers, on the page and in the API.
    assert row["patient_id"] == "SYNTH0000" and row["accession_number"] == "A00000009"
    date = row["study_date"]
    assert shown == [
        "SYNTH0000",
        "A00000009",
        f"{date[:4]}-{date[4:6]}-{date[6:]}",
        row["study_uid"],
    ]
    assert failed[:3] == ["short_anon.zip/short_anon", "SYNTH0000", "A00000007"]
    assert failed[3] == "" and failed[4] == bad["error"] and bad["processing_status"] == "Failure"
    # The model card's warnings (this tiny model's input is not the standard one).
    cautions = app.state.worker.run_info["model_warnings"]
    assert cautions and "Карточка модели предупреждает:" in text
    assert all(c in text for c in cautions.split("; "))
    png = (tmp_path / "service-page.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(tmp_path / "service-page.png", Path(os.environ[SCREENSHOT_ENV]))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_dicom_panel_shows_results_waiting_and_send_now_tries_at_once(
    server: tuple[str, Any], tmp_path: Path, make_series
) -> None:
    pytest.importorskip("pynetdicom")
    pytest.importorskip("highdicom")
    from ctscreen.service.dicom_node import DicomNode, NodeSettings
    from ctscreen.service.sender import Destination
    from dicom_helpers import store

    base, app = server
    nobody = Destination("PACS", "127.0.0.1", free_port())  # nothing listens there
    settings = NodeSettings(
        port=free_port(), send_to=(nobody,), stable_seconds=1, retry_base=3600, retry_max=3600
    )
    node = DicomNode(app.state.settings.data_dir, settings, wake=app.state.worker.wake)
    node.start()
    app.state.node = node
    browser = Browser(tmp_path / "profile")
    try:
        paths, _ = make_series(seed=4)
        assert store(settings.port, paths) == [0] * len(paths)

        def tried_once() -> list[dict] | None:
            items = node.status()["items"]
            return items if items and all(i["attempts"] == 1 for i in items) else None

        items = wait_for(tried_once, timeout=300, interval=0.5)  # next try in an hour
        browser.open(f"{base}/?lang=en")
        browser.js(
            f"document.querySelector('input[name=token]').value = {TOKEN!r};"
            "document.querySelector('form.login').submit();"
        )
        panel = wait_for(
            lambda: browser.js("(document.getElementById('dicom') || {}).innerText"), timeout=60
        )
        assert f"{len(items)} results waiting to be sent" in panel
        assert f"results go to {nobody}" in panel and "last error:" in panel
        browser.screenshot(tmp_path / "service-dicom-panel.png")
        browser.js("document.querySelector('#dicom button.retry').click()")
        # Sent again at once (and refused again), not in an hour.
        wait_for(lambda: all(i["attempts"] >= 2 for i in node.status()["items"]), timeout=30)
    finally:
        browser.close()
        app.state.node = None
        node.stop()
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(tmp_path / "service-dicom-panel.png", Path(os.environ[SCREENSHOT_ENV]))
