"""Small frozen configurations that travel with every model.

They import no torch so that ``ctscreen info`` and fast tests stay light.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError

Shape3D = tuple[int, int, int]


@dataclass(frozen=True)
class PreprocessConfig:
    """How a Hounsfield-unit volume becomes the network input.

    Attributes:
        window_level: centre of the HU window. The default lung window is
            level -600 / width 1500, i.e. HU in [-1350, 150].
        window_width: width of the HU window (> 0).
        shape: output (D, H, W) in voxels. The whole volume is *resized* to it
            (never cropped), so the full field of view reaches the model.

    The output of preprocessing is float32 in [0, 1]: HU below the window maps
    to 0, above it to 1.
    """

    window_level: float = -600.0
    window_width: float = 1500.0
    shape: Shape3D = (96, 192, 192)

    def __post_init__(self) -> None:
        if not self.window_width > 0:
            raise ConfigError(
                f"window width must be positive, got {self.window_width}; give it in HU, e.g. 1500."
            )
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(
                f"shape must be three positive integers (D, H, W), got {self.shape!r}."
            )
        object.__setattr__(self, "shape", shape)

    @property
    def hu_min(self) -> float:
        return self.window_level - self.window_width / 2.0

    @property
    def hu_max(self) -> float:
        return self.window_level + self.window_width / 2.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def describe(self) -> str:
        """One line for people, e.g. ``"HU window level -600 / width 1500, input 96x192x192"``."""
        d, h, w = self.shape
        return (
            f"HU window level {self.window_level:g} / width {self.window_width:g}, "
            f"input {d}x{h}x{w}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown preprocessing keys {sorted(unknown)}; expected {sorted(known)}."
            )
        kwargs = dict(data)
        if "shape" in kwargs:
            kwargs["shape"] = tuple(kwargs["shape"])
        return cls(**kwargs)


@dataclass(frozen=True)
class SelectionConfig:
    """Rules that decide which series of a study is scored.

    Attributes:
        min_slices: a series with fewer distinct slice positions is rejected.
        max_axial_deviation_deg: the slice normal may deviate this much from the
            patient's head-feet axis and still count as axial (gantry tilt and
            slightly oblique acquisitions stay eligible).
    """

    min_slices: int = 16
    max_axial_deviation_deg: float = 30.0

    def __post_init__(self) -> None:
        if self.min_slices < 2:
            raise ConfigError(f"min_slices must be at least 2, got {self.min_slices}.")
