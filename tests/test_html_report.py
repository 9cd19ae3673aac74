"""The HTML report of ``ctscreen predict --report``: pictures, decisions, errors, wiring."""

from __future__ import annotations

import argparse
import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ctscreen.card import ModelCard
from ctscreen.cli import predict as predict_cli
from ctscreen.config import PreprocessConfig
from ctscreen.explain import box_in_voxels, localization_box
from ctscreen.html_report import (
    CLINICAL_NOTE,
    ReportWriter,
    cam_on_slice,
    format_probability,
    interpolation_matrix,
    pick_key_slices,
)
from ctscreen.model import build_model
from ctscreen.report import result_rows
from ctscreen.screener import Screener
from ctscreen.synth.dicom_writer import uid_from, write_series
from ctscreen.synth.phantom import canonical_affine, make_phantom
from ctscreen.volume import Volume
from ctscreen.weights import save_checkpoint

INPUT_SHAPE = (16, 32, 32)
SPACING = (5.0, 5.0, 5.0)
ORIGIN = (-157.5, -170.0, -320.0)
PNG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


# --------------------------------------------------------------------------- pure helpers


def test_interpolation_matrix_keeps_constants_and_is_identity_on_same_grid() -> None:
    np.testing.assert_allclose(interpolation_matrix(7, 7), np.eye(7))
    weights = interpolation_matrix(32, 3)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    ramp = weights @ np.array([0.0, 1.0, 2.0])
    assert np.all(np.diff(ramp) >= 0) and ramp[0] == 0.0 and ramp[-1] == 2.0


def test_cam_on_slice_puts_a_hot_cell_in_its_quadrant() -> None:
    cam = np.zeros((2, 2, 2))
    cam[1, 0, 1] = 1.0  # upper depth half, anterior row, patient-left column
    top = cam_on_slice(cam, 15, INPUT_SHAPE)
    assert top.shape == INPUT_SHAPE[1:]
    h, w = np.unravel_index(np.argmax(top), top.shape)
    assert h < 16 <= w
    np.testing.assert_allclose(cam_on_slice(cam, 0, INPUT_SHAPE), 0.0)


def test_box_in_voxels_inverts_the_localization_box() -> None:
    shape = (40, 64, 48)
    volume = Volume(
        hu=np.zeros(shape, np.float32),
        spacing=(2.5, 0.7, 0.8),
        affine=canonical_affine((2.5, 0.7, 0.8), (-20.0, -30.0, -400.0)),
    )
    cam = np.zeros((5, 4, 3))
    cam[1:3, 2, 0:2] = 1.0
    box = localization_box(cam, volume)
    assert box is not None
    edges = box_in_voxels(box, volume)
    grid, size = np.array(cam.shape, float), np.array(shape, float)
    expected = np.array([[1, 3], [2, 3], [0, 2]]) / grid[:, None] * size[:, None] - 0.5
    np.testing.assert_allclose(edges, expected, atol=0.2)  # the box is rounded to 0.1 mm


def test_the_box_holds_the_peak_region_and_a_flat_map_gives_none() -> None:
    shape = (40, 64, 48)
    volume = Volume(
        hu=np.zeros(shape, np.float32),
        spacing=(2.5, 0.7, 0.8),
        affine=canonical_affine((2.5, 0.7, 0.8), (-20.0, -30.0, -400.0)),
    )
    rng = np.random.default_rng(0)
    flat = 1.0 + 0.01 * rng.standard_normal((5, 4, 3))  # every cell near the peak
    assert localization_box(flat, volume) is None
    # a hot corner on a cool floor, and a weaker spot apart from it: the box holds
    # the corner's group only, not the span of both
    cornered = flat * 0.3
    cornered[0:2, 0:2, 0] = 1.0
    cornered[4, 3, 2] = 0.8
    box = localization_box(cornered, volume)
    assert box is not None
    edges = box_in_voxels(box, volume)
    grid, size = np.array(flat.shape, float), np.array(shape, float)
    expected = np.array([[0, 2], [0, 2], [0, 1]]) / grid[:, None] * size[:, None] - 0.5
    np.testing.assert_allclose(edges, expected, atol=0.2)


