"""decode -> frozen backbone -> HDF5 cache, once per image."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from featcache.cache import FORMAT_VERSION, CacheWriter, FeatureCache, describe_difference, fingerprint, partial_path
from featcache.console import get_console
from featcache.errors import UserError

FEATURE_DTYPES = ("float32", "float16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible to PyTorch; use --device cpu")
    return device


def fingerprint_inputs(manifest, backbone, backend: str, dtype: str) -> dict:
    """Everything that determines the cached features and their rows, JSON-normalized
    (tuples become lists) so it compares equal to the copy stored in the cache."""
    return json.loads(json.dumps({
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "preprocess": backbone.spec.to_dict(),
        "decode": backend,
        "dtype": dtype,
        "classes": list(manifest.classes),
        "manifest": manifest.digest(),
    }))


def extract(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str = "resnet18",
    weights: str = "none",
    batch_size: int = 32,
    backend: str = "auto",
    device: str = "auto",
    workers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "float32",
    manifest=None,
    scan_options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Extract features of every manifest row into ``out``; returns a summary.

    A complete cache with the same fingerprint is left alone (``status`` is
    ``"up to date"``); a different one is refused unless ``overwrite``.
    """
    import torch

    from featcache.backbones import create_backbone, get_entry
    from featcache.decode import make_loader, resolve_backend
    from featcache.manifest import scan

    console = get_console()
    out = Path(out)
    if dtype not in FEATURE_DTYPES:
        raise UserError(f"unknown feature dtype {dtype!r}; choose one of: {', '.join(FEATURE_DTYPES)}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out / (backbone + '.h5')}")
    get_entry(backbone)  # an unknown name fails before the folder walk
    device = resolve_device(device)
    backend_name, backend_reason = resolve_backend(backend, device)
    if manifest is None:
        manifest = scan(data, seed=seed, **(scan_options or {}))
    bb = create_backbone(backbone, weights, seed=seed)
    inputs = fingerprint_inputs(manifest, bb, backend_name, dtype)
    fp = fingerprint(inputs)

    summary = {"out": str(out), "backbone": bb.name, "weights": bb.weights, "rows_expected": len(manifest)}
    if _existing_cache_matches(out, fp, inputs, overwrite):
        console.print(f"[green]{out} is complete and up to date[/] (same fingerprint {fp[:12]}); nothing to do")
        return {**summary, "status": "up to date", "fingerprint": fp}
    if partial_path(out).exists():
        console.print(f"[yellow]discarding {partial_path(out).name}[/], left by an interrupted run")

    tone = "bold yellow" if weights == "none" else "bold"
    console.print(f"backbone [bold]{bb.name}[/] ({bb.feature_dim}-d), weights: [{tone}]{bb.weights_note}[/]")
    console.print(f"decode: [bold]{backend_name}[/] ({backend_reason}); device: [bold]{device}[/]")

    model = bb.model.to(device, memory_format=torch.channels_last)
    loader = make_loader(
        manifest, bb.spec, backend=backend_name, batch_size=batch_size, workers=workers, pin_memory=device == "cuda"
    )
    attrs = {
        "classes": list(manifest.classes),
        "backbone": bb.name,
        "weights": bb.weights,
        "weights_note": bb.weights_note,
        # Lets predict rebuild this backbone; the fingerprint uses the file's hash, not this path.
        "weights_source": weights if weights in ("imagenet", "none") else str(Path(weights).resolve()),
        "preprocess": bb.spec.to_dict(),
        "fingerprint": fp,
        "fingerprint_inputs": inputs,
        "feature_dim": bb.feature_dim,
        "seed": seed,
        "data_root": manifest.root,
        "validation": manifest.validation,
        "decode": {"backend": backend_name, "reason": backend_reason, "device": device},
    }
    writer = CacheWriter(out, manifest, feature_dim=bb.feature_dim, attrs=attrs, dtype=dtype)
    try:
        timing = _run(model, loader, writer, device, dtype, progress, len(manifest))
        result = writer.finish({"extract": timing})
    except BaseException:
        writer.abort()
        raise
    rate = timing["images"] / timing["seconds"] if timing["seconds"] else 0.0
    summary.update(status="written", fingerprint=fp, rows=result["rows"], skipped=result["skipped"],
                   seconds=timing["seconds"], images_per_second=rate, forward_seconds=timing["forward_seconds"])
    _print_summary(console, summary)
    return summary


def _existing_cache_matches(out: Path, fp: str, inputs: dict, overwrite: bool) -> bool:
    if overwrite or not out.exists():
        return False
    try:
        existing = FeatureCache.open(out, require_complete=False)
    except UserError:
        raise UserError(f"{out} exists and is not a featcache cache; pass --overwrite to replace it") from None
    if existing.attrs.get("fingerprint") == fp and existing.attrs.get("complete"):
        return True
    raise UserError(
        f"{out} holds a different cache ({describe_difference(existing.fingerprint_inputs, inputs)}); "
        f"pass --overwrite to replace it or choose another --out"
    )


def _run(model, loader, writer, device: str, dtype: str, show_progress: bool, total: int) -> dict:
    import torch

    from featcache.progress import image_progress

    forward_seconds = 0.0
    images = 0
    start = time.perf_counter()
    with image_progress(total, "extract", enabled=show_progress) as advance, torch.inference_mode():
        for batch in loader:
            for row, reason in batch.failed:
                writer.fail(row, reason)
            if len(batch.indices):
                t0 = time.perf_counter()
                x = batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                feats = model(x).float().cpu().numpy()
                forward_seconds += time.perf_counter() - t0
                writer.write(batch.indices, feats.astype(dtype, copy=False))
                images += len(batch.indices)
            advance(len(batch.indices) + len(batch.failed))
    return {"seconds": time.perf_counter() - start, "forward_seconds": forward_seconds, "images": images}


def _print_summary(console, summary: dict) -> None:
    skipped = summary["skipped"]
    console.print(
        f"wrote [bold]{summary['rows']}[/] rows to {summary['out']} in {summary['seconds']:.1f} s "
        f"([bold]{summary['images_per_second']:.1f}[/] images/s); "
        f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} that could not be decoded"
    )
    for path, reason in skipped[:10]:
        console.print(f"  [yellow]skipped[/] {path}: {reason}")
    if len(skipped) > 10:
        console.print(f"  ... and {len(skipped) - 10} more (see the cache's 'skipped' dataset)")
