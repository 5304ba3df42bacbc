"""featcache synth: deterministic, X-ray-like grayscale JPEGs at real chest X-ray sizes.

For throughput work at any scale: full-size Kermany images are 1-3
megapixels and 100 KB to a few MB, which is what decoding has to cope with
(the shared 224-px copy hides that cost). Two classes that differ visibly:
PNEUMONIA images carry bright opacity patches in the lung fields. Names and
patient ids follow Kermany (``personN_bacteria_M.jpeg``,
``IM-NNNN-000K.jpeg``), 1-3 images per patient, so scan's patient grouping is
exercised too. Image ``i`` depends only on (seed, i): any N is reproducible
and a larger set extends a smaller one.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from featcache.errors import UserError
from featcache.runtime.device import cpu_cores

TEST_SHARE = 0.15
PNEUMONIA_SHARE = 0.62
JPEG_QUALITY = 90
SHORT_SIDE = (1000, 1500)  # pixels; with aspect ratios of 1.0-1.3, 1.0-2.9 megapixels


def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid blown up bilinearly."""
    from PIL import Image

    coarse = rng.random((cells, max(2, int(cells * w / h)))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy = ((np.arange(h, dtype=np.float32) - cy) / ry) ** 2
    xx = ((np.arange(w, dtype=np.float32) - cx) / rx) ** 2
    return yy[:, None] + xx[None, :]


def render(seed: int, index: int, pneumonia: bool) -> np.ndarray:
    """One uint8 grayscale chest-X-ray-like image."""
    rng = np.random.default_rng([seed, index])
    short = int(rng.integers(*SHORT_SIDE))
    aspect = rng.uniform(1.0, 1.3)
    h, w = (short, int(short * aspect)) if rng.random() < 0.5 else (int(short * aspect), short)
    body = np.clip(1.2 - _ellipse(h, w, h * 0.55, w * 0.5, h * 0.6, w * 0.48), 0, 1) ** 0.5
    image = 0.25 + 0.45 * body + 0.08 * _smooth_noise(rng, h, w, 6)
    for side in (-1, 1):  # lung fields: dark
        lung = _ellipse(h, w, h * rng.uniform(0.45, 0.52), w * (0.5 + side * rng.uniform(0.18, 0.22)),
                        h * rng.uniform(0.28, 0.34), w * rng.uniform(0.13, 0.17))
        image -= 0.35 * np.clip(1 - lung, 0, 1) ** 0.7
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)
    image += 0.3 * np.exp(-((x - w * 0.5) / (w * 0.035)) ** 2)[None, :]  # spine
    ribs = 0.5 + 0.5 * np.sin(y[:, None] / (h * 0.022) + 2 * np.sin(x[None, :] / (w * 0.25)))
    image += 0.05 * ribs * body
    if pneumonia:  # consolidations: bright, soft-edged patches inside the lungs
        for _ in range(int(rng.integers(2, 5))):
            side = rng.choice([-1, 1])
            patch = _ellipse(h, w, h * rng.uniform(0.35, 0.65), w * (0.5 + side * rng.uniform(0.12, 0.26)),
                             h * rng.uniform(0.05, 0.12), w * rng.uniform(0.04, 0.09))
            image += 0.3 * np.exp(-patch * 1.5)
    image += rng.standard_normal(size=(h, w), dtype=np.float32) * 0.025
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def plan(n: int, seed: int) -> list[tuple[int, str, str, str]]:
    """(index, split, class, file name) for images 0..n-1; patients own 1-3 consecutive images."""
    rng = np.random.default_rng([seed, 2**31 - 1])
    # The first four patients (one image each) put both classes in both splits, whatever n.
    fixed = [("train", False), ("train", True), ("test", False), ("test", True)]
    rows, index, patient = [], 0, 0
    while index < n:
        patient += 1
        if patient <= len(fixed):
            split, pneumonia = fixed[patient - 1]
            count = 1
        else:
            pneumonia = bool(rng.random() < PNEUMONIA_SHARE)
            split = "test" if rng.random() < TEST_SHARE else "train"
            count = int(rng.integers(1, 4))
        for k in range(min(count, n - index)):
            if pneumonia:
                kind = "bacteria" if rng.random() < 0.65 else "virus"
                name = f"person{patient}_{kind}_{index}.jpeg"
            else:
                name = f"IM-{patient:04d}-{k + 1:04d}.jpeg"
            rows.append((index, split, "PNEUMONIA" if pneumonia else "NORMAL", name))
            index += 1
    return rows


def _write(job) -> int:
    from PIL import Image

    out, seed, index, split, cls, name = job
    path = Path(out) / split / cls / name
    if not path.exists():
        tmp = path.with_name(f".{name}.tmp")
        Image.fromarray(render(seed, index, cls == "PNEUMONIA")).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, path)
    return path.stat().st_size


def synth(out: str | os.PathLike, n: int, *, seed: int = 0, workers: int | None = None, progress: bool = True) -> dict:
    """Write ``n`` images under ``out/{train,test}/{NORMAL,PNEUMONIA}/``; existing ones are kept."""
    from featcache.runtime.progress import image_progress

    if n < 4:
        raise UserError(f"--n must be at least 4 (two classes in two splits), got {n}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    rows = plan(n, seed)
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), seed, index, split, cls, name) for index, split, cls, name in rows]
    workers = workers or cpu_cores()
    total = 0
    with ProcessPoolExecutor(workers) as pool, image_progress(n, "synth", enabled=progress) as advance:
        for size in pool.map(_write, jobs, chunksize=4):
            total += size
            advance(1)
    return {"out": str(out), "images": n, "bytes": total}
