"""The r3d_18 model: 1-channel stem, 1 logit, Kinetics initialisation, exact CAM."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.video import r3d_18

from ctscreen.errors import ConfigError, WeightsError
from ctscreen.hardware import select_device
from ctscreen.model import build_model, count_parameters, forward_with_cam


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model().eval()
    # A non-zero bias so that the CAM identity really has to account for it.
    with torch.no_grad():
        m.fc.bias.fill_(0.37)
        m.fc.weight.normal_(0.0, 0.05)
    return m


def test_build_model_shapes_and_stem_geometry(model: torch.nn.Module) -> None:
    original = r3d_18(weights=None).stem[0]
    stem = model.stem[0]
    assert stem.in_channels == 1
    assert stem.out_channels == original.out_channels
    assert stem.kernel_size == original.kernel_size
    assert stem.stride == original.stride
    assert stem.padding == original.padding
    assert (model.fc.in_features, model.fc.out_features) == (512, 1)
    with torch.no_grad():
        out = model(torch.rand(1, 1, 16, 32, 32))
    assert out.shape == (1, 1)
    assert torch.isfinite(out).all()


def test_forward_with_cam_reproduces_logits_exactly(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.rand(2, 1, 16, 32, 32)
    with torch.no_grad():
        logits, cam = forward_with_cam(model, x)
        reference = model(x).squeeze(1)
    assert logits.shape == (2,)
    # r3d_18 downsamples depth by 8 and height/width by 16.
    assert cam.shape == (2, 2, 2, 2)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(cam.mean((1, 2, 3)) + model.fc.bias, logits, atol=1e-5, rtol=0)
    # The two inputs differ, so their maps must differ too (the CAM is not constant).
    assert not torch.allclose(cam[0], cam[1])


def test_reduced_precision_keeps_the_stem_and_head_in_float32(model: torch.nn.Module) -> None:
    torch.manual_seed(2)
    x = torch.rand(2, 1, 16, 32, 32)
    seen: dict[str, torch.dtype] = {}

    def record(name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
            seen[name] = output.dtype

        return hook

    hooks = [model.stem.register_forward_hook(record("stem"))]
    hooks.append(model.layer1.register_forward_hook(record("layer1")))
    try:
        with torch.no_grad():
            logits, cam = forward_with_cam(model, x, reduced=torch.bfloat16)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"stem": torch.float32, "layer1": torch.bfloat16}
    with torch.no_grad():
        ref_logits, _ = forward_with_cam(model, x)
    assert logits.dtype == cam.dtype == torch.float32
    # the head sums in float32, so the map still explains the logit to float32 rounding
    torch.testing.assert_close(cam.mean((1, 2, 3)) + model.fc.bias, logits, atol=1e-5, rtol=0)
    assert (logits - ref_logits).abs().max() < 0.05


def test_forward_with_cam_refuses_other_heads() -> None:
    other = r3d_18(weights=None)  # 400-class head
    with pytest.raises(ConfigError):
        forward_with_cam(other, torch.rand(1, 3, 8, 16, 16))


def test_kinetics_init_averages_rgb_stem_and_drops_head(tmp_path) -> None:
    torch.manual_seed(2)
    kinetics = r3d_18(weights=None)
    with torch.no_grad():
        for p in kinetics.parameters():
            p.normal_()
    path = tmp_path / "r3d_18_kinetics.pth"
    torch.save(kinetics.state_dict(), path)

    model = build_model(kinetics_weights=path)
    source = kinetics.state_dict()
    expected_stem = source["stem.0.weight"].mean(dim=1, keepdim=True)
    torch.testing.assert_close(model.stem[0].weight, expected_stem, atol=0, rtol=0)
    torch.testing.assert_close(
        model.layer3[1].conv2[0].weight, source["layer3.1.conv2.0.weight"], atol=0, rtol=0
    )
    torch.testing.assert_close(model.stem[1].running_var, source["stem.1.running_var"])
    assert model.fc.weight.shape == (1, 512)
    assert torch.all(model.fc.bias == 0)


def test_kinetics_init_errors(tmp_path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_model(kinetics_weights=tmp_path / "absent.pth")
    one_channel = tmp_path / "one_channel.pth"
    torch.save({"stem.0.weight": torch.zeros(64, 1, 3, 7, 7)}, one_channel)
    with pytest.raises(WeightsError, match="stem kernel"):
        build_model(kinetics_weights=one_channel)
    not_r3d = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, not_r3d)
    with pytest.raises(WeightsError, match="not a torchvision r3d_18"):
        build_model(kinetics_weights=not_r3d)


def test_count_parameters(model: torch.nn.Module) -> None:
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    fc_params = model.fc.weight.numel() + model.fc.bias.numel()
    assert fc_params == 513
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.fc.requires_grad_(True)
        assert count_parameters(model, trainable_only=True) == fc_params
        assert count_parameters(model) == total
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_select_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        select_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        select_device("tpu")
