"""Decode backends behind one signature.

Offers :func:`resolve_backend` (which backend a run uses on a device, and
why), :func:`make_loader` (an iterable of :class:`Batch` over manifest rows
from any registered backend) and the registry itself (:data:`DECODERS`,
:class:`Decoder`, from :mod:`featcache.decode.base`). Backends: ``cpu``
(torchvision, PIL), ``dali``; ``augment`` describes training augmentation
once for all of them and ``gate`` refuses hostile files before any decoder
sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.decode.base import DECODERS, Batch, Decoder, decoder_for_mode, default_workers
from featcache.errors import UserError

__all__ = ["BACKENDS", "DECODERS", "Batch", "Decode", "Decoder", "decoder_for_mode", "default_workers",
           "make_loader", "resolve_backend"]

BACKENDS = ("auto", *DECODERS)


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
    if backend not in BACKENDS:
        raise UserError(f"unknown decode backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    gpu = device.startswith("cuda")
    if backend != "auto":
        decoder = DECODERS[backend]
        ok, why = decoder.available()
        if not ok:
            raise UserError(f"--backend {backend}: {why}, or use --backend torchvision")
        return Decode(backend, decoder.mode(device), f"asked for with --backend {backend}")
    if gpu:
        ok, why = DECODERS["dali"].available()
        if ok:
            return Decode("dali", "dali-mixed", "auto: DALI decodes on the GPU (nvJPEG)")
        return Decode("torchvision", "torchvision", f"auto: {why.split(';')[0]}; torchvision on CPU")
    previous_decoder = decoder_for_mode(previous)
    if previous_decoder is not None and previous == previous_decoder.cpu_mode:
        return Decode(previous_decoder.name, previous,
                      f"auto: {previous}, as the existing cache at --out was made with it")
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
    if backend not in DECODERS:
        raise UserError(f"unknown decode backend {backend!r}; choose one of: {', '.join(DECODERS)}")
    return DECODERS[backend].make_loader(manifest, spec, rows, batch_size=batch_size, workers=workers,
                                         pin_memory=pin_memory, device=device, hw_decoder_load=hw_decoder_load,
                                         augment=augment, seed=seed)
