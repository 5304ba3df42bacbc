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

BACKENDS = ("auto", "torchvision", "pil", "dali")


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


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Decode:
    """The decode a run uses: ``name`` as asked for (torchvision, pil, dali), ``mode`` as recorded in
    the cache fingerprint (torchvision, pil, dali-cpu, dali-mixed), and why it was chosen."""

    name: str
    mode: str
    reason: str


def resolve_backend(backend: str, device: str, previous: str | None = None) -> Decode:
    """The decode backend for ``backend`` on ``device``, and why, in words.

    ``auto``: DALI (mixed nvJPEG decode) on a GPU. On a CPU, the backend of
    the cache being resumed or refreshed (``previous``) when it is a CPU one,
    else PIL: it decoded fastest on both the 224-px Kermany copy and
    full-size synthetic X-rays in ``bench/decode.py`` on a 2-core machine
    (1.46x and 1.54x torchvision; DALI's CPU mode 0.93x and 0.76x
    torchvision), its reduced-scale JPEG decode doing most for large images.
    """
    from featcache.decode.dali import dali_available

    if backend not in BACKENDS:
        raise UserError(f"unknown decode backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    gpu = device.startswith("cuda")
    if backend == "dali":
        ok, why = dali_available()
        if not ok:
            raise UserError(f"--backend dali: NVIDIA DALI cannot be imported ({why}); "
                            "install nvidia-dali-cuda130 or use --backend torchvision")
        return Decode("dali", "dali-mixed" if gpu else "dali-cpu", "asked for with --backend dali")
    if backend in ("torchvision", "pil"):
        return Decode(backend, backend, f"asked for with --backend {backend}")
    if gpu:
        ok, why = dali_available()
        if ok:
            return Decode("dali", "dali-mixed", "auto: DALI decodes on the GPU (nvJPEG)")
        return Decode("torchvision", "torchvision", f"auto: DALI cannot be imported ({why}); torchvision on CPU")
    if previous in ("torchvision", "pil", "dali-cpu"):
        name = "dali" if previous == "dali-cpu" else previous
        return Decode(name, previous, f"auto: {previous}, as the existing cache at --out was made with it")
    return Decode("pil", "pil", "auto: PIL, the fastest CPU decoder measured (bench/decode.py), with "
                                "reduced-scale decode of large JPEGs")


def make_loader(manifest, spec, *, backend: str = "torchvision", batch_size: int = 32, workers: int | None = None,
                rows=None, pin_memory: bool = False, device: str = "cpu", shard_id: int = 0, num_shards: int = 1,
                hw_decoder_load: float | None = None, augment=None, seed: int = 0):
    """Iterable of :class:`Batch` over ``rows`` (default: every manifest row), in order.

    ``augment`` (:class:`featcache.decode.augment.Augment`) applies training
    augmentations to the centre crops, random per image: seeded by ``seed``
    for DALI, by torch's generator (seed it before iterating) for CPU workers.

    ``shard_id``/``num_shards`` keep one contiguous share of those rows, as
    DALI's readers shard (featcache's own distributed extraction shards by
    chunk before it gets here).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    rows = np.arange(len(manifest), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if num_shards > 1:
        rows = np.array_split(rows, num_shards)[shard_id]
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")
    if backend in ("torchvision", "pil"):
        from featcache.decode.cpu import CpuLoader

        return CpuLoader(manifest, spec, rows, backend=backend, batch_size=batch_size, workers=workers,
                         pin_memory=pin_memory, augment=augment)
    if backend == "dali":
        from featcache.decode.dali import DEFAULT_HW_DECODER_LOAD, DaliLoader

        return DaliLoader(manifest, spec, rows, batch_size=batch_size, device=device,
                          hw_decoder_load=DEFAULT_HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load,
                          augment=augment, seed=seed)
    raise UserError(f"unknown decode backend {backend!r}")
