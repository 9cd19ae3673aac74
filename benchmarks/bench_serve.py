"""``ctscreen serve`` under load, and its per-study time against ``ctscreen predict``.

Three phases, on synthetic study archives written once into ``--cache``:

1. ``ctscreen predict`` on ``--studies`` archives (a subprocess, as a user runs it,
   with ``--report`` unless ``--no-report-pictures``, as the service draws a report
   per job): per-study ``time_of_processing`` and predict's scoring wall time.
2. The same archives as one job through a freshly started server (a subprocess, as
   ``ctscreen serve`` runs): per-study time and the job's wall time (started ->
   finished), against phase 1.
3. ``--duration`` seconds of load: ``--uploaders`` threads each upload an archive,
   wait for its job to end and upload the next, while a poller asks for
   ``--polls`` job statuses per second. Then the queue drains. Printed: uploads
   accepted, jobs ended and how (any job not ended is lost), HTTP status counts
   (no 5xx expected), poll latency, and the resident memory of the server and of
   its scoring child, sampled every second (start, peak, end).

The model is a random-weight r3d_18 with input ``--shape`` (default 32 96 96, so that
a study takes about a second here); ``--weights`` takes a real checkpoint instead.
Timings from a shared machine drift: compare the two phases of one run, not runs.

    python benchmarks/bench_serve.py [--studies 6] [--duration 120] [--uploaders 20]
        [--polls 50] [--shape 32 96 96] [--weights W.pth] [--cache /tmp/ctscreen-bench-serve]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pandas as pd

FINAL = ("done", "failed", "timeout")
TOKEN = "bench-serve-token"


def make_archives(cache: Path, n: int) -> list[Path]:
    """``n`` synthetic chest CT studies (64 x 160 x 160, 2.5 mm), one zip each."""
    from ctscreen.synth.dicom_writer import uid_from, write_series
    from ctscreen.synth.phantom import make_phantom

    archives = []
    for i in range(n):
        archive = cache / f"study{i:02d}.zip"
        archives.append(archive)
        if archive.exists():
            continue
        spacing = (2.5, 2.2, 2.2)
        pathology = None if i % 2 == 0 else "consolidation"
        phantom = make_phantom(seed=i, shape=(64, 160, 160), spacing=spacing, pathology=pathology)
        study = str(uid_from("bench-serve", i))
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_series(
                phantom.hu,
                spacing=spacing,
                out_dir=Path(tmp) / "s",
                study_uid=study,
                series_uid=str(uid_from(study, "s")),
                origin=(-176.0, -176.0, -300.0),
                seed=i,
            )
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
                for p in paths:
                    zf.write(p, f"study{i:02d}/{p.name}")
    return archives


def make_weights(cache: Path, shape: tuple[int, int, int]) -> Path:
    import torch

    from ctscreen.card import ModelCard
    from ctscreen.config import PreprocessConfig
    from ctscreen.model import build_model
    from ctscreen.weights import save_checkpoint

    path = cache / f"random-{'x'.join(map(str, shape))}.pth"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(path, build_model(), ModelCard(preprocess=PreprocessConfig(shape=shape)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"resource_tracker" not in cmdline:
                found.append(int(entry.name))
    return found


def model_args(args: argparse.Namespace) -> list[str]:
    return ["--device", "cpu", "--precision", args.precision, "--backend", args.backend]


def run_predict(archives: list[Path], weights: Path, args: argparse.Namespace, out: Path):
    """The table and predict's own scoring wall time (model load excluded)."""
    command = [sys.executable, "-m", "ctscreen", "--no-progress", "predict"]
    command += [*map(str, archives), "-w", str(weights), "-o", str(out), *model_args(args)]
    if not args.no_report_pictures:  # the service draws each job's report: same work
        command += ["--report", str(out.parent / "predict-report")]
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    run = pd.read_excel(out, sheet_name="run").set_index("key")["value"]
    return pd.read_excel(out), float(run["wall_seconds"])


def start_server(weights: Path, data: Path, port: int, args: argparse.Namespace):
    command = [sys.executable, "-m", "ctscreen", "serve", "-w", str(weights), "--data", str(data)]
    command += ["--port", str(port), "--max-jobs", "10000", *model_args(args)]
    if args.no_report_pictures:
        command.append("--no-report-pictures")
    env = {**os.environ, "CTSCREEN_TOKEN": TOKEN}
    server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit("the server stopped while starting")
        time.sleep(0.5)
    raise SystemExit("the server did not get ready")


def upload(http: httpx.Client, archives: list[Path]) -> httpx.Response:
    files = [("files", (a.name, a.read_bytes(), "application/zip")) for a in archives]
    return http.post("/api/v1/jobs", files=files)


def wait_job(http: httpx.Client, job_id: str, timeout: float = 3600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.25)
    raise SystemExit(f"job {job_id} did not end")


