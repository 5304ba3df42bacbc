"""torchvision.io decode backend: read, decode, resize, crop, on CPU workers.

torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec
(a DeprecationWarning, hidden outside tests); they remain the reference CPU
path here until they are removed.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from featcache.decode import Batch


def decode_failure_reason(exc: Exception) -> str:
    """A short, stable reason for the skipped list, from a decoder's error."""
    text = str(exc)
    lowered = text.lower()
    if lowered == "empty file":
        return "empty file"
    if "truncated" in lowered or "incomplete" in lowered or "premature end" in lowered:
        return "truncated image"
    if "unsupported image file" in lowered or "not a jpeg" in lowered or "unknown image" in lowered:
        return "not an image"
    if isinstance(exc, (FileNotFoundError, PermissionError)) or "no such file" in lowered:
        return f"unreadable file ({exc.__class__.__name__})"
    last = text.strip().splitlines()[-1] if text.strip() else exc.__class__.__name__
    return f"decode error: {last[:120]}"


def load_image(path: str, spec) -> torch.Tensor:
    """One file to a uint8 (3, crop, crop) tensor following ``spec``."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError("empty file")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    image = decode_image(data, mode=ImageReadMode.RGB)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    image = F.resize(image, [spec.resize], interpolation=InterpolationMode(spec.interpolation), antialias=True)
    return F.center_crop(image, [spec.crop, spec.crop])


class _ManifestImages(Dataset):
    def __init__(self, root: str, paths: list[str], rows: np.ndarray, spec):
        self.root = root
        self.paths = paths
        self.rows = rows
        self.spec = spec

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            return row, load_image(os.path.join(self.root, self.paths[row]), self.spec), None
        except Exception as exc:  # any bad file becomes a skipped row, never a dead run
            return row, None, decode_failure_reason(exc)


def _collate(items) -> Batch:
    good = [(row, img) for row, img, _ in items if img is not None]
    failed = [(row, reason) for row, img, reason in items if img is None]
    if good:
        indices = np.array([row for row, _ in good], dtype=np.int64)
        images = torch.stack([img for _, img in good])
    else:
        indices = np.empty(0, dtype=np.int64)
        images = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return Batch(indices, images, failed)


def _worker_init(_):
    # Workers decode; the backbone in the main process owns the cores' threads.
    torch.set_num_threads(1)


class TorchvisionLoader:
    def __init__(self, manifest, spec, rows: np.ndarray, *, batch_size: int, workers: int, pin_memory: bool):
        self.dataset = _ManifestImages(manifest.root, list(manifest.paths), rows, spec)
        self.batch_size = batch_size
        self.workers = workers
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=4 if self.workers else None,
            persistent_workers=False,
        )
        yield from loader
