"""Decode backends behind one signature.

``make_loader(manifest, spec, backend=...)`` returns an iterable of
:class:`Batch`: manifest row indices, a uint8 RGB tensor (N, 3, crop, crop)
and the rows that could not be decoded with the reason. Rows are addressed by
manifest index, so a consumer never depends on batch sizes, padding or order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from featcache.errors import UserError

BACKENDS = ("auto", "torchvision", "dali")


@dataclass
class Batch:
    indices: np.ndarray  # int64 manifest rows of ``images``, one per image
    images: object  # torch.uint8 tensor (N, 3, H, W); N may be 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (manifest row, reason)

    def pin_memory(self) -> "Batch":
        # Called by DataLoader(pin_memory=True) for faster, async host-to-GPU copies.
        self.images = self.images.pin_memory()
        return self


def default_workers() -> int:
    # On a small CPU the backbone wants every core; one decode worker keeps it
    # fed without stealing them (measured in bench/extract_vs_forward.py).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // 2))


def resolve_backend(backend: str, device: str) -> tuple[str, str]:
    """The backend to use for ``backend`` on ``device``, and why, in words."""
    if backend not in BACKENDS:
        raise UserError(f"unknown decode backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "dali":
        raise UserError("the DALI decode backend is not available in this version; use --backend torchvision")
    if backend == "torchvision":
        return "torchvision", "asked for with --backend torchvision"
    return "torchvision", "auto: torchvision.io decode (the DALI backend is not available in this version)"


def make_loader(manifest, spec, *, backend: str = "torchvision", batch_size: int = 32, workers: int | None = None,
                rows=None, pin_memory: bool = False):
    """Iterable of :class:`Batch` over ``rows`` (default: every manifest row), in order."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    rows = np.arange(len(manifest), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")
    if backend == "torchvision":
        from featcache.decode.tv import TorchvisionLoader

        return TorchvisionLoader(manifest, spec, rows, batch_size=batch_size, workers=workers, pin_memory=pin_memory)
    raise UserError(f"unknown decode backend {backend!r}")
