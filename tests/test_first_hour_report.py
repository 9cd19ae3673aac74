"""What a first report must say: key slices from the study's own pixels with colour only
inside the body, 'no slice stands out' for flat scores, the model card's caveats, and
the borderline flag."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscreen.card import ModelCard
from ctscreen.config import PreprocessConfig
from ctscreen.html_report import (
    ReportWriter,
    body_mask,
    cam_on_native_slice,
    even_key_slices,
    native_slice_png,
    scores_are_flat,
)
from ctscreen.screener import Screener
from ctscreen.synth.dicom_writer import uid_from, write_series
from ctscreen.synth.phantom import make_phantom


def make_checkpoint(path: Path, *, shape: tuple[int, int, int], **card: object) -> Path:
    """A random-weight checkpoint with the given input shape and card fields."""
    import torch

    from ctscreen.model import build_model
    from ctscreen.weights import save_checkpoint

    torch.manual_seed(7)
    card_ = ModelCard(preprocess=PreprocessConfig(shape=shape), **card)  # type: ignore[arg-type]
    save_checkpoint(path, build_model(), card_)
    return path


def _slice_with_body(size: int = 96) -> np.ndarray:
    """Padding outside a circular field of view, air, a body with two 'lungs' inside."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu = np.full((size, size), -3024.0)  # outside the field of view
    hu[r < size * 0.48] = -1000.0  # air around the patient
    body = r < size * 0.32
    hu[body] = 40.0
    for cx in (size * 0.38, size * 0.62):  # lungs: holes in the body's outline
        hu[np.hypot(yy - size / 2, xx - cx) < size * 0.09] = -850.0
    return hu


def test_body_mask_keeps_the_lungs_and_drops_air_and_the_field_of_view() -> None:
    hu = _slice_with_body()
    mask = body_mask(hu)
    assert mask[48, 36] and mask[48, 48]  # a lung, the mediastinum
    assert not mask[48, 10] and not mask[0, 0]  # air, outside the field of view
    assert not body_mask(np.full((8, 8), -1000.0)).any()


def test_native_slice_keeps_the_study_resolution_and_colours_only_the_body() -> None:
    hu = _slice_with_body()
    heat = np.ones_like(hu)  # evidence everywhere, as a flat map gives
    png = native_slice_png(hu, heat, vmax=1.0, window=(-600.0, 1500.0))
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert rgb.shape[:2] == hu.shape
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    mask = body_mask(hu)
    assert grey[~mask].all()  # no colour outside the body
    assert not grey[mask].any()


def test_cam_on_native_slice_follows_the_hot_cell() -> None:
    cam = np.zeros((2, 2, 2))
    cam[1, 0, 1] = 1.0  # head half, anterior, patient left
    plane = cam_on_native_slice(cam, 39, 40, (60, 80))
    assert plane.shape == (60, 80)
    h, w = np.unravel_index(np.argmax(plane), plane.shape)
    assert h < 30 <= 40 <= w
    np.testing.assert_allclose(cam_on_native_slice(cam, 0, 40, (60, 80)), 0.0)


def test_flat_scores_single_out_no_slice() -> None:
    flat = np.linspace(0.899, 0.906, 130)  # the real LIDC study of issue 16
    assert scores_are_flat(flat)
    assert not scores_are_flat(np.r_[np.full(60, 0.2), np.full(70, 0.9)])
    keys = even_key_slices(16, flat, count=4)
    assert [k.role for k in keys] == ["even"] * 4
    slices = [k.slice_index for k in keys]
    assert slices == sorted(slices) and slices[0] > 0 and slices[-1] < 129


def test_card_caveats_for_synthetic_data_and_another_input_shape() -> None:
    standard = ModelCard(training_data={"datasets": {"covid19_1110": 80}})
    assert standard.caveats() == ()
    demo = ModelCard(
        preprocess=PreprocessConfig(shape=(16, 48, 48)),
        training_data={"datasets": {"synthetic": 160}},
    )
    caveats = demo.caveats()
    assert len(caveats) == 2 and all(";" not in c for c in caveats)
    assert "synthetic" in caveats[0] and "16x48x48" in caveats[1]
    assert ModelCard.from_dict(demo.to_dict()).borderline_band == demo.borderline_band == 0.02


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("first-hour-study")
    phantom = make_phantom(seed=3, shape=(24, 48, 48), spacing=(5.0, 7.0, 7.0))
    study_uid = str(uid_from("first-hour", 3))
    write_series(
        phantom.hu,
        spacing=(5.0, 7.0, 7.0),
        out_dir=root / "study",
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "s")),
        origin=(-165.0, -165.0, -300.0),
        seed=3,
    )
    return root / "study"


def test_borderline_results_and_the_report_from_the_study_pixels(
    study: Path, tmp_path: Path
) -> None:
    weights = make_checkpoint(
        tmp_path / "demo.pth",
        shape=(8, 16, 16),
        training_data={"datasets": {"synthetic": 8}},
    )
    (first,) = Screener(weights, device="cpu", backend="torch").score([study])
    assert first.ok and first.volume is None
    assert any("synthetic" in w for w in first.warnings)  # the table's warnings column
    far = 0.9 if first.probability < 0.5 else 0.1
    (plain,) = Screener(weights, device="cpu", backend="torch", threshold=far).score([study])
    assert plain.probability == pytest.approx(first.probability)
    assert not plain.borderline and not any(w.startswith("borderline") for w in plain.warnings)

    # a threshold a hair away from the probability: the decision is borderline
    near = min(max(first.probability + 0.005, 0.0), 1.0)
    screener = Screener(weights, device="cpu", backend="torch", threshold=near)
    (result,) = screener.score([study], keep_image=True, keep_volume=True)
    assert result.borderline and any(w.startswith("borderline") for w in result.warnings)
    assert result.volume is not None and result.volume.hu.shape == (24, 48, 48)

    writer = ReportWriter(tmp_path / "report")
    writer.add(result)
    page = writer.finish(run_info=screener.run_info()).read_text()
    assert 'class="banner"' in page and "trained on synthetic studies only" in page
    assert "borderline</span>" in page
    assert "one image pixel per CT pixel, 7.00 x 7.00 mm" in page
