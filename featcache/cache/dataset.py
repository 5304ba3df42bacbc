"""A torch Dataset over a feature cache (imports torch at once)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class CacheDataset(Dataset):
    """(feature float32 tensor, label) per cache row; each worker opens its own HDF5 handle."""

    def __init__(self, cache, rows: np.ndarray):
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        f = self.cache.handle
        return torch.from_numpy(f["features"][row].astype(np.float32)), int(f["labels"][row])
