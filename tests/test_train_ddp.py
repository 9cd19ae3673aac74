"""Training under torchrun (DDP, gloo on the CPU): the sampler's shards, equal parameters
in every process after every step, files from rank 0 only, --resume, predict on the result.

The torchrun runs are real: ``python -m torch.distributed.run`` in a subprocess, two
processes, a free port each, the tiny 8x16x16 input.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ctscreen.cli import main
from ctscreen.errors import ConfigError
from ctscreen.train.distributed import (
    ShardSampler,
    World,
    epoch_sample,
    merge_parts,
    shard,
    world_from_env,
)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--shape", "8", "16", "16"]
#: A guard against a hung collective, not a timing.
GUARD_S = 300


def test_world_comes_from_torchruns_environment() -> None:
    assert world_from_env({}) == World(rank=0, local_rank=0, size=1)
    assert not world_from_env({}).distributed
    two = world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (two.rank, two.local_rank, two.size, two.distributed, two.is_main) == (
        3,
        1,
        4,
        True,
        False,
    )
    with pytest.raises(ConfigError, match="RANK=2"):
        world_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ConfigError, match="not a whole number"):
        world_from_env({"WORLD_SIZE": "two"})


def test_shards_split_one_weighted_sample_that_balances_the_classes() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    sample = epoch_sample(labels, weighted=True, shuffle=True, seed=7)
    assert np.array_equal(sample, epoch_sample(labels, weighted=True, shuffle=True, seed=7))
    assert not np.array_equal(sample, epoch_sample(labels, weighted=True, shuffle=True, seed=8))
    # one positive in ten studies, drawn about as often as the ninety negatives
    assert 0.4 < labels[sample].mean() < 0.6
    shards = [shard(sample, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]  # 100 padded to 102
    interleaved = np.stack(shards, axis=1).reshape(-1)
    assert np.array_equal(interleaved[:100], sample)
    assert np.array_equal(interleaved[100:], sample[:2])


def test_unweighted_shards_cover_a_permutation_and_have_equal_batches() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    samplers = [
        ShardSampler(labels, world=World(rank=r, size=2), weighted=False, shuffle=True, seed=1)
        for r in range(2)
    ]
    for sampler in samplers:
        sampler.set_epoch(12345)
    drawn = [list(s) for s in samplers]
    assert [len(d) for d in drawn] == [3, 3] == [len(s) for s in samplers]
    assert sorted(set(drawn[0]) | set(drawn[1])) == [0, 1, 2, 3, 4]
    samplers[0].set_epoch(12346)
    assert list(samplers[0]) != drawn[0] or list(samplers[1]) != drawn[1]


def test_validation_parts_merge_to_each_study_once_in_order() -> None:
    # five studies over two processes: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and 0 again
    parts = [
        {"index": np.array([0, 2, 4]), "prob": np.array([0.1, 0.3, 0.5])},
        {"index": np.array([1, 3, 0]), "prob": np.array([0.2, 0.4, 0.1])},
    ]
    merged = merge_parts(parts, dedupe=True)
    assert merged["index"].tolist() == [0, 1, 2, 3, 4]
    assert merged["prob"].tolist() == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert merge_parts(parts, dedupe=False)["index"].tolist() == [0, 2, 4, 1, 3, 0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_command(data: Path, *options: str) -> list[str]:
    """``-m ctscreen train`` on the test data into ``./run``, tiny input, on the CPU."""
    return [
        *("-m", "ctscreen", "--no-progress", "train"),
        *("--registry", str(data / "registry.csv")),
        *("--train-keys", str(data / "train_keys.txt")),
        *("--val-keys", str(data / "val_keys.txt")),
        *("--out", "run", "--device", "cpu", *TINY),
        *options,
    ]


def _torchrun(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, nodes: str = ""
) -> subprocess.Popen[str]:
    launch = [sys.executable, "-m", "torch.distributed.run"]
    if nodes:
        launch += nodes.split()
    else:
        launch += ["--nproc_per_node", "2", "--master_port", str(_free_port())]
    env = dict(env or {})
    if "TMPDIR" not in env:
        # torchrun leaves a torchelastic_* folder in the temporary directory: keep it in
        # cwd (a test's folder, removed with it) rather than in /tmp.
        env["TMPDIR"] = str(cwd / ".tmp")
        Path(env["TMPDIR"]).mkdir(exist_ok=True)
    base = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launch, *args],
        cwd=cwd,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a hung run is ended with all its processes
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    try:
        output, _ = proc.communicate(timeout=GUARD_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    return output


#: The test's own driver: trains through ctscreen.train.loop.train and records each
#: process's parameter checksum after every step, outside the run folder.
DRIVER = """
import hashlib, os, sys
from pathlib import Path
from ctscreen.train.config import TrainConfig
from ctscreen.train.loop import train


