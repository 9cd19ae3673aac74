"""Checkpoints: atomic save, safe load, legacy layouts, one-sentence errors, ``info``."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctscreen.card import ModelCard
from ctscreen.cli import info as info_cli
from ctscreen.config import PreprocessConfig
from ctscreen.errors import WeightsError
from ctscreen.model import build_model
from ctscreen.weights import (
    LEGACY_WARNING,
    describe_card,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)


class _Sneaky:
    """Unpickling this object would create a marker file (if pickle were executed)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model()
    with torch.no_grad():
        # Non-trivial batch-norm statistics and head, so a wrong load shows in the outputs.
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
        model.fc.weight.normal_(0.0, 0.1)
        model.fc.bias.fill_(-0.2)
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 1, 16, 32, 32)


@pytest.fixture(scope="module")
def expected(reference: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(x)


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_round_trip_keeps_outputs_and_card(tmp_path, reference, x, expected) -> None:
    card = ModelCard(
        preprocess=PreprocessConfig(window_level=-500.0, window_width=1400.0, shape=(16, 32, 32)),
        threshold=0.31,
        threshold_rule="youden",
        validation_metrics={"roc_auc": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.97}},
        training_data={"sources": ["synth"], "counts": {"0": 5, "1": 7}},
        train_config={"lr": 1e-4, "epochs": 2},
    )
    path = tmp_path / "sub" / "model.pth"
    save_checkpoint(path, reference, card)
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temp file left

    loaded = load_checkpoint(path)
    assert loaded.card == card
    assert loaded.warnings == ()
    assert loaded.path == path
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.model.training
    torch.testing.assert_close(_outputs(loaded.model, x), expected, atol=1e-6, rtol=0)

    text = describe_card(loaded)
    assert "0.3100" in text and "youden" in text
    assert "0.9000 (95% CI 0.8000 – 0.9700)" in text
    assert "level -500 / width 1400" in text
    assert loaded.sha256 in text

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ctscreen-checkpoint" and raw["format_version"] == 1
    assert raw["card"] == card.to_dict()


def test_save_refuses_card_values_a_safe_load_would_reject(tmp_path, reference) -> None:
    card = ModelCard(train_config={"out_dir": Path("/runs/x")})
    path = tmp_path / "model.pth"
    with pytest.raises(WeightsError, match=r"card\['train_config'\]\['out_dir'\] is a"):
        save_checkpoint(path, reference, card)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["wrapper", "bare", "dataparallel", "old_torch"])
def test_legacy_layouts_load_with_warning(tmp_path, reference, x, expected, layout) -> None:
    state = reference.state_dict()
    if layout == "wrapper":
        payload = {
            "model": {f"backbone.{k}": v for k, v in state.items()},
            # Metadata as training scripts write it: numpy scalars, an argparse Namespace.
            "epoch": np.int64(7),
            "best_auc": np.float64(0.8),
            "args": argparse.Namespace(lr=1e-4, epochs=30),
        }
    elif layout == "bare":
        payload = dict(state)
    elif layout == "dataparallel":
        payload = {f"module.{k}": v for k, v in state.items()}
    else:  # written before batch norm tracked its batch count
        payload = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"{layout}.pth"
    torch.save(payload, path)

    loaded = load_checkpoint(path)
    assert loaded.card.legacy
    assert loaded.card.threshold == 0.5
    assert loaded.card.preprocess == PreprocessConfig()
    assert loaded.warnings == (LEGACY_WARNING,)
    assert "original implementation" in LEGACY_WARNING
    assert "level -600 / width 1500, shape 96×192×192" in LEGACY_WARNING
    torch.testing.assert_close(_outputs(loaded.model, x), expected, atol=1e-6, rtol=0)
    assert LEGACY_WARNING in describe_card(loaded)


def test_pickled_object_is_refused_and_never_executed(tmp_path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"fc.bias": torch.zeros(1)}, "extra": _Sneaky(marker)}, path)
    with pytest.raises(WeightsError, match="pickled Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_file_message(tmp_path) -> None:
    with pytest.raises(WeightsError) as err:
        load_checkpoint(tmp_path / "nope.pth")
    message = err.value.message
    assert "does not exist" in message
    assert "ctscreen train" in message and "ctscreen demo" in message


def test_damaged_files_give_one_sentence(tmp_path, reference) -> None:
    good = tmp_path / "good.pth"
    torch.save({k: v for k, v in list(reference.state_dict().items())[:5]}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cases = {
        truncated: "damaged",
        text: "not a PyTorch file",
        empty: "is empty",
        tmp_path: "is not a file",
    }
    for path, fragment in cases.items():
        with pytest.raises(WeightsError, match=fragment) as err:
            load_checkpoint(path)
        assert "\n" not in err.value.message


def test_tensors_that_do_not_fit_r3d_18(tmp_path, reference) -> None:
    state = reference.state_dict()
    cases = {
        "partial": ({k: v for k, v in state.items() if not k.startswith("layer4")}, "missing"),
        "extra": (
            {**state, "head.weight": torch.zeros(2, 512)},
            r"0 keys missing and 1 unexpected",
        ),
        "rgb": ({**state, "stem.0.weight": torch.zeros(64, 3, 3, 7, 7)}, "3 input channels"),
        "kinetics_head": (
            {**state, "fc.weight": torch.zeros(400, 512), "fc.bias": torch.zeros(400)},
            "400 outputs",
        ),
        "other_file": ({"epoch": 3, "notes": "hi"}, "not a ctscreen checkpoint"),
    }
    for name, (payload, fragment) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(payload, path)
        with pytest.raises(WeightsError, match=fragment):
            load_checkpoint(path)
    # num_batches_tracked is optional (older torch did not write it), so it is not counted.
    missing = len(
        [k for k in state if k.startswith("layer4") and not k.endswith("num_batches_tracked")]
    )
    with pytest.raises(WeightsError, match=f"{missing} keys missing and 0 unexpected"):
        load_checkpoint(tmp_path / "partial.pth")


def test_newer_format_version_is_refused(tmp_path, reference) -> None:
    path = tmp_path / "future.pth"
    torch.save(
        {
            "format": "ctscreen-checkpoint",
            "format_version": 99,
            "state_dict": reference.state_dict(),
            "card": ModelCard().to_dict(),
        },
        path,
    )
    with pytest.raises(WeightsError, match="upgrade ctscreen"):
        load_checkpoint(path)


def test_file_sha256_streams(tmp_path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


def _info_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ctscreen")
    info_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["info", *argv])


def test_info_command(tmp_path, reference, capsys) -> None:
    path = tmp_path / "bare.pth"
    torch.save(reference.state_dict(), path)
    args = _info_args([str(path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "r3d_18" in out and file_sha256(path) in out
    assert "warning: " + LEGACY_WARNING in out

    args = _info_args([str(path), "--json"])
    assert args.func(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["card"]["legacy"] is True
    assert payload["warnings"] == [LEGACY_WARNING]

    args = _info_args([str(tmp_path / "absent.pth")])
    with pytest.raises(WeightsError, match="does not exist"):
        args.func(args)
