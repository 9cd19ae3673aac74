"""The numpy preprocessing against PyTorch's interpolation, which it reimplements so that
a bundle scores without PyTorch (``ctscreen export``): the same numbers to float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from ctscreen.config import PreprocessConfig
from ctscreen.preprocess import area_bins, preprocess_array, resize_axis, window_to_unit

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """PyTorch's resize of one axis: ``area`` down, ``linear`` (voxel centres) up."""
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, -1)))
    lead = t.shape[:-1]
    flat = t.reshape(1, -1, t.shape[-1])
    if size < flat.shape[-1]:
        out = F.interpolate(flat, size=size, mode="area")
    else:
        out = F.interpolate(flat, size=size, mode="linear", align_corners=False)
    return np.moveaxis(out.reshape(*lead, size).numpy(), -1, axis)


def _torch_preprocess(hu: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """What ctscreen computed with PyTorch before the numpy path: window, 2D planes, depth."""
    x = torch.from_numpy(hu.astype(np.float32))
    x = x.sub(config.hu_min).mul_(1.0 / config.window_width).clamp_(0.0, 1.0).numpy()
    for axis, size in ((1, config.shape[1]), (2, config.shape[2]), (0, config.shape[0])):
        if x.shape[axis] != size:
            x = _torch_axis(x, axis, size)
    return np.clip(x, 0.0, 1.0)


@pytest.mark.parametrize(
    ("length", "size"), [(512, 192), (7, 3), (100, 96), (96, 96), (10, 37), (1, 4), (3, 200)]
)
def test_each_axis_resize_equals_pytorch(length: int, size: int) -> None:
    x = np.random.default_rng(length * 1000 + size).random((3, length, 5), dtype=np.float32)
    ours = resize_axis(x, 1, size)
    assert ours.shape == (3, size, 5) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _torch_axis(x, 1, size), rtol=0, atol=2e-6)


def test_area_bins_cover_the_axis_and_overlap_by_at_most_one_voxel() -> None:
    starts, ends = area_bins(512, 192)
    assert starts[0] == 0 and ends[-1] == 512
    assert np.all(ends - starts >= 2) and np.all(ends - starts <= 4)
    assert np.all(starts[1:] >= ends[:-1] - 1)


@pytest.mark.parametrize("shape", [(40, 120, 130), (9, 50, 20), (16, 32, 32), (70, 31, 45)])
def test_preprocess_equals_the_pytorch_computation(shape: tuple[int, int, int]) -> None:
    config = PreprocessConfig(shape=(16, 32, 32))
    hu = np.random.default_rng(sum(shape)).uniform(-1600, 600, size=shape).astype(np.int16)
    ours = preprocess_array(hu, config, chunk_slices=4)
    assert ours.shape == (16, 32, 32) and ours.dtype == np.float32
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    np.testing.assert_allclose(ours, _torch_preprocess(hu, config), rtol=0, atol=2e-6)


def test_window_maps_the_window_ends_to_zero_and_one() -> None:
    config = PreprocessConfig()
    hu = np.array([config.hu_min - 100, config.hu_min, config.window_level, config.hu_max, 3000])
    assert window_to_unit(hu, config).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_real_chest_series_preprocess_equals_pytorch(dicom_root, tmp_path) -> None:
    from ctscreen.dicom.discover import discover
    from ctscreen.dicom.select import select_series
    from ctscreen.dicom.volume import build_volume

    folder = sorted(dicom_root.glob("chest-*"))[0]
    study = discover(folder, work_dir=tmp_path).studies[0]
    volume = build_volume(select_series(study.series).best.series)
    config = PreprocessConfig()
    ours = preprocess_array(volume.hu, config)
    np.testing.assert_allclose(ours, _torch_preprocess(volume.hu, config), rtol=0, atol=2e-6)
