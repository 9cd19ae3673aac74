"""PyTorch eager: fp32, or autocast with the stem and head kept in fp32."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..hardware import FP16_ON_CPU
from .base import logits_from_cam

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class TorchBackend:
    """PyTorch eager, fp32 or autocast.

    Attributes:
        model: an r3d_18 from :func:`ctscreen.model.build_model`, on ``device``, in eval mode.
        device: where it runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 only on CUDA).
    """

    model: nn.Module
    device: torch.device
    precision: str = "fp32"
    name: str = field(default="torch", init=False)

    def __post_init__(self) -> None:
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(FP16_ON_CPU)
        self.bias = float(self.model.fc.bias.detach().float().cpu()[0])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``[B]`` and activation maps ``[B, d', h', w']`` for ``x [B, 1, D, H, W]``."""
        import torch

        from ..model import forward_with_cam

        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.inference_mode():
            _, cam = forward_with_cam(self.model, tensor, reduced=dtype)
        cam_np = cam.float().cpu().numpy()
        return logits_from_cam(cam_np, self.bias), cam_np
