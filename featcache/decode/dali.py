"""NVIDIA DALI decode backend, fed by the manifest.

The file list and the manifest row of every file go straight into
``fn.readers.file(files=..., labels=rows)``, so each decoded image carries its
row index through the pipeline; no folder is walked again. On a GPU the
decode is ``device="mixed"`` (nvJPEG, and the hardware JPEG decoder of
A100/H100-class GPUs, its share set by ``hw_decoder_load``) and resize and
crop run on the GPU; elsewhere every operator runs on the CPU
(``device_id=None``).

A file DALI cannot decode makes the batch holding it fail. The loader then
decodes that batch's files one by one in single-file pipelines, reports the
culprits as failed rows, and rebuilds the pipeline on the rows that are left,
so a bad file costs one rebuild and never the run. The reader pads the last
batch by repeating a sample; rows are counted, so no padded duplicate is
ever yielded.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from featcache.decode.base import Batch
from featcache.runtime.device import cpu_cores

DEFAULT_HW_DECODER_LOAD = 0.65


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library mismatch at import
        return False, (f"NVIDIA DALI cannot be imported ({exc.__class__.__name__}: {exc}); "
                       "install nvidia-dali-cuda130")
    return True, ""


def _interp(name: str):
    from nvidia.dali import types

    return {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
            "nearest": types.INTERP_NN}.get(name, types.INTERP_LINEAR)


def _augmentation(images, aug, side: int):
    """DALI operators for :class:`featcache.decode.augment.Augment` on HWC crops of ``side`` pixels."""
    from nvidia.dali import fn, types

    center = [side / 2.0, side / 2.0]
    if aug.resized_crop:
        from featcache.decode.augment import TUTORIAL_RATIO

        images = fn.random_resized_crop(images, size=[side, side], random_area=list(aug.resized_crop),
                                        random_aspect_ratio=list(TUTORIAL_RATIO))
    transforms = []
    if aug.degrees:
        transforms.append(fn.transforms.rotation(angle=fn.random.uniform(range=[-aug.degrees, aug.degrees]),
                                                 center=center))
    if aug.scale != (1.0, 1.0):
        s = fn.random.uniform(range=list(aug.scale))
        transforms.append(fn.transforms.scale(scale=fn.stack(s, s), center=center))
    if aug.shear:
        transforms.append(fn.transforms.shear(angles=fn.random.uniform(range=[-aug.shear, aug.shear], shape=[2]),
                                              center=center))
    if aug.translate:
        limit = aug.translate * side
        transforms.append(fn.transforms.translation(offset=fn.random.uniform(range=[-limit, limit], shape=[2])))
    if transforms:
        matrix = transforms[0] if len(transforms) == 1 else fn.transforms.combine(*transforms)
        images = fn.warp_affine(images, matrix=matrix, fill_value=0, inverse_map=False,
                                interp_type=types.INTERP_LINEAR)
    if aug.brightness or aug.contrast:
        images = fn.brightness_contrast(images,
                                        brightness=fn.random.uniform(range=[1 - aug.brightness, 1 + aug.brightness]),
                                        contrast=fn.random.uniform(range=[1 - aug.contrast, 1 + aug.contrast]))
    if aug.hflip:
        images = fn.flip(images, horizontal=fn.random.coin_flip())
    return images


def _pipeline(files: list[str], rows: list[int], spec, *, batch_size: int, device_id: int | None, threads: int,
              hw_decoder_load: float, seed: int = 0, augment=None):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipe():
        encoded, labels = fn.readers.file(files=files, labels=rows, random_shuffle=False, pad_last_batch=True,
                                          name="reader")
        if gpu:
            images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                       hw_decoder_load=hw_decoder_load)
        else:
            images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_shorter=spec.resize, interp_type=_interp(spec.interpolation),
                           antialias=True)
        if augment is None:
            images = fn.crop_mirror_normalize(images, crop=(spec.crop, spec.crop), dtype=types.UINT8,
                                              output_layout="CHW")
        else:  # augment the centre crop, as the CPU backends do, then lay it out CHW
            images = fn.crop(images, crop=(spec.crop, spec.crop))
            images = fn.transpose(_augmentation(images, augment, spec.crop), perm=[2, 0, 1])
        return images, labels

    p = pipe()
    p.build()
    return p


def _to_torch(tensor_list, device: str) -> torch.Tensor:
    """A DALI batch of equal-shape images as one torch uint8 tensor on ``device``."""
    if device.startswith("cuda"):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out
    return torch.from_numpy(np.array(tensor_list.as_tensor()))


def dali_loader(manifest, spec, rows, *, batch_size: int, device: str = "cpu", hw_decoder_load: float | None = None,
                augment=None, seed: int = 0, **_) -> "DaliLoader":
    """The registry's factory (:mod:`featcache.decode.base`): DALI runs its own threads, not DataLoader workers."""
    return DaliLoader(manifest, spec, rows, batch_size=batch_size, device=device,
                      hw_decoder_load=DEFAULT_HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load,
                      augment=augment, seed=seed)


