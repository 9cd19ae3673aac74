#!/usr/bin/env python
"""The original inference command, kept working from the repository root.

    python run_hackathon_infer.py pneumonia_anon.zip norma_anon.zip

writes ``hackathon_results.xlsx`` using ``runs_binary/binary_r3d18/best.pth``
unless ``--weights`` says otherwise. It is a thin wrapper over
``ctscreen predict``; every other ``predict`` option is accepted too.
"""

from __future__ import annotations

import sys

from ctscreen.cli import main

DEFAULT_WEIGHTS = "runs_binary/binary_r3d18/best.pth"
DEFAULT_OUTPUT = "hackathon_results.xlsx"


def translate(argv: list[str]) -> list[str]:
    """Map the original command line onto ``ctscreen predict``."""
    args = list(argv)
    if not any(a in ("--weights", "-w") or a.startswith("--weights=") for a in args):
        args += ["--weights", DEFAULT_WEIGHTS]
    if not any(a in ("-o", "--output") or a.startswith("--output=") for a in args):
        # The original command replaced its fixed output file on every run.
        args += ["-o", DEFAULT_OUTPUT, "--overwrite"]
    return ["predict", *args]


if __name__ == "__main__":
    sys.exit(main(translate(sys.argv[1:])))
