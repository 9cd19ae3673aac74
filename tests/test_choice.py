"""``auto`` by measurement: the gate is never bypassed, and a kept choice is keyed right."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctscreen import backends
from ctscreen.backends import Candidate, ModelSource, TorchBackend, choose_backend
from ctscreen.backends.choice import (
    GATE_MAX_DP,
    GATE_MAX_LOGIT,
    REFERENCE,
    choice_key,
    load_choice,
    measure_candidates,
    pick,
    save_choice,
    worst_probability_move,
)
from ctscreen.config import PreprocessConfig
from ctscreen.model import build_model

SHAPE = (16, 32, 32)
CPU = torch.device("cpu")
NATIVE_BF16 = backends.torch_cpu_bf16_capable()


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model()
    nn.init.normal_(model.fc.weight, 0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model(0)


@pytest.fixture(scope="module")
def gate_x() -> list[np.ndarray]:
    return backends.gate_inputs(PreprocessConfig(shape=SHAPE))


def test_the_gate_bounds_every_probability_move_by_one_hundredth() -> None:
    assert math.isclose(math.tanh(GATE_MAX_LOGIT / 4), GATE_MAX_DP)
    ref = np.array([-6.0, -0.02, 0.0, 3.0])
    for shift in (0.5 * GATE_MAX_LOGIT, GATE_MAX_LOGIT, 3 * GATE_MAX_LOGIT):
        moved = 1 / (1 + np.exp(-(ref + shift))) - 1 / (1 + np.exp(-ref))
        bound = worst_probability_move(ref, ref + shift)
        assert np.abs(moved).max() <= bound + 1e-12  # the bound holds at every probability
        assert (bound <= GATE_MAX_DP + 1e-12) == (shift <= GATE_MAX_LOGIT)
    assert worst_probability_move(ref, np.array([0.0, np.nan, 0.0, 0.0])) == 1.0


def test_a_fast_candidate_that_fails_the_gate_is_never_chosen(
    model: nn.Module, gate_x: list[np.ndarray]
) -> None:
    """Real runners: PyTorch fp32 and bf16, one that answers at once but wrongly (the
    fastest by far), one that raises, and one whose recorded check failed."""
    reference = TorchBackend(model, CPU, "fp32")
    fixed = reference.run(gate_x[0])

    def fast_wrong(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return fixed[0] + 2 * GATE_MAX_LOGIT, fixed[1]  # no forward at all: fastest

    def broken(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("infer request failed")

    runs: list[Candidate] = []

    def recorded_bad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        runs.append(Candidate("openvino", "int8"))
        return reference.run(x)

    wrong, failing, checked = (
        Candidate("openvino", "fp32"),
        Candidate("openvino", "bf16"),
        Candidate("openvino", "int8"),
    )
    runners = {REFERENCE: reference.run}
    if NATIVE_BF16:  # emulated bf16 (no AVX-512/AMX) takes ~100 fp32 forwards
        runners[Candidate("torch", "bf16")] = TorchBackend(model, CPU, "bf16").run
    runners.update({wrong: fast_wrong, failing: broken, checked: recorded_bad})
    trials = measure_candidates(
        runners, gate_x, rounds=2, recorded={checked: "FAILED: max |p - p_fp32| 0.06"}
    )
    by = {t.candidate: t for t in trials}
    assert [t.candidate for t in trials] == list(runners)
    assert not by[wrong].passed and by[wrong].seconds is None
    assert by[wrong].worst_dp > GATE_MAX_DP
    assert not by[failing].passed and "infer request failed" in by[failing].note
    assert not by[checked].passed and "0.06" in by[checked].note and not runs  # never run
    assert by[REFERENCE].passed and by[REFERENCE].worst_dp == 0.0
    assert len(by[REFERENCE].times) == 2 and by[REFERENCE].seconds > 0
    winner = pick(trials)
    assert winner in (REFERENCE, Candidate("torch", "bf16"))
    assert by[winner].seconds <= by[REFERENCE].seconds  # never slower than plain fp32
    # even with only the failed ones allowed, a failed candidate is not returned
    with pytest.raises(ValueError, match="no candidate passed"):
        pick(trials, allowed=[wrong, failing, checked])


def test_the_reference_is_required() -> None:
    with pytest.raises(ValueError, match="reference"):
        measure_candidates({Candidate("torch", "bf16"): lambda x: (x, x)}, [np.zeros(1)])


def _key(**changes: object) -> str:
    facts: dict[str, object] = {
        "machine": "AMD EPYC",
        "cores": 2,
        "device": "cpu",
        "versions": {"torch": "2.14.1", "openvino": "2026.4.1", "ctscreen": "0.1.0"},
        "weights_sha256": "ab" * 32,
        "shape": (96, 192, 192),
        "requested": ("auto", "auto"),
    }
    facts.update(changes)
    return choice_key(**facts)  # type: ignore[arg-type]


def test_a_kept_choice_is_found_only_under_the_same_weights_shape_and_versions(
    tmp_path: Path,
) -> None:
    path = tmp_path / "choices.json"
    trial = backends.Trial(Candidate("openvino", "int8"), True, 0.001, 0.5, (0.5,))
    save_choice(_key(), winner=trial.candidate, trials=[trial], facts={}, path=path)
    assert load_choice(_key(), path)["winner"] == "openvino/int8"
    changed = [
        _key(weights_sha256="cd" * 32),
        _key(shape=(96, 192, 191)),
        _key(versions={"torch": "2.14.1", "openvino": "2026.5.0", "ctscreen": "0.1.0"}),
        _key(versions={"torch": "2.15.0", "openvino": "2026.4.1", "ctscreen": "0.1.0"}),
        _key(machine="Intel Xeon"),
        _key(cores=4),
        _key(requested=("openvino", "auto")),
    ]
    assert len(set(changed)) == len(changed) and _key() not in changed
    assert all(load_choice(key, path) is None for key in changed)
    path.write_text("{not json")
    assert load_choice(_key(), path) is None  # a damaged file only means measuring again


def test_choose_backend_measures_once_then_reuses_until_the_weights_shape_or_version_change(
    model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "choices.json"
    source = ModelSource(model, "ab" * 32, PreprocessConfig(shape=SHAPE))
    kwargs = dict(
        device=CPU,
        backend="torch",  # PyTorch fp32 (and bf16 where native): real candidates, no export
        choices_file=path,
        rounds=1,
    )
    first, built = choose_backend(source, **kwargs)
    expected = {REFERENCE, Candidate("torch", "bf16")} if NATIVE_BF16 else {REFERENCE}
    assert not first.from_cache and set(built) == expected
    assert {t.candidate for t in first.trials} == set(built) and all(t.passed for t in first.trials)
    record = json.loads(path.read_text())[first.key]
    assert record["winner"] == first.winner.label and record["facts"]["shape"] == list(SHAPE)

    again, built = choose_backend(source, **kwargs)
    assert again.from_cache and again.winner == first.winner and not built
    assert again.trials == first.trials

    other_weights, _ = choose_backend(replace(source, weights_sha256="cd" * 32), **kwargs)
    other_shape, _ = choose_backend(
        replace(source, preprocess=PreprocessConfig(shape=(16, 32, 48))), **kwargs
    )
    real = backends.runtime_versions()
    monkeypatch.setattr(backends, "runtime_versions", lambda: {**real, "torch": "9.9.9"})
    other_version, _ = choose_backend(source, **kwargs)
    for choice in (other_weights, other_shape, other_version):
        assert not choice.from_cache and choice.key != first.key
    assert len(json.loads(path.read_text())) == 4  # every measurement kept under its own key


def test_int8_is_refused_where_it_cannot_run(model: nn.Module) -> None:
    pre = PreprocessConfig(shape=SHAPE)
    from ctscreen.errors import ConfigError

    with pytest.raises(ConfigError, match="ctscreen quantize"):
        backends.make_backend(ModelSource(model, "", pre), device=CPU, precision="int8")
    with pytest.raises(ConfigError, match="OpenVINO"):
        backends.make_backend(
            ModelSource(model, "", pre), device=CPU, backend="torch", precision="int8"
        )
    with pytest.raises(ConfigError, match="CPU"):
        backends.check_request("auto", "int8", torch.device("cuda"), int8_graph=None)
    with pytest.raises(ConfigError, match="GPU"):
        backends.check_request("auto", "fp16", CPU, int8_graph=None)


def test_candidates_follow_capability_not_speed() -> None:
    cpu = backends.candidates(CPU, openvino=True, openvino_bf16=True, int8=True, cpu_bf16=True)
    assert [c.label for c in cpu] == [
        "torch/fp32",
        "torch/bf16",
        "openvino/fp32",
        "openvino/bf16",
        "openvino/int8",
    ]
    assert [c.label for c in backends.candidates(CPU, openvino=False)] == [
        "torch/fp32",
        "torch/bf16",
    ]
    emulated = backends.candidates(CPU, openvino=False, cpu_bf16=False)
    assert [c.label for c in emulated] == ["torch/fp32"]  # bf16 emulated: not worth a trial
    assert [c.label for c in backends.candidates(CPU, precision="bf16", openvino=False)] == [
        "torch/bf16"  # asked for by name, it runs
    ]
    gpu = backends.candidates(torch.device("cuda"), openvino=True, int8=True, cuda_bf16=False)
    assert [c.label for c in gpu] == ["torch/fp32", "torch/fp16"]
    only = backends.candidates(CPU, "openvino", "fp32", openvino=True)
    assert [c.label for c in only] == ["openvino/fp32"]


def test_a_recorded_passed_check_replaces_the_phantom_gate_but_not_finiteness() -> None:
    def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x.reshape(len(x), -1).mean(axis=1), x[:, 0]

    def shifted(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, cam = reference(x)
        return logits + 3 * GATE_MAX_LOGIT, cam  # beyond the phantom gate

    def broken(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, cam = reference(x)
        return logits * np.nan, cam

    checked, unchecked, nan = (
        Candidate("openvino", "int8"),
        Candidate("openvino", "bf16"),
        Candidate("openvino", "fp32"),
    )
    x = [np.random.default_rng(0).random((1, 1, 4, 8, 8), dtype=np.float32)]
    runners = {REFERENCE: reference, checked: shifted, unchecked: shifted, nan: broken}
    trials = {
        t.candidate: t for t in measure_candidates(runners, x, rounds=1, checked=[checked, nan])
    }
    assert trials[checked].passed and "recorded check" in trials[checked].note
    assert trials[checked].worst_dp > GATE_MAX_DP  # shown, though not the judge
    assert not trials[unchecked].passed
    assert not trials[nan].passed and trials[nan].worst_dp == 1.0


def test_info_backends_measures_on_the_first_call_then_shows_the_kept_table(
    tiny_checkpoint: Path, run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTSCREEN_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "model.pth"
    weights.write_bytes(tiny_checkpoint.read_bytes())  # exports go beside the weights
    first = run_cli("info", weights, "--backends")
    assert first.code == 0, first.err
    table = first.out[first.out.index("backends on ") :]
    assert ", measured " in table.splitlines()[0]
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if "/" in line.split()[0]}
    assert "torch/fp32" in rows and rows["torch/fp32"].split()[1] == "pass"
    (chosen,) = [name for name, line in rows.items() if line.endswith("<- chosen")]
    assert table.rstrip().endswith(f"auto runs {chosen}")
    again = run_cli("info", weights, "--backends")
    assert ", kept from " in again.out and again.out.rstrip().endswith(f"auto runs {chosen}")
