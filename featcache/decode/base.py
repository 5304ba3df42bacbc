"""The decoder contract: what a backend yields, and the registry of backends by name.

A backend turns manifest rows into :class:`Batch` objects: manifest row
indices, a uint8 RGB tensor (N, 3, crop, crop) and the rows it could not
decode with the reason. Rows are addressed by manifest index, so a consumer
never depends on batch sizes, padding or order.

Backends are declared here as data (:data:`DECODERS`): a name, the mode each
records in a cache's fingerprint on CPU and on a GPU, and where its loader
lives, imported only when that backend is used. Listing the backends (the
CLI's help, a cache's recorded mode) therefore costs no torch or DALI import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from featcache.runtime.device import cpu_cores


@dataclass
class Batch:
    indices: np.ndarray  # int64 manifest rows of ``images``, one per image
    images: object  # torch.uint8 tensor (N, 3, H, W); N may be 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (manifest row, reason)

    def pin_memory(self) -> "Batch":
        # Called by DataLoader(pin_memory=True) for faster, async host-to-GPU copies.
        self.images = self.images.pin_memory()
        return self


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Decoder:
    """One decode backend. ``loader`` and ``probe`` are ``"module:function"`` references.

    The loader is called as ``loader(manifest, spec, rows, batch_size=, workers=, pin_memory=, device=,
    hw_decoder_load=, augment=, seed=)`` and returns an iterable of :class:`Batch` with ``len()``;
    the probe returns ``(usable, why not)``.
    """

    name: str
    summary: str
    cpu_mode: str  # recorded in the fingerprint when the model runs on CPU
    gpu_mode: str  # ... and when it runs on a GPU
    loader: str
    probe: str | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.cpu_mode, self.gpu_mode)))

    def mode(self, device: str) -> str:
        return self.gpu_mode if device.startswith("cuda") else self.cpu_mode

    def available(self) -> tuple[bool, str]:
        return (True, "") if self.probe is None else _load(self.probe)()

    def make_loader(self, manifest, spec, rows, **options):
        return _load(self.loader)(manifest, spec, rows, **options)


DECODERS: dict[str, Decoder] = {}


def register_decoder(decoder: Decoder) -> Decoder:
    DECODERS[decoder.name] = decoder
    return decoder


register_decoder(Decoder("torchvision", "torchvision.io decode, antialiased resize and crop on CPU",
                         "torchvision", "torchvision", "featcache.decode.cpu:torchvision_loader"))
register_decoder(Decoder("pil", "PIL with reduced-scale JPEG decode (draft), then the same resize and crop",
                         "pil", "pil", "featcache.decode.cpu:pil_loader"))
register_decoder(Decoder("dali", "NVIDIA DALI: nvJPEG on a GPU (mixed), its CPU operators otherwise",
                         "dali-cpu", "dali-mixed", "featcache.decode.dali:dali_loader",
                         probe="featcache.decode.dali:dali_available"))


def decoder_for_mode(mode: str | None) -> Decoder | None:
    """The backend that records ``mode`` (a cache's ``decode.mode``), or None."""
    return next((d for d in DECODERS.values() if mode in d.modes), None)


def default_workers() -> int:
    # On a small CPU the backbone wants every core; one decode worker keeps it
    # fed without stealing them (measured in bench/extract_vs_forward.py).
    return max(1, min(8, cpu_cores() // 2))
