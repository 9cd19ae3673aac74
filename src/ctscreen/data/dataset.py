"""A torch Dataset over registry rows: cached volume (or decoded study) + label.

Each item is ``(x, y)``: ``x`` a float32 tensor ``[1, D, H, W]`` in [0, 1],
``y`` a 0-d float32 tensor (0.0 no pathology, 1.0 pathology). With a cache
folder the volume is read from the entry :mod:`ctscreen.data.cache` made; an
entry that is missing is decoded from the source and written (so a partial
cache fills up while training), unless ``fill_cache=False``. Without a cache
every item decodes its study, which is slow but needs no disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..config import PreprocessConfig
from ..errors import DatasetError
from . import cache as cache_lib

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]


def select_rows(frame: pd.DataFrame, keys: Sequence[str], *, what: str = "split") -> pd.DataFrame:
    """The registry rows of ``keys``, in the order of ``keys``.

    Args:
        frame: registry with a ``study_key`` column.
        keys: study keys to take.
        what: how to name the key list in the error message.

    Returns:
        A new frame with a fresh index.

    Raises:
        DatasetError: a key is not in the registry, or appears twice in ``keys``.
    """
    cache_lib.check_columns(frame, ("study_key", "path", "path_type", "label"))
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise DatasetError(f"the {what} key list names some studies twice; list each key once.")
    indexed = frame.assign(study_key=frame["study_key"].astype(str)).set_index("study_key")
    missing = [k for k in keys if k not in indexed.index]
    if missing:
        raise DatasetError(
            f"{len(missing)} study key(s) of the {what} list are not in the registry "
            f"(e.g. {missing[0]!r}); make the split from the same registry."
        )
    rows = indexed.loc[keys].reset_index()
    labels = rows["label"]
    if not labels.isin([0, 1]).all():
        raise DatasetError(f"the {what} rows hold labels other than 0 and 1; fix the registry.")
    return rows


class StudyDataset(Dataset):
    """Preprocessed studies of selected registry rows.

    Args:
        rows: registry rows (``study_key``, ``path``, ``path_type``, ``label``),
            e.g. from :func:`select_rows`.
        config: preprocessing (also selects the cache folder).
        cache_dir: cache folder, or None to decode every item.
        transform: applied to ``x`` (e.g. training augmentation), or None.
        fill_cache: write entries that are missing from the cache.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        config: PreprocessConfig,
        *,
        cache_dir: Path | str | None = None,
        transform: Transform | None = None,
        fill_cache: bool = True,
    ) -> None:
        cache_lib.check_columns(rows, ("study_key", "path", "path_type", "label"))
        self.rows = rows.reset_index(drop=True)
        self.config = config
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.transform = transform
        self.fill_cache = fill_cache
        self._keys = self.rows["study_key"].astype(str).tolist()
        self._paths = self.rows["path"].astype(str).tolist()
        self._types = self.rows["path_type"].astype(str).tolist()
        self.labels = self.rows["label"].astype(int).to_numpy()

    def __len__(self) -> int:
        return len(self._keys)

    def load_array(self, index: int) -> np.ndarray:
        """The preprocessed float32 ``[D, H, W]`` array of item ``index``."""
        key, src, kind = self._keys[index], self._paths[index], self._types[index]
        if self.cache_dir is None:
            return cache_lib.decode_study(src, kind, self.config)
        entry = cache_lib.entry_path(self.cache_dir, self.config, key, src)
        if entry.exists():
            return cache_lib.load_entry(entry)
        log.debug("cache miss for %s; decoding %s", key, src)
        x = cache_lib.decode_study(src, kind, self.config)
        if self.fill_cache:
            cache_lib.save_entry(entry, x)
            # Serve exactly what later epochs will read back from the entry.
            return cache_lib.dequantize(cache_lib.quantize(x))
        return x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(self.load_array(index), dtype=np.float32))
        x = x.unsqueeze(0)
        if self.transform is not None:
            x = self.transform(x)
        y = torch.tensor(float(self.labels[index]), dtype=torch.float32)
        return x, y

    def study_key(self, index: int) -> str:
        """The study key of item ``index``."""
        return self._keys[index]