def test_pick_key_slices_spreads_the_top_and_adds_the_lowest_as_reference() -> None:
    input_scores = np.array([0.1, 0.2, 0.9, 0.95, 0.3, 0.05, 0.4, 0.8] * 4)
    slice_score = np.linspace(0.0, 1.0, 64)
    keys = pick_key_slices(input_scores, slice_score, top=3)
    tops = [k for k in keys if k.role == "top"]
    assert [k.rank for k in tops] == [1, 2, 3]
    assert all(input_scores[k.input_index] == 0.95 for k in tops)
    indices = [k.input_index for k in keys]
    assert min(np.diff(sorted(indices))) >= 2  # gap = 32 // 16
    assert keys[-1].role == "reference" and input_scores[keys[-1].input_index] == 0.05
    assert all(
        k.slice_index == 2 * k.input_index or k.slice_index == 2 * k.input_index + 1 for k in keys
    )


def test_format_probability_shows_which_side_of_the_threshold() -> None:
    assert format_probability(0.73219, 0.5) == "0.732"
    assert format_probability(0.49748, 0.49715) == "0.4975"
    assert format_probability(0.5, None) == "0.500"


# --------------------------------------------------------------------------- end to end


def _write_study(root: Path, seed: int, *, n_slices: int, pathology: str | None) -> Path:
    phantom = make_phantom(
        seed=seed, shape=(n_slices, 48, 48), spacing=SPACING, pathology=pathology
    )
    study_uid = str(uid_from("html-report-study", seed))
    folder = root / f"study{seed}"
    write_series(
        phantom.hu,
        spacing=SPACING,
        out_dir=folder,
        study_uid=study_uid,
        series_uid=str(uid_from(study_uid, "series")),
        origin=ORIGIN,
        seed=seed,
    )
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A random-weight checkpoint, two good studies and one too thin to score."""
    root = tmp_path_factory.mktemp("html_report")
    torch.manual_seed(3)
    model = build_model()
    with torch.no_grad():
        model.fc.weight.normal_(0.0, 0.2)  # activation maps with clear positive parts
    weights = root / "weights.pth"
    save_checkpoint(weights, model, ModelCard(preprocess=PreprocessConfig(shape=INPUT_SHAPE)))
    inputs = [
        _write_study(root, 1, n_slices=20, pathology="consolidation"),
        _write_study(root, 2, n_slices=20, pathology=None),
        _write_study(root, 3, n_slices=8, pathology=None),
    ]
    scorer = Screener(weights, device="cpu", precision="fp32", backend="torch", prefetch=0)
    visuals = list(scorer.score(inputs, keep_image=True))
    probabilities = [r.probability for r in visuals]
    assert probabilities[0] != probabilities[1] and probabilities[2] is None
    threshold = (probabilities[0] + probabilities[1]) / 2  # one study on each side
    return dict(
        root=root,
        weights=weights,
        inputs=inputs,
        scorer=scorer,
        visuals=visuals,
        threshold=threshold,
    )


def _cards(page: str) -> list[str]:
    return page.split('<section class="card')[1:]


def _pngs(text: str) -> list[Image.Image]:
    images = []
    for data in PNG_RE.findall(text):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        images.append(image)
    return images


@pytest.fixture(scope="module")
def cli_run(setup: dict[str, object]) -> dict[str, object]:
    """``ctscreen predict --report`` through its argparse wiring."""
    root = setup["root"]
    assert isinstance(root, Path)
    parser = argparse.ArgumentParser()
    predict_cli.add_parser(parser.add_subparsers())
    table = root / "results.csv"
    report = root / "report"
    args = parser.parse_args(
        [
            "predict",
            *map(str, setup["inputs"]),
            "--weights",
            str(setup["weights"]),  # type: ignore[call-overload]
            "-o",
            str(table),
            "--report",
            str(report),
            "--threshold",
            f"{setup['threshold']:.9f}",
            "--device",
            "cpu",
            "--precision",
            "fp32",
        ]
    )
    args.no_progress, args.debug = True, False
    if hasattr(args, "backend"):
        args.backend = "torch"  # exporting to another runtime is not what this file tests
    code = args.func(args)
    return dict(
        code=code,
        frame=pd.read_csv(table),
        page=(report / "index.html").read_text(),
        report=report,
        threshold=args.threshold,
    )


def test_report_holds_every_study_with_its_decision(cli_run: dict[str, object]) -> None:
    assert cli_run["code"] == 1  # one Failure row
    frame, page = cli_run["frame"], cli_run["page"]
    assert isinstance(frame, pd.DataFrame) and isinstance(page, str)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert html.escape(CLINICAL_NOTE) in page
    cards = _cards(page)
    assert len(cards) == len(frame) == 3
    threshold = cli_run["threshold"]
    for card, (_, row) in zip(cards, frame.iterrows(), strict=True):
        assert row["study_uid"] in card
        if row["processing_status"] == "Failure":
            assert card.startswith(' failure"') and "Failure (not scored)" in card
            assert "too few slices" in row["error"]
            assert f"Error: {html.escape(row['error'])}" in card
            assert not PNG_RE.search(card)
            continue
        probability = float(row["probability_of_pathology"])
        assert f"p = {format_probability(probability, threshold)}" in card
        decision = "Pathology" if row["pathology"] == 1 else "No pathology"
        assert f'badge {"pathology" if row["pathology"] == 1 else "normal"}">{decision}<' in card
        assert row["series_uid"] in card and html.escape(row["series_reason"]) in card
    assert sorted(frame["pathology"].dropna().astype(int)) == [0, 1]
    assert not (cli_run["report"] / "img").exists()  # pictures embedded, folder removed


def test_report_pictures_are_valid_pngs_of_readable_size(cli_run: dict[str, object]) -> None:
    page = cli_run["page"]
    assert isinstance(page, str)
    for card in _cards(page)[:2]:
        curve, *slices = _pngs(card)
        assert curve.width >= 800 and 200 <= curve.height <= 400
        # key slices from the study's own pixels: one PNG pixel per CT pixel (48 x 48)
        assert 1 <= len(slices) <= 5
        for picture in slices:
            assert picture.size == (48, 48)
            pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
            assert pixels.std() > 20  # anatomy, not a blank canvas
        coloured = [np.asarray(s.convert("RGB"), dtype=np.float64) for s in slices]
        warm = [(c[..., 0] - c[..., 2] > 60).mean() for c in coloured]
        assert max(warm) > 0.01  # the activation overlay is visible somewhere


def test_run_summary_names_the_model_and_counts(
    cli_run: dict[str, object], setup: dict[str, object]
) -> None:
    page = cli_run["page"]
    assert isinstance(page, str)
    scorer = setup["scorer"]
    assert isinstance(scorer, Screener)
    summary = page.split("<h2>Studies</h2>")[0]
    assert scorer.loaded.sha256 in summary
    assert '<th>failures</th><td class="">1</td>' in summary
    assert '<th>series scored</th><td class="">2</td>' in summary
    assert '<th>device</th><td class="">cpu</td>' in summary


def test_localisation_box_is_drawn_and_listed(setup: dict[str, object], tmp_path: Path) -> None:
    visuals = setup["visuals"]
    assert isinstance(visuals, list)
    visual = next(v for v in visuals if v.box is not None)
    writer = ReportWriter(tmp_path)
    writer.add(visual)
    page = writer.finish(run_info={"threshold": visual.threshold}).read_text()
    assert "localisation box" in page and "LPS patient coordinates" in page
    x0, x1 = visual.box[0], visual.box[1]
    assert f"x {x0:g} to {x1:g} mm" in page


def test_large_runs_link_pictures_from_img_folder(setup: dict[str, object], tmp_path: Path) -> None:
    visuals = setup["visuals"]
    assert isinstance(visuals, list)
    writer = ReportWriter(tmp_path, embed_limit=0)
    for visual in visuals:
        writer.add(visual)
    page = writer.finish(run_info={}).read_text()
    assert not PNG_RE.search(page)
    linked = re.findall(r'src="(img/[^"]+\.png)"', page)
    assert len(linked) == 2 * sum(1 for visual in visuals if visual.ok)
    for name in linked:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 500


def test_per_slice_rows_share_one_card(setup: dict[str, object], tmp_path: Path) -> None:
    visuals = setup["visuals"]
    assert isinstance(visuals, list)
    result = visuals[0]
    rows = result_rows(result, "slice")
    assert len(rows) == 20
    writer = ReportWriter(tmp_path)
    writer.add(result)
    page = writer.finish(run_info={"threshold": 0.5}).read_text()
    (card,) = _cards(page)
    study_probability = float(rows[0].extras["study_probability"])  # type: ignore[arg-type]
    assert study_probability == round(result.probability, 6)
    assert f"p = {format_probability(result.probability, 0.5)}" in card
    assert len(_pngs(card)) == 2
