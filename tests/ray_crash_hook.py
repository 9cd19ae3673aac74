"""A Ray worker set-up hook for the crash test of ``test_ray_engine.py``.

In every Ray worker it wraps the engine's two stages: an input whose name holds
``crash-read`` kills the reading task's process, one holding ``crash-score`` kills
the scoring worker's, as a decoder's segfault or the out-of-memory killer would.
Each kill first appends a line to the file named by ``CTSCREEN_CRASH_LOG``.
"""

from __future__ import annotations

import os
import signal
from typing import Any


def _die(what: str) -> None:
    with open(os.environ["CTSCREEN_CRASH_LOG"], "a", encoding="utf-8") as log:
        log.write(what + "\n")
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    from ctscreen.engines import ray_engine

    prepare = ray_engine.prepare
    score_prepared = ray_engine.Screener.score_prepared

    def crashing_prepare(path: Any, *args: Any, **kwargs: Any) -> Any:
        if "crash-read" in str(path):
            _die("read")
        return prepare(path, *args, **kwargs)

    def crashing_score(self: Any, group: Any, **kwargs: Any) -> Any:
        if any("crash-score" in item.input_path for item in group):
            _die("score")
        return score_prepared(self, group, **kwargs)

    ray_engine.prepare = crashing_prepare
    ray_engine.Screener.score_prepared = crashing_score
