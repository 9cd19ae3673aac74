"""ctscreen: sort chest CT studies into "no pathology" and "pathology".

The pipeline reads left to right::

    discover -> select -> volume -> preprocess -> model -> report

and, for training::

    registry -> dataset -> train -> evaluate
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctscreen")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