def run(data, out, sums):
    log = (sums / f"rank{os.environ['RANK']}.txt").open("w")

    def checksum(epoch, step, model):
        digest = hashlib.sha256()
        for p in model.parameters():
            digest.update(p.detach().cpu().numpy().tobytes())
        log.write(f"{epoch} {step} {digest.hexdigest()}\\n")
        log.flush()

    config = TrainConfig(
        epochs=2, batch_size=2, num_workers=0, device="cpu", balance="sampler", seed=3,
        preprocess={"shape": [8, 16, 16], "window_level": -600.0, "window_width": 1500.0},
    )
    train(
        registry=data / "registry.csv", train_keys=data / "train_keys.txt",
        val_keys=data / "val_keys.txt", out_dir=out, config=config, cache_dir=data / "cache",
        progress=False, after_step=checksum,
    )


if __name__ == "__main__":  # the cache's decoding processes import this file again
    run(*(Path(a) for a in sys.argv[1:4]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11 synthetic studies: 8 train (2 steps of 2 per process and epoch), 3 val."""
    root = tmp_path_factory.mktemp("ddp_data")
    argv = ["--no-progress", "synth", str(root / "synth"), "--studies", "11"]
    assert main([*argv, "--matrix", "tiny", "--seed", "4"]) == 0
    registry = root / "registry.csv"
    assert main(["registry", "build", "synthetic", str(root / "synth"), "-o", str(registry)]) == 0
    assert main(["split", str(registry), "--out-dir", str(root), "--val-fraction", "0.3"]) == 0
    return root


@pytest.fixture(scope="module")
def ddp_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """Two processes, two epochs, through the driver; the cache is built during the run."""
    work = tmp_path_factory.mktemp("ddp_run")
    (work / "driver.py").write_text(DRIVER)
    (work / "sums").mkdir()
    proc = _torchrun(
        [str(work / "driver.py"), str(data), str(work / "run"), str(work / "sums")], cwd=work
    )
    return {"work": work, "run": work / "run", "output": _finish(proc)}


def _keys(path: Path) -> list[str]:
    return path.read_text().split()


def test_parameters_are_equal_in_both_processes_after_every_step(ddp_run, data) -> None:
    sums = ddp_run["work"] / "sums"
    rank0 = (sums / "rank0.txt").read_text().splitlines()
    rank1 = (sums / "rank1.txt").read_text().splitlines()
    assert len(_keys(data / "train_keys.txt")) == 8
    steps = 2  # 4 studies per process and epoch, in batches of 2
    assert len(rank0) == 2 * steps
    assert rank0 == rank1
    assert len({line.split()[2] for line in rank0}) == len(rank0)  # every step changed them
    assert [line.split()[:2] for line in rank0][: steps + 1] == [
        *(["1", str(s)] for s in range(1, steps + 1)),
        ["2", "1"],
    ]


def test_metrics_cover_the_whole_validation_set(ddp_run, data) -> None:
    run = ddp_run["run"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    n_val = len(_keys(data / "val_keys.txt"))
    n_train = len(_keys(data / "train_keys.txt"))
    assert n_val % 2 == 1  # one process validated a padding study twice; counted once
    for epoch in (1, 2):
        folder = run / "epochs" / f"epoch_{epoch:03d}"
        assert f"n={n_val}\n" in (folder / "val_report.txt").read_text()
        assert f"n={n_train}\n" in (folder / "train_report.txt").read_text()
    # the cache was built once, by rank 0, for every study
    manifests = list((data / "cache").rglob("manifest.json"))
    assert len(manifests) == 1
    assert len(list(manifests[0].parent.glob("*.npy"))) == n_val + n_train


def test_best_checkpoint_of_a_ddp_run_loads_in_predict(ddp_run, data, tmp_path) -> None:
    best = ddp_run["run"] / "best.pth"
    state = torch.load(best, map_location="cpu", weights_only=True)
    weights = state.get("state_dict", state.get("model", state))
    assert not [k for k in weights if str(k).startswith("module.")]
    study = sorted((data / "synth" / "studies").iterdir())[0]
    out = tmp_path / "results.xlsx"
    argv = ["--no-progress", "predict", str(study), "--weights", str(best), "-o", str(out)]
    assert main([*argv, "--precision", "fp32"]) == 0
    table = pd.read_excel(out, sheet_name=0)
    assert table["processing_status"].tolist() == ["Success"]
    assert 0.0 <= table["probability_of_pathology"].iloc[0] <= 1.0


def test_resume_continues_at_epoch_3_and_a_sigterm_to_torchrun_keeps_the_state(
    ddp_run, data
) -> None:
    """The two-epoch run resumed under torchrun, then stopped as a scheduler stops a
    job: SIGTERM to torchrun alone, which passes it on to its processes (and their
    DataLoader workers)."""
    run = ddp_run["run"]
    args = _train_command(
        data,
        *("--cache-dir", str(data / "cache"), "--epochs", "1000", "--batch-size", "2"),
        *("--num-workers", "1", "--balance", "sampler", "--seed", "3"),
        *("--resume", "--resume-state", "on-interrupt"),
    )
    proc = _torchrun(args, cwd=ddp_run["work"])
    try:
        deadline = time.monotonic() + GUARD_S
        while len(pd.read_csv(run / "metrics.csv")) < 3:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "epoch 3 did not finish"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=GUARD_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert output.count("resuming run at epoch 3") == 1  # rank 0 speaks for both
    assert output.count("add --resume to the same command to continue") == 1, output
    assert "DataLoader worker" not in output
    epochs = pd.read_csv(run / "metrics.csv")["epoch"].tolist()
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 3
    # written at the stop (on-interrupt), for the last epoch in metrics.csv
    state = torch.load(run / "last_state.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == epochs[-1]


def test_only_rank_0_writes_files_on_two_nodes(data, tmp_path) -> None:
    """Two torchrun "nodes" of one process each, each in its own folder with its own
    HOME and TMPDIR; --out is relative, so a file of rank 1 would land in node1/."""
    port = _free_port()
    shared = tmp_path / "shared-config"
    procs = []
    for node in (0, 1):
        home = tmp_path / f"node{node}"
        (home / "tmp").mkdir(parents=True)
        nodes = (
            f"--nnodes 2 --nproc_per_node 1 --node_rank {node} "
            f"--master_addr 127.0.0.1 --master_port {port}"
        )
        args = _train_command(data, "--epochs", "1", "--num-workers", "0")
        # matplotlib's font cache, as a shared HOME would hold it, outside both nodes
        env = {"HOME": str(home), "TMPDIR": str(home / "tmp"), "MPLCONFIGDIR": str(shared)}
        procs.append(_torchrun(args, cwd=home, env=env, nodes=nodes))
    outputs = [_finish(p) for p in procs]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    assert {"best.pth", "metrics.csv", "config.json", "learning_curves.png"} <= set(
        os.listdir(node0 / "run")
    )
    # node 1 holds no file; its only folders are torch's own empty ones in its TMPDIR
    # (torchelastic_* of the launcher, torchinductor_* made on import)
    assert [p for p in node1.rglob("*") if not p.is_dir()] == []
    assert [p.name for p in node1.iterdir()] == ["tmp"]
    assert all(p.name.startswith("torch") for p in (node1 / "tmp").iterdir())
    assert "epoch 1/1" in outputs[0] and "run folder: run (1 epochs)" in outputs[0]
    assert "epoch 1/1" not in outputs[1] and "run folder" not in outputs[1]
