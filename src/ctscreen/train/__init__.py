"""Training and evaluation: configuration, loop, resume state, metrics and plots.

Submodules are imported on demand so that the torch-free parts
(:mod:`ctscreen.train.metrics`, :mod:`ctscreen.train.config`) stay light::

    from ctscreen.train.config import TrainConfig
    from ctscreen.train.loop import train
"""

from __future__ import annotations