def load_phase(base: str, server_pid: int, archives: list[Path], args: argparse.Namespace):
    statuses: collections.Counter[str] = collections.Counter()
    accepted: list[str] = []
    latencies: list[float] = []
    memory: list[tuple[float, int, int]] = []
    lock = threading.Lock()
    stop = threading.Event()
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def count(kind: str, answer: httpx.Response) -> None:
        with lock:
            statuses[f"{kind} {answer.status_code}"] += 1

    def uploader(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
            while not stop.is_set():
                answer = upload(http, [rng.choice(archives)])
                count("upload", answer)
                if answer.status_code != 202:
                    time.sleep(1)
                    continue
                job_id = answer.json()["id"]
                with lock:
                    accepted.append(job_id)
                while not stop.is_set():
                    job = http.get(f"/api/v1/jobs/{job_id}")
                    count("own-status", job)
                    if job.status_code == 200 and job.json()["status"] in FINAL:
                        break
                    time.sleep(1.0)

    def poller() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            interval = 1.0 / args.polls
            next_at = time.monotonic()
            while not stop.is_set():
                with lock:
                    pool = accepted[-200:]
                if pool:
                    t0 = time.perf_counter()
                    answer = http.get(f"/api/v1/jobs/{random.choice(pool)}")
                    latencies.append(time.perf_counter() - t0)
                    count("poll", answer)
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))

    def sampler() -> None:
        start = time.monotonic()
        while not stop.is_set():
            child = sum(rss_bytes(p) for p in children(server_pid))
            memory.append((time.monotonic() - start, rss_bytes(server_pid), child))
            time.sleep(1.0)

    threads = [threading.Thread(target=uploader, args=(i,)) for i in range(args.uploaders)]
    threads += [threading.Thread(target=poller), threading.Thread(target=sampler)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(args.duration)
    stop.set()
    for thread in threads:
        thread.join()
    load_seconds = time.monotonic() - start
    # Drain: every accepted job must end.
    ended: collections.Counter[str] = collections.Counter()
    rows: list[dict] = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        for job_id in accepted:
            job = wait_job(http, job_id)
            ended[job["status"]] += 1
            rows += job["rows"]
    drain_seconds = time.monotonic() - start - load_seconds
    return statuses, accepted, ended, rows, latencies, memory, load_seconds, drain_seconds


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--uploaders", type=int, default=20)
    parser.add_argument("--polls", type=float, default=50.0)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 96, 96))
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--no-report-pictures", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ctscreen-bench-serve"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    archives = make_archives(args.cache, args.studies)
    weights = args.weights or make_weights(args.cache, tuple(args.shape))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(
        f"# {cpu}, {os.cpu_count()} cores; model input {tuple(args.shape)}, "
        f"{args.backend} {args.precision}; {len(archives)} studies of 64 x 160 x 160"
    )

    predicted, predict_wall = run_predict(archives, weights, args, args.cache / "predict.xlsx")
    p_times = predicted["time_of_processing"].astype(float)
    report = "without report" if args.no_report_pictures else "with --report"
    print(
        f"predict ({report}): scoring wall {predict_wall:.2f} s (model load excluded), "
        f"time_of_processing median {p_times.median():.2f} s, sum {p_times.sum():.1f} s"
    )

    data = Path(tempfile.mkdtemp(prefix="ctscreen-bench-serve-data-"))
    server, base = start_server(weights, data, free_port(), args)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
            job = wait_job(http, upload(http, archives).json()["id"])
        s_rows = pd.DataFrame(job["rows"])
        s_times = s_rows["time_of_processing"].astype(float)
        same = (
            s_rows["probability_of_pathology"].round(6).tolist()
            == predicted["probability_of_pathology"].round(6).tolist()
        )
        job_wall = job["finished"] - job["started"]
        print(
            f"serve, one job of the same studies: wall (started -> finished) {job_wall:.2f} s, "
            f"time_of_processing median {s_times.median():.2f} s, sum {s_times.sum():.1f} s; "
            f"probabilities equal to predict's: {same}"
        )
        n = len(archives)
        print(
            f"per-study wall: serve {job_wall / n:.2f} s, predict {predict_wall / n:.2f} s "
            f"({job_wall / predict_wall:.2f}x); time_of_processing median "
            f"{s_times.median() / p_times.median():.2f}x"
        )

        (statuses, accepted, ended, rows, latencies, memory, load_s, drain_s) = load_phase(
            base, server.pid, archives, args
        )
        errors = sum(n for key, n in statuses.items() if key.split()[1].startswith("5"))
        lost = len(accepted) - sum(ended.values())
        print(
            f"load: {load_s:.0f} s with {args.uploaders} uploaders and {args.polls:g} polls/s, "
            f"then {drain_s:.0f} s to drain"
        )
        print(f"  requests: {dict(sorted(statuses.items()))}; 5xx: {errors}")
        seconds = [float(r["time_of_processing"]) for r in rows]
        print(
            f"  jobs accepted {len(accepted)}, ended {dict(ended)}, lost {lost}, rows "
            f"{len(rows)}; time_of_processing under load: median "
            f"{statistics.median(seconds):.2f} s (unloaded {s_times.median():.2f} s)"
        )
        if latencies:
            q = statistics.quantiles(latencies, n=100)
            print(
                f"  poll latency: median {statistics.median(latencies) * 1e3:.1f} ms, "
                f"p99 {q[98] * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms "
                f"({len(latencies) / load_s:.1f} polls/s achieved)"
            )
        if memory:
            server_rss = [m[1] for m in memory]
            child_rss = [m[2] for m in memory]
            print(
                f"  server RSS: start {mib(server_rss[0])}, peak {mib(max(server_rss))}, "
                f"end {mib(server_rss[-1])}; scoring child: start {mib(child_rss[0])}, "
                f"peak {mib(max(child_rss))}, end {mib(child_rss[-1])}"
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
