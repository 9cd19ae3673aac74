"""What every backend is: the interface, and the pieces all of them share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Names accepted by ``--backend``.
BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino")

#: How each backend is named in messages.
TITLES = {"torch": "PyTorch", "openvino": "OpenVINO", "openvino_int8": "OpenVINO INT8"}


class Backend(Protocol):
    """What the scorer needs of a way to run the network."""

    name: str
    precision: str

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[B]`` and activation maps ``[B, d', h', w']`` for ``x [B, 1, D, H, W]``."""
        ...


def logits_from_cam(cam: np.ndarray, bias: float) -> np.ndarray:
    """The logits ``[B]`` of activation maps ``[B, d', h', w']``: their mean plus the head bias."""
    flat = np.asarray(cam, dtype=np.float64).reshape(cam.shape[0], -1)
    return (flat.mean(axis=1) + float(bias)).astype(np.float32)


def cam_network(model: nn.Module) -> nn.Module:
    """An ``nn.Module`` around ``model`` whose forward returns ``(logits, cam)``.

    Args:
        model: an r3d_18 from :func:`ctscreen.model.build_model`.

    Returns:
        The wrapper in eval mode; it shares ``model``'s parameters.
    """
    from torch import nn

    from ..model import forward_with_cam

    class CamNetwork(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return forward_with_cam(self.inner, x)

    return CamNetwork(model).eval()
