"""ctscreen: sort chest CT studies into "no pathology" and "pathology".

The pipeline reads left to right::

    discover -> select -> volume -> preprocess -> model -> report

and, for training::

    registry -> dataset -> train -> evaluate

The library API is :class:`Screener` (load a checkpoint, score inputs) and the
:class:`StudyResult` it yields for every study; the command line, the report,
``evaluate``, the service and the DICOM node all score through it::

    from ctscreen import Screener

    screener = Screener("model.pth")
    for result in screener.score(["study.zip"]):
        print(result.location, result.status, result.probability, result.error)
"""

from __future__ import annotations

import logging
import sys

from ._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Nothing leaves the machine: `import openvino` imports its telemetry package, which
# counts every run in ~/intel/stats and sends usage events from the model converter (NNCF
# uses it too). Marked unimportable before anything of ctscreen can import OpenVINO, they
# fall back to their own no-op stubs. Left alone when someone imported it already.
if "openvino_telemetry" not in sys.modules:
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]

__all__ = ["Screener", "StudyResult", "__version__"]


def __getattr__(name: str) -> object:
    # Imported on first use, so that ``import ctscreen`` (and the CLI's --help)
    # does not pay for torch.
    if name == "Screener":
        from .screener import Screener

        return Screener
    if name == "StudyResult":
        from .results import StudyResult

        return StudyResult
    raise AttributeError(f"module 'ctscreen' has no attribute {name!r}")
