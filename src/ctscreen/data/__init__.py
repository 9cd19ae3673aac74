"""Datasets: registry schema, per-dataset adapters and the patient-grouped split.

``ctscreen.data.registry`` is torch- and pydicom-free; adapters live in
``ctscreen.data.sources`` (one module per dataset); ``ctscreen.data.split`` needs
scikit-learn and is imported on demand.
"""

from .registry import (
    PATH_TYPES,
    REGISTRY_COLUMNS,
    RegistryRow,
    merge_registries,
    read_registry,
    rows_to_frame,
    write_registry,
)

__all__ = [
    "PATH_TYPES",
    "REGISTRY_COLUMNS",
    "RegistryRow",
    "merge_registries",
    "read_registry",
    "rows_to_frame",
    "write_registry",
]
