"""Dataset adapters: one module per public dataset layout, one shared result type.

Each adapter is ``build_<name>(root, **options) -> AdapterResult``. The helpers the
adapters share live in :mod:`.common`; adapters are imported lazily by
:func:`get_builder`.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from .common import SOURCES, AdapterResult, parse_key_values, read_study_header, resolve_columns

__all__ = [
    "SOURCES",
    "AdapterResult",
    "build_source",
    "get_builder",
    "parse_key_values",
    "read_study_header",
    "resolve_columns",
]


def get_builder(name: str) -> Callable[..., AdapterResult]:
    """Return the adapter function for a source name.

    Args:
        name: one of :data:`SOURCES`.

    Returns:
        ``build_<name>``.

    Raises:
        ConfigError: the name is unknown.
    """
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset source {name!r}; use one of {', '.join(SOURCES)}.")
    module = importlib.import_module(f"{__name__}.{name}")
    return getattr(module, f"build_{name}")


def build_source(name: str, root: str | os.PathLike[str], **options: Any) -> AdapterResult:
    """Run one adapter, checking that it accepts the given options.

    Args:
        name: one of :data:`SOURCES`.
        root: the dataset root folder.
        **options: adapter options (``None`` values are ignored).

    Returns:
        The adapter's result.

    Raises:
        ConfigError: unknown source or an option the adapter does not take.
        DatasetError: raised by the adapter.
    """
    builder = get_builder(name)
    given = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(builder).parameters) - {"root"}
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise ConfigError(
            f"source {name} does not take option(s) {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(accepted)) or 'none'}."
        )
    return builder(Path(root), **given)