class DaliLoader:
    def __init__(self, manifest, spec, rows: np.ndarray, *, batch_size: int, device: str = "cpu",
                 threads: int | None = None, hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD, augment=None,
                 seed: int = 0):
        self.root = manifest.root
        self.paths = manifest.paths
        self.rows = [int(r) for r in rows]
        self.spec = spec
        self.batch_size = batch_size
        self.device = device
        self.device_id = torch.device(device).index or 0 if device.startswith("cuda") else None
        self.threads = threads or max(1, min(8, cpu_cores()))
        self.hw_decoder_load = hw_decoder_load
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def _build(self, rows: list[int], batch_size: int):
        files = [os.path.join(self.root, self.paths[r]) for r in rows]
        return _pipeline(files, rows, self.spec, batch_size=batch_size, device_id=self.device_id,
                         threads=self.threads, hw_decoder_load=self.hw_decoder_load, seed=self.seed,
                         augment=self.augment)

    def __iter__(self):
        from featcache.decode.gate import check_file

        # The gate first: DALI would allocate whatever a header claims, and dies on some files
        # (an animated GIF named .jpeg segfaults its CPU decoder) instead of raising.
        refused = [(r, reason) for r in self.rows
                   if (reason := check_file(os.path.join(self.root, self.paths[r]))) is not None]
        if refused:
            yield Batch(np.empty(0, np.int64), torch.empty(0, 3, 0, 0, dtype=torch.uint8), refused)
        bad = {r for r, _ in refused}
        pending = [r for r in self.rows if r not in bad]
        while pending:
            pipe = self._build(pending, self.batch_size)
            done = 0
            try:
                while done < len(pending):
                    images, labels = pipe.run()
                    take = min(self.batch_size, len(pending) - done)  # drop the reader's padding
                    got = np.array(labels.as_tensor()).reshape(-1)[:take].astype(np.int64)
                    expected = pending[done : done + take]
                    if got.tolist() != expected:
                        raise RuntimeError(f"DALI returned rows {got[:4].tolist()}..., expected {expected[:4]}...")
                    tensor = _to_torch(images, self.device)[:take]
                    done += take
                    yield Batch(got, tensor, [])
                pending = []
            except RuntimeError as exc:
                if "DALI returned rows" in str(exc):
                    raise
                failed_batch = pending[done : done + self.batch_size]
                culprits = self._culprits(failed_batch)
                if not culprits:
                    raise  # not a file's fault: a real error
                yield Batch(np.empty(0, np.int64), torch.empty(0, 3, 0, 0, dtype=torch.uint8), culprits)
                bad = {row for row, _ in culprits}
                pending = [r for r in pending[done:] if r not in bad]
            finally:
                del pipe

    def _culprits(self, rows: list[int]) -> list[tuple[int, str]]:
        """The rows of a failed batch that DALI cannot decode on their own, with a reason."""
        from featcache.decode.cpu import decode_failure_reason

        bad = []
        for row in rows:
            path = os.path.join(self.root, self.paths[row])
            if os.path.getsize(path) == 0:
                bad.append((row, "empty file"))
                continue
            try:
                pipe = self._build([row], 1)
                pipe.run()
                del pipe
            except RuntimeError as exc:
                bad.append((row, _dali_reason(exc) or _classify(path) or decode_failure_reason(exc)))
        return bad


def _classify(path: str) -> str | None:
    """Why a file DALI rejected is bad, asked of PIL (DALI's messages name the operator, not the file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
    except UnidentifiedImageError:
        return "not an image"
    except OSError as exc:
        return "truncated image" if "truncated" in str(exc).lower() else None
    return None


def _dali_reason(exc: Exception) -> str | None:
    text = str(exc).lower()
    if "premature end" in text or "truncated" in text or "corrupt" in text:
        return "truncated image"
    if "unrecognized" in text or "not supported" in text or "unsupported" in text or "no decoder" in text:
        return "not an image"
    return None
