"""Engines that run the one scoring path somewhere other than this process.

``local`` (the default) is :meth:`ctscreen.Screener.score` in this process. ``ray``
(:mod:`ctscreen.engines.ray_engine`) spreads the same two stages over a Ray
cluster; it needs the optional extra ``ctscreen[ray]`` and is imported only when
asked for, so ``import ctscreen`` and a plain ``predict`` never import Ray.
"""

from __future__ import annotations

import importlib

from ..errors import MissingExtraError

#: ``--engine`` choices; the first is the default.
ENGINES: tuple[str, ...] = ("local", "ray")


def require_ray() -> None:
    """Check that Ray Data can be imported, before any study is read.

    Raises:
        MissingExtraError: Ray (or Ray Data's pyarrow) is not installed.
    """
    try:
        importlib.import_module("ray")
        importlib.import_module("ray.data")
    except ImportError as exc:
        raise MissingExtraError(
            f"--engine ray needs Ray Data, which is not installed here ({exc}); "
            'install it with: pip install "ctscreen[ray]"'
        ) from exc
