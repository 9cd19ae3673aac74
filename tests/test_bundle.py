"""``ctscreen export`` bundles: scored by the one Screener with PyTorch unimportable, they give
the rows of the PyTorch path (|Δp| <= 1e-4 at fp32)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctscreen.bundle import MANIFEST, is_bundle, load_bundle
from ctscreen.errors import ConfigError, WeightsError

#: Put first on PYTHONPATH: every Python started with it (and its children) finds no torch.
BLOCKER = """
import importlib.abc
import sys

BLOCKED = ("torch", "torchvision")


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
"""

#: Scores its arguments with a bundle and prints the rows as JSON, proving torch never loaded.
SCORE = textwrap.dedent(
    """
    import json, sys
    from ctscreen import Screener
    from ctscreen.report import result_rows
    screener = Screener(sys.argv[1], device="cpu", precision="fp32")
    rows = [
        {**result_rows(r)[0].__dict__, "logit": r.logit, "slice_scores": r.slice_scores.tolist()}
        for r in screener.score(sys.argv[2:])
    ]
    assert not any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules), "torch"
    print(json.dumps({"rows": rows, "run": screener.run_info()}, default=str))
    """
)


def torchless_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a Python that cannot import torch (a ``sitecustomize`` blocker)."""
    folder = tmp_path / "no-torch"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def score_without_torch(tmp_path: Path, bundle: Path, inputs: list[Path]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCORE, str(bundle), *map(str, inputs)],
        env=torchless_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def score_with_torch(weights: Path, inputs: list[Path]) -> list[dict]:
    from ctscreen import Screener
    from ctscreen.report import result_rows

    screener = Screener(weights, device="cpu", backend="torch", precision="fp32")
    return [
        {**result_rows(r)[0].__dict__, "logit": r.logit, "slice_scores": r.slice_scores.tolist()}
        for r in screener.score(inputs)
    ]


def assert_same_rows(ours: list[dict], theirs: list[dict], *, tolerance: float = 1e-4) -> None:
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a["processing_status"] == b["processing_status"] == "Success", (a, b)
        for key in ("path_to_study", "study_uid", "series_uid", "pathology"):
            assert a[key] == b[key], key
        assert abs(a["probability_of_pathology"] - b["probability_of_pathology"]) <= tolerance
        assert abs(a["logit"] - b["logit"]) <= 1e-3
        assert len(a["slice_scores"]) == len(b["slice_scores"])
        pairs = zip(a["slice_scores"], b["slice_scores"], strict=True)
        assert max(abs(x - y) for x, y in pairs) <= tolerance


def test_the_blocker_does_block_torch(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import torch"], env=torchless_env(tmp_path), capture_output=True
    )
    assert done.returncode == 1 and b"blocked by the test" in done.stderr


@pytest.fixture(scope="module")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctscreen.cli import main

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    assert main(["export", str(tiny_checkpoint), "-o", str(out)]) == 0
    return out


def test_export_writes_the_card_graphs_and_source_hash(
    tiny_bundle: Path, tiny_checkpoint: Path
) -> None:
    from ctscreen.weights import load_checkpoint

    loaded = load_checkpoint(tiny_checkpoint)
    bundle = load_bundle(tiny_bundle)
    assert is_bundle(tiny_bundle) and is_bundle(tiny_bundle / MANIFEST)
    assert not is_bundle(tiny_checkpoint)
    assert bundle.card.to_dict() == loaded.card.to_dict()
    assert bundle.sha256 == loaded.sha256
    assert bundle.bias == float(loaded.model.fc.bias.detach()[0])
    assert sorted(p.name for p in tiny_bundle.iterdir() if p.suffix == ".xml") == [
        "layer1.xml", "layer2.xml", "layer3.xml", "model.xml", "stem.xml"
    ]  # fmt: skip


def test_synthetic_studies_score_without_torch_as_with_torch(
    tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from service_helpers import study_zip

    inputs = [
        study_zip(tmp_path, "normal", seed=3),
        study_zip(tmp_path, "sick", seed=4, pathology="consolidation"),
    ]
    got = score_without_torch(tmp_path, tiny_bundle, inputs)
    assert got["run"]["backend"] == "openvino" and got["run"]["precision"] == "fp32"
    assert got["run"]["weights_sha256"] == load_bundle(tiny_bundle).sha256
    assert_same_rows(got["rows"], score_with_torch(tiny_checkpoint, inputs))


@pytest.mark.slow
def test_real_chest_series_score_without_torch_as_with_torch(
    tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path, dicom_root: Path
) -> None:
    inputs = sorted(dicom_root.glob("chest-*"))
    assert len(inputs) == 3
    got = score_without_torch(tmp_path, tiny_bundle, inputs)
    assert_same_rows(got["rows"], score_with_torch(tiny_checkpoint, inputs))


def test_a_changed_graph_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))
    with open(copy / "layer2.bin", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x01\x02\x03\x04")
    with pytest.raises(WeightsError, match="layer2.bin differs"):
        load_bundle(copy)
    shutil.copy(tiny_bundle / "layer2.bin", copy / "layer2.bin")
    load_bundle(copy)  # restored: accepted again
    (copy / "model.xml").unlink()
    with pytest.raises(WeightsError, match="lacks model.xml"):
        load_bundle(copy)


def test_a_bundle_refuses_what_only_pytorch_runs(tiny_bundle: Path) -> None:
    from ctscreen import Screener

    with pytest.raises(ConfigError, match="pass the .pth checkpoint for --backend torch"):
        Screener(tiny_bundle, backend="torch")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        Screener(tiny_bundle, device="cuda")
    with pytest.raises(ConfigError, match="INT8"):
        Screener(tiny_bundle, precision="int8")


def test_export_refuses_a_folder_that_holds_something_else(
    tiny_checkpoint: Path, tmp_path: Path, run_cli
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = run_cli("export", tiny_checkpoint, "-o", taken)
    assert result.code == 2 and "not an empty folder or an earlier bundle" in result.err
    assert (taken / "notes.txt").read_text() == "mine"


def test_predict_scores_a_bundle_and_refuses_a_checkpoint_in_one_sentence_without_torch(
    tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import pandas as pd

    from service_helpers import study_zip

    archive = study_zip(tmp_path, "study", seed=5)
    env = torchless_env(tmp_path)
    command = [sys.executable, "-m", "ctscreen", "--no-progress", "predict", str(archive)]
    table = tmp_path / "rows.csv"
    done = subprocess.run(
        [*command, "--weights", str(tiny_bundle), "-o", str(table)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    row = pd.read_csv(table).iloc[0]
    theirs = score_with_torch(tiny_checkpoint, [archive])[0]
    assert row["processing_status"] == "Success"
    assert abs(row["probability_of_pathology"] - theirs["probability_of_pathology"]) <= 1e-4

    refused = subprocess.run(
        [*command, "--weights", str(tiny_checkpoint), "-o", str(tmp_path / "no.csv")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"ctscreen: error: scoring the checkpoint {tiny_checkpoint} needs PyTorch, which is "
        "not installed here: pip install 'ctscreen[torch]' (CPU wheels: add --index-url "
        "https://download.pytorch.org/whl/cpu), or export the checkpoint once with "
        "`ctscreen export` where PyTorch is and score the bundle."
    ]
