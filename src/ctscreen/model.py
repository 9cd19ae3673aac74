"""The network: torchvision ``r3d_18`` with a 1-channel stem and a single logit.

Input is ``[B, 1, D, H, W]`` float32 in [0, 1] (see :mod:`ctscreen.preprocess`),
output is one logit per study, ``[B, 1]``; ``sigmoid(logit)`` is the probability
of pathology.

The network ends in global average pooling followed by one linear layer, so the
logit is the mean over positions of ``w · f[:, d, h, w] + b``, where ``f`` is the
last feature block. :func:`forward_with_cam` returns that per-position map (the
class activation map) from the same single forward pass that gives the logit;
per-slice scores are read from it instead of running the network once per slice.

Nothing here downloads anything: Kinetics-400 initialisation reads a weight file
the user already has.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models.video import VideoResNet, r3d_18

from .errors import ConfigError, WeightsError
from .torchfile import read_torch_file

log = logging.getLogger(__name__)

#: Width of the last feature block of r3d_18 (input of the linear head).
FEATURE_CHANNELS = 512


def _one_channel_stem_conv(original: nn.Conv3d) -> nn.Conv3d:
    """A 1-channel copy of the stem convolution with the same geometry, freshly initialised."""
    conv = nn.Conv3d(
        1,
        original.out_channels,
        kernel_size=original.kernel_size,
        stride=original.stride,
        padding=original.padding,
        bias=original.bias is not None,
    )
    # Same rule torchvision uses for every other conv of VideoResNet.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def build_model(*, kinetics_weights: Path | None = None) -> nn.Module:
    """Build r3d_18 with a 1-channel stem and a 1-logit head.

    Args:
        kinetics_weights: optional path to a local torchvision Kinetics-400
            ``r3d_18`` state-dict file (``r3d_18-b3b3357e.pth``). Its RGB stem
            kernels are averaged to one channel and its 400-class head is dropped;
            every other tensor is loaded as is. Without it the weights are random.

    Returns:
        The model (train mode, on CPU). Input ``[B, 1, D, H, W]``, output ``[B, 1]``.

    Raises:
        WeightsError: the Kinetics file is missing, unreadable or not an r3d_18
            state dict.

    Example:
        >>> model = build_model()
        >>> model(torch.zeros(1, 1, 16, 32, 32)).shape
        torch.Size([1, 1])
    """
    model = r3d_18(weights=None)
    model.stem[0] = _one_channel_stem_conv(model.stem[0])
    model.fc = nn.Linear(FEATURE_CHANNELS, 1)
    nn.init.normal_(model.fc.weight, 0.0, 0.01)
    nn.init.zeros_(model.fc.bias)
    if kinetics_weights is not None:
        _load_kinetics(model, Path(kinetics_weights))
    return model


def _load_kinetics(model: nn.Module, path: Path) -> None:
    """Initialise ``model`` from a torchvision Kinetics-400 r3d_18 state dict (in place).

    The RGB stem kernels are *averaged* (not summed) to one channel. Kinetics
    frames were normalised per colour channel to roughly zero mean and unit
    variance, while CT input is a single [0, 1] channel, so there is no input on
    which either choice reproduces the pretrained responses exactly; the mean
    keeps the kernel at the magnitude of one pretrained input channel (the same
    fan-in scale the rest of the network saw), and the batch norm that follows
    the stem re-estimates the response scale during fine-tuning.
    """
    state = read_torch_file(
        path,
        what="Kinetics-400 weight file",
        hint="download torchvision's r3d_18 Kinetics-400 weights (r3d_18-b3b3357e.pth) on a "
        "machine with network and pass their local path, or train without them",
    )
    stem_key = "stem.0.weight"
    if not isinstance(state, dict) or stem_key not in state:
        raise WeightsError(
            f"{path} is not a torchvision r3d_18 state dict (no {stem_key!r}); pass "
            "torchvision's r3d_18 Kinetics-400 weight file (r3d_18-b3b3357e.pth)."
        )
    stem = state[stem_key]
    expected = tuple(model.stem[0].weight.shape[2:])
    if stem.ndim != 5 or stem.shape[1] != 3 or tuple(stem.shape[2:]) != expected:
        raise WeightsError(
            f"{path} has a stem kernel of shape {tuple(stem.shape)}, not the RGB "
            f"(64, 3, {expected[0]}, {expected[1]}, {expected[2]}) of Kinetics r3d_18; "
            "pass torchvision's r3d_18 Kinetics-400 weight file."
        )
    adapted = {k: v for k, v in state.items() if not k.startswith("fc.")}
    adapted[stem_key] = stem.mean(dim=1, keepdim=True)
    try:
        result = model.load_state_dict(adapted, strict=False)
    except RuntimeError as exc:
        raise WeightsError(
            f"{path} does not fit r3d_18 (tensor shapes differ); pass torchvision's "
            "r3d_18 Kinetics-400 weight file."
        ) from exc
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{path} does not fit r3d_18: {len(missing)} keys missing and "
            f"{len(result.unexpected_keys)} unexpected; pass torchvision's r3d_18 "
            "Kinetics-400 weight file."
        )
    log.info("initialised r3d_18 from Kinetics-400 weights %s (stem averaged to 1 channel)", path)


def forward_with_cam(
    model: nn.Module, x: torch.Tensor, *, reduced: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass giving the logits and the class activation map.

    With ``f`` the last feature block ``[B, 512, d', h', w']`` and the head
    ``logit = w · mean_pos(f) + b``, the map is ``cam[b, i, j, k] = w · f[b, :, i, j, k]``,
    so ``cam.mean((1, 2, 3)) + b == logit`` up to float rounding.

    Args:
        model: a model from :func:`build_model` (or loaded from a checkpoint).
        x: input ``[B, 1, D, H, W]``.
        reduced: run the four residual stages under autocast with this dtype
            (``torch.bfloat16`` or ``torch.float16``); the stem (see
            :func:`stem_features`) and the head stay float32.

    Returns:
        ``(logits [B], cam [B, d', h', w'])``; the cam has the feature grid size
        (D/8, H/16, W/16 rounded up for r3d_18) and excludes the bias.

    Raises:
        ConfigError: ``model`` is not an r3d_18 with a 1-logit head.
    """
    if not isinstance(model, VideoResNet) or model.fc.out_features != 1:
        raise ConfigError(
            "forward_with_cam needs the r3d_18 with one logit that build_model makes."
        )
    features = stem_features(model, x)
    if reduced is None:
        features = body_features(model, features)
    else:
        with torch.autocast(device_type=x.device.type, dtype=reduced):
            features = body_features(model, features)
    return head_with_cam(model, features.float())


def stem_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stem's output for ``x [B, 1, D, H, W]``, always computed in float32.

    The stem is about 1% of the network's arithmetic but carries most of its
    rounding error at reduced precision: its 3x7x7 kernels take differences of
    the raw [0, 1] intensities, and rounding those to bf16's 8 significant bits
    shifts the response of every flat region the same way. Measured on three
    trained demo models over 160 synthetic studies each, bf16 everywhere moved
    probabilities by up to 0.014-0.018; with a float32 stem, by up to 0.004-0.0075.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return model.stem(x.float())


def body_features(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The last feature block ``[B, 512, d', h', w']`` from the stem's output."""
    features = model.layer1(features)
    features = model.layer2(features)
    features = model.layer3(features)
    return model.layer4(features)


def head_with_cam(model: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B]`` and activation map ``[B, d', h', w']`` of the last feature block."""
    weight = model.fc.weight[0]  # [512]
    cam = torch.einsum("bcdhw,c->bdhw", features, weight)
    logits = model.fc(features.mean(dim=(2, 3, 4))).squeeze(1)
    return logits, cam


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
