"""CPU decode backends: one function per file, run by DataLoader workers.

``torchvision``: torchvision.io decode, then an antialiased bilinear resize
of the shorter side and a centre crop on uint8 tensors. ``pil``: PIL with
``draft`` - a JPEG is decoded straight at 1/2, 1/4 or 1/8 scale in the DCT
domain when that still leaves the shorter side at least ``spec.resize`` -
then the same resize and crop. For full-size X-rays (1-3 MP) the draft
decode is several times cheaper (``bench/decode.py``); on small images both
decode at full scale.

torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec
(a DeprecationWarning, hidden outside tests); they remain the reference CPU
path here until they are removed.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from featcache.decode.base import Batch


def decode_failure_reason(exc: Exception) -> str:
    """A short, stable reason for the skipped list, from a decoder's error."""
    from featcache.decode.gate import Refused

    if isinstance(exc, Refused):
        return str(exc)
    text = str(exc)
    lowered = text.lower()
    if lowered == "empty file":
        return "empty file"
    if "truncated" in lowered or "incomplete" in lowered or "premature end" in lowered:
        return "truncated image"
    if ("unsupported image file" in lowered or "not a jpeg" in lowered or "unknown image" in lowered
            or "cannot identify image file" in lowered or "unrecognized" in lowered):
        return "not an image"
    if isinstance(exc, (FileNotFoundError, PermissionError)) or "no such file" in lowered:
        return f"unreadable file ({exc.__class__.__name__})"
    last = text.strip().splitlines()[-1] if text.strip() else exc.__class__.__name__
    return f"decode error: {last[:120]}"


def _read(path: str) -> bytes:
    """The file's bytes, after the gate every backend shares (format, frames, pixels, end marker)."""
    from featcache.decode.gate import check

    with open(path, "rb") as f:
        raw = f.read()
    check(raw)
    return raw


def resize_crop(image: torch.Tensor, spec) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (3, crop, crop): shorter side to ``spec.resize``, centre crop, 3 channels.

    One-channel images are resized before they are replicated, a third of the work.
    """
    image = F.resize(image, [spec.resize], interpolation=InterpolationMode(spec.interpolation), antialias=True)
    image = F.center_crop(image, [spec.crop, spec.crop])
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def load_torchvision(path: str, spec) -> torch.Tensor:
    """One file to a uint8 (3, crop, crop) tensor with torchvision.io."""
    from torchvision.io import ImageReadMode, decode_image

    data = torch.frombuffer(bytearray(_read(path)), dtype=torch.uint8)
    image = decode_image(data, mode=ImageReadMode.UNCHANGED)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    if image.shape[0] == 2:  # gray + alpha
        image = image[:1]
    elif image.shape[0] == 4:  # RGBA (a CMYK JPEG is decoded again, to RGB)
        image = decode_image(data, mode=ImageReadMode.RGB) if _is_jpeg(data) else image[:3]
    return resize_crop(image, spec)


def _is_jpeg(data: torch.Tensor) -> bool:
    return len(data) > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def load_pil(path: str, spec) -> torch.Tensor:
    """One file to a uint8 (3, crop, crop) tensor with PIL, JPEGs decoded at reduced scale when possible."""
    import io

    from PIL import Image

    raw = _read(path)
    with Image.open(io.BytesIO(raw)) as im:
        if im.format == "JPEG":
            w, h = im.size
            scale = spec.resize / min(w, h)
            if scale < 0.5:  # draft keeps at least the requested size, so never below spec.resize
                im.draft("L" if im.mode == "L" else "RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        array = _to_uint8(im)
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return resize_crop(tensor, spec)


def _to_uint8(im) -> np.ndarray:
    """(H, W) gray or (H, W, 3) RGB uint8 from any PIL mode (16-bit scaled, alpha dropped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(im, dtype=np.uint32 if im.mode == "I" else np.uint16)
        top = 65535 if im.mode != "I" or wide.max() > 255 else 255
        return (wide.astype(np.float64) * (255.0 / top)).round().astype(np.uint8)
    if im.mode in ("L", "LA"):
        return np.array(im.convert("L"))
    return np.array(im.convert("RGB"))


LOADERS = {"torchvision": load_torchvision, "pil": load_pil}


class PackedPaths:
    """File paths as one UTF-8 buffer and an offset array: about the path's length plus 8 bytes a row, and
    no Python object per row, so a forked DataLoader worker reading paths never touches (and so copies) the
    pages of a string per row, as it does when reading a tuple of ``str`` bumps their reference counts."""

    def __init__(self, paths):
        self.offsets = np.zeros(len(paths) + 1, dtype=np.int64)
        buffer = bytearray()
        for i, path in enumerate(paths):
            buffer += path.encode("utf-8", "surrogateescape")
            self.offsets[i + 1] = len(buffer)
        self.buffer = bytes(buffer)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].decode("utf-8", "surrogateescape")


class _ManifestImages(Dataset):
    """Item ``i``: manifest row ``rows[i]``, whose file is ``paths[i]``."""

    def __init__(self, root: str, paths: PackedPaths, rows: np.ndarray, spec, load, transform=None):
        self.root, self.paths, self.rows, self.spec, self.load = root, paths, rows, spec, load
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            image = self.load(os.path.join(self.root, self.paths[i]), self.spec)
            return row, image if self.transform is None else self.transform(image), None
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


def torchvision_loader(manifest, spec, rows, *, batch_size: int, workers: int, pin_memory: bool = False, augment=None,
                       **_) -> "CpuLoader":
    """The registry's factory for ``torchvision`` (:mod:`featcache.decode.base`)."""
    return CpuLoader(manifest, spec, rows, backend="torchvision", batch_size=batch_size, workers=workers,
                     pin_memory=pin_memory, augment=augment)


def pil_loader(manifest, spec, rows, *, batch_size: int, workers: int, pin_memory: bool = False, augment=None,
               **_) -> "CpuLoader":
    """The registry's factory for ``pil`` (:mod:`featcache.decode.base`)."""
    return CpuLoader(manifest, spec, rows, backend="pil", batch_size=batch_size, workers=workers,
                     pin_memory=pin_memory, augment=augment)


class CpuLoader:
    def __init__(self, manifest, spec, rows: np.ndarray, *, backend: str, batch_size: int, workers: int,
                 pin_memory: bool, augment=None):
        from featcache.decode.augment import torchvision_transform

        paths = PackedPaths([manifest.paths[row] for row in rows.tolist()])
        self.dataset = _ManifestImages(manifest.root, paths, rows, spec, LOADERS[backend],
                                       torchvision_transform(augment))
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
        )
        yield from loader
