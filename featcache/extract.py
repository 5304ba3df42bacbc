"""decode -> frozen backbone -> HDF5 cache, once per image."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack, contextmanager
import time
from pathlib import Path

import numpy as np

from featcache.runtime.amp import autocast
from featcache.cache.h5 import (
    COMPRESSIONS,
    FORMAT_VERSION,
    FeatureCache,
    describe_difference,
    fingerprint,
    looks_like_hdf5,
    partial_path,
    write_cache,
)
from featcache.runtime.console import get_console, quiet_console
from featcache.errors import UserError
from featcache.options import EXTRACT
from featcache.data.manifest import HIDDEN, IMAGE_EXTENSIONS, SYSTEM
from featcache.cache.parts import PartStore
from featcache.runtime.device import peak_gpu_mb, peak_host_mb, place, resolve_device, synchronizer

# Set by `featcache extract --nproc K` for its torchrun workers: the parent
# process holds the cache lock for them.
PARENT_LOCK_ENV = "FEATCACHE_LOCK_HELD_BY"

FEATURE_DTYPES = ("float32", "float16")


def validate_options(out: Path, backbone: str, dtype: str, compression: str, chunk_rows: int) -> None:
    """Flag checks that need no torch and no data: they fail before anything slow."""
    from featcache.backbones.registry import get_entry

    if dtype not in FEATURE_DTYPES:
        raise UserError(f"unknown feature dtype {dtype!r}; choose one of: {', '.join(FEATURE_DTYPES)}")
    if compression not in COMPRESSIONS:
        raise UserError(f"unknown compression {compression!r}; choose one of: {', '.join(COMPRESSIONS)}")
    if chunk_rows < 1:
        raise UserError(f"--chunk-rows must be at least 1, got {chunk_rows}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out / (backbone + '.h5')}")
    from featcache.cache.lock import lock_path
    from featcache.runtime.outputs import output_file
    from featcache.cache.parts import parts_dir

    output_file(out, suffixes=(".parts", ".partial", ".lock"))
    for beside, kind in ((parts_dir(out), "folder"), (lock_path(out), "file")):
        if beside.exists() and beside.is_dir() != (kind == "folder"):
            raise UserError(f"{beside} is in the way: featcache keeps a {kind} there for {out}; remove it")
    get_entry(backbone)


def views_setting(views: int, augment: str, seed: int) -> dict | None:
    """What ``--aug-views K --augment KIND`` records in the fingerprint (None without views): the count, the
    augmentation by name and by its parameters, and the seed the views are drawn with."""
    import dataclasses

    from featcache.decode.augment import augment_params

    if views < 0:
        raise UserError(f"--aug-views must be 0 or more, got {views}")
    aug = augment_params(augment)
    if views and aug is None:
        raise UserError(f"--aug-views {views} needs --augment light or strong, the augmentation its views are "
                        "made with")
    if aug is not None and not views:
        raise UserError(f"--augment {augment} describes the augmented views of --aug-views K; give --aug-views "
                        "too")
    return {"count": views, "augment": augment, "params": dataclasses.asdict(aug), "seed": seed} if views else None


def fingerprint_inputs(manifest, backbone, decode_mode: str, dtype: str, precision: str | None = None,
                       views: dict | None = None) -> dict:
    """Everything that determines the cached features and their rows, JSON-normalized
    (tuples become lists) so it compares equal to the copy stored in the cache.

    ``precision`` (the autocast dtype) appears only when the forward ran in
    reduced precision, and ``views`` (:func:`views_setting`) only when the
    cache holds augmented views, so fp32 plain caches keep their fingerprint.
    """
    return json.loads(json.dumps({
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "preprocess": backbone.spec.to_dict(),
        "decode": decode_mode,
        "dtype": dtype,
        "classes": list(manifest.classes),
        "manifest": manifest.digest(),
        **({"precision": precision} if precision else {}),
        **({"task": manifest.task} if manifest.multilabel else {}),
        **({"views": views} if views else {}),
    }))


def extract(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str = EXTRACT.backbone,
    weights: str = EXTRACT.weights,
    batch_size: int = EXTRACT.batch_size,
    backend: str = EXTRACT.backend,
    device: str = EXTRACT.device,
    workers: int | None = EXTRACT.workers,
    seed: int = EXTRACT.seed,
    overwrite: bool = EXTRACT.overwrite,
    dtype: str = EXTRACT.dtype,
    compression: str = EXTRACT.compression,
    chunk_rows: int = EXTRACT.chunk_rows,
    wait: bool = EXTRACT.wait,
    max_images: int | None = EXTRACT.max_images,
    subsample_all: bool = EXTRACT.subsample_all,
    hw_decoder_load: float | None = EXTRACT.hw_decoder_load,
    amp: str = EXTRACT.amp,
    aug_views: int = EXTRACT.aug_views,
    augment: str = EXTRACT.augment,
    manifest=None,
    scan_options: dict | None = None,
    progress: bool = EXTRACT.progress,
    dist=None,
) -> dict:
    """Extract features of every manifest row into ``out``; returns a summary.

    Rows are committed in chunks (:mod:`featcache.cache.parts`); rerunning after a
    crash resumes from the chunks already committed. A complete cache with
    the same fingerprint is left alone (``status`` is ``"up to date"``); a
    different one is refused unless ``overwrite``. Under torchrun each rank
    extracts its share of the chunks and rank 0 assembles the cache.

    ``aug_views`` K > 0 adds K views of each train image, augmented by
    ``augment`` from its decoded plain crop and seeded per image and view
    (:func:`featcache.decode.augment.augmented_views`), as extra rows tagged
    ``views`` 1..K after the plain rows; val and test stay plain.
    """
    from featcache.runtime import distributed

    out = Path(out)
    validate_options(out, backbone, dtype, compression, chunk_rows)
    view_setting = views_setting(aug_views, augment, seed)
    if hw_decoder_load is not None and not 0.0 <= hw_decoder_load <= 1.0:
        raise UserError(f"--hw-decoder-load must be between 0 and 1, got {hw_decoder_load}")
    dist = dist or distributed.from_env()
    console = get_console() if dist.is_main else quiet_console()
    with ExitStack() as stack:
        refusal = None
        if dist.is_main:  # first, so a second writer is turned away at once
            try:
                stack.enter_context(cache_lock(out, wait, console))
            except UserError as exc:
                if not dist.active:
                    raise
                refusal = str(exc)
        return _extract_locked(data, out, backbone=backbone, weights=weights, batch_size=batch_size,
                               backend=backend, device=device, workers=workers, seed=seed, overwrite=overwrite,
                               dtype=dtype, compression=compression, chunk_rows=chunk_rows, manifest=manifest,
                               max_images=max_images, subsample_all=subsample_all,
                               hw_decoder_load=hw_decoder_load, amp=amp, scan_options=scan_options,
                               progress=progress, dist=dist, console=console, refusal=refusal,
                               views=view_setting)


def launch(out: str | os.PathLike, *, nproc: int, argv: list[str], manifest, backbone: str = EXTRACT.backbone,
           weights: str = EXTRACT.weights, seed: int = EXTRACT.seed, device: str = EXTRACT.device,
           backend: str = EXTRACT.backend, dtype: str = EXTRACT.dtype, amp: str = EXTRACT.amp,
           wait: bool = EXTRACT.wait, overwrite: bool = EXTRACT.overwrite, aug_views: int = EXTRACT.aug_views,
           augment: str = EXTRACT.augment) -> int:
    """``extract --nproc N``: check everything a user can get wrong here, hold the lock, then start
    N torchrun workers running ``featcache ARGV`` (each extracts its share of the chunks). Exit status."""
    from featcache.backbones.registry import create_backbone
    from featcache.decode import resolve_backend
    from featcache.runtime import distributed

    console = get_console()
    out = Path(out)
    bb = create_backbone(backbone, weights, seed=seed)
    device = resolve_device(device)
    decode = resolve_backend(backend, device, previous_decode(out))
    inputs = fingerprint_inputs(manifest, bb, decode.mode, dtype, resolve_inference_amp(amp, device)[1],
                                views_setting(aug_views, augment, seed))
    with cache_lock(out, wait, console):
        if _existing_cache_matches(out, fingerprint(inputs), inputs, overwrite, console):
            console.print(f"[green]{out} is complete and up to date[/]; nothing to do")
            return 0
        console.print(f"launching {nproc} extraction processes with torchrun")
        os.environ[PARENT_LOCK_ENV] = str(os.getpid())
        try:
            return distributed.launch(nproc, distributed.strip_nproc(argv))
        finally:
            os.environ.pop(PARENT_LOCK_ENV, None)


def _extract_locked(data, out: Path, *, backbone, weights, batch_size, backend, device, workers, seed, overwrite,
                    dtype, compression, chunk_rows, manifest, max_images, subsample_all, hw_decoder_load, amp,
                    scan_options, progress, dist, console, refusal, views=None):
    from featcache.backbones.registry import create_backbone
    from featcache.decode import resolve_backend
    from featcache.data.sources import read_manifest

    device = resolve_device(device)
    if device == "cuda" and dist.active:
        device = f"cuda:{dist.local_rank}"
    if manifest is None:
        manifest = read_manifest(data, **(scan_options or {}))
    manifest = manifest.limit(max_images, seed, subsample_all=subsample_all)
    bb = create_backbone(backbone, weights, seed=seed)
    decode = resolve_backend(backend, device, previous=previous_decode(out))
    amp_dtype, precision, amp_words = resolve_inference_amp(amp, device)
    inputs = fingerprint_inputs(manifest, bb, decode.mode, dtype, precision, views)
    fp = fingerprint(inputs)
    if len(set(dist.gather(fp))) > 1:
        raise UserError("the ranks of this run see different inputs (data, weights or flags differ between nodes)")
    store = PartStore(out, fingerprint=fp, n_rows=len(manifest), feature_dim=bb.feature_dim, dtype=dtype,
                      chunk_rows=chunk_rows, views=_parts_views(views))
    summary = {"out": str(out), "backbone": bb.name, "weights": bb.weights, "rows_expected": len(manifest),
               "fingerprint": fp}

    decision = dist.decide(lambda: _decide(out, fp, inputs, overwrite, store, console), refusal=refusal)
    if decision == "up to date":
        console.print(f"[green]{out} is complete and up to date[/] (same fingerprint {fp[:12]}); nothing to do")
        return {**summary, "status": "up to date"}
    tone = "bold yellow" if bb.ref.is_random else "bold"
    console.print(f"backbone [bold]{bb.name}[/] ({bb.feature_dim}-d), weights: [{tone}]{bb.weights_note}[/]")
    console.print(f"decode: [bold]{decode.mode}[/] ({decode.reason}); device: [bold]{device}[/]; "
                  f"precision: {amp_words}" + (f"; {dist.world} processes" if dist.active else ""))
    if views:
        console.print(f"views: the plain one and [bold]{views['count']}[/] augmented ({views['augment']}) of each "
                      "train image; val and test plain")
    start = time.perf_counter()
    timing = _extract_chunks(bb, manifest, store, dist, decode=decode, device=device,
                             hw_decoder_load=hw_decoder_load, batch_size=batch_size, workers=workers,
                             progress=progress, console=console, amp_dtype=amp_dtype, views=views)
    timings = dist.gather(timing)
    dist.barrier()
    seconds = time.perf_counter() - start
    images = sum(t["images"] for t in timings)
    summary.update(status="written", seconds=seconds, images_per_second=images / seconds if seconds else 0.0,
                   images=images, view_images=sum(t["view_images"] for t in timings), resumed_rows=sum(t["resumed_rows"] for t in timings), processes=dist.world,
                   forward_seconds=timing["forward_seconds"], stages=timing["stages"])
    if dist.is_main:
        attrs = _cache_attrs(manifest, bb, weights, seed, fp, inputs, decode, device)
        attrs["extract"] = {k: summary[k] for k in ("seconds", "images", "view_images", "images_per_second",
                                                    "processes", "resumed_rows")}
        attrs["extract"]["peak_memory_mb"] = peak_host_mb()
        attrs["extract"]["batch_size"] = batch_size
        if device.startswith("cuda"):  # host RSS above, the GPU's own peak here: never mixed in one figure
            attrs["extract"]["peak_gpu_mb"] = peak_gpu_mb(device)
        t0 = time.perf_counter()
        summary.update(_assemble(out, store, manifest, bb.feature_dim, attrs, dtype, compression))
        summary["stages"] = {**summary["stages"], "assemble": time.perf_counter() - t0}
        _print_summary(console, summary)
    dist.barrier()
    return summary


@contextmanager
def cache_lock(out: Path, wait: bool, console):
    """Hold the cache's write lock (None when a ``--nproc`` parent holds it for this worker)."""
    from featcache.cache.lock import CacheLock

    if os.environ.get(PARENT_LOCK_ENV):
        yield None
        return
    with CacheLock(out, wait=wait, on_wait=lambda holder: console.print(
            f"[yellow]waiting[/] for {holder} to finish with {out.name}")) as lock:
        if lock.stale_holder:
            console.print(f"[yellow]cleared a stale lock[/] on {out.name} left by {lock.stale_holder}, "
                          "which is no longer running")
        yield lock


def _decide(out: Path, fp: str, inputs: dict, overwrite: bool, store: PartStore, console) -> str:
    """Under the lock: "up to date", or "go" with the part folder ready (resumed or fresh)."""
    if _existing_cache_matches(out, fp, inputs, overwrite, console):
        if store.dir.exists():  # left by a run killed between its rename and its clean-up
            console.print(f"[yellow]removing {store.dir.name}[/], parts of the cache already assembled")
            store.remove()
        return "up to date"
    _refuse_other_views(store, overwrite)
    note = store.prepare()
    if note:
        console.print(f"[yellow]{note}[/]")
    if partial_path(out).exists():
        console.print(f"[yellow]discarding {partial_path(out).name}[/], an assembly cut short; "
                      "it is rebuilt from the committed parts")
        partial_path(out).unlink()
    done = store.done()
    if done:
        rows = sum(store.chunk_range(c)[1] - store.chunk_range(c)[0] for c in done)
        console.print(f"[bold]resuming[/]: {len(done)} of {store.n_chunks} chunks ({rows:,} of {store.n_rows:,} rows) "
                      "were committed by an interrupted run")
    return "go"


def _parts_views(views: dict | None) -> dict | None:
    """What the part folder records of the views: a resume with other views is refused, not silently redone."""
    return {"count": views["count"], "augment": views["augment"]} if views else None


def _views_words(views: dict | None) -> str:
    return f"--aug-views {views['count']} --augment {views['augment']}" if views else "no augmented views"


def _refuse_other_views(store: PartStore, overwrite: bool) -> None:
    """An interrupted extraction with other views is not thrown away unasked: K views cost K extractions."""
    old = store.previous_meta()
    if overwrite or old is None or old.get("views") == store.meta.get("views"):
        return
    raise UserError(f"{store.dir} holds an interrupted extraction with {_views_words(old.get('views'))}, this run "
                    f"asks for {_views_words(store.meta.get('views'))}; rerun with its flags to resume it, or pass "
                    "--overwrite to discard it")


def _existing_cache_matches(out: Path, fp: str, inputs: dict, overwrite: bool, console) -> bool:
    if overwrite or not out.exists():
        return False
    try:
        existing = FeatureCache.open(out, require_complete=False)
    except UserError:
        if looks_like_hdf5(out):
            # Our own files only ever appear complete (rename), so this is a
            # cache damaged after the fact: never used, rebuilt.
            console.print(f"[yellow]{out} is a damaged HDF5 file (torn or truncated); rebuilding it[/]")
            return False
        raise UserError(f"{out} exists and is not a featcache cache; pass --overwrite to replace it") from None
    if existing.attrs.get("fingerprint") == fp and existing.attrs.get("complete"):
        try:
            existing.verify()
        except UserError as exc:  # bytes changed after the fact: never trusted, rebuilt
            console.print(f"[yellow]{exc}[/]; rebuilding it")
            return False
        finally:
            existing.close()
        return True
    raise UserError(
        f"{out} holds a different cache ({describe_difference(existing.fingerprint_inputs, inputs)}); "
        f"pass --overwrite to replace it or choose another --out"
    )


def resolve_inference_amp(amp: str, device: str):
    """(autocast dtype or None, its name for the fingerprint or None, words) for extraction."""
    from featcache.runtime.amp import precision_name, resolve_amp

    dtype, _, words = resolve_amp(amp, device)
    if dtype is None:
        return None, None, "fp32"
    return dtype, precision_name(dtype), words.replace(" with loss scaling", "")


def previous_decode(out: Path) -> str | None:
    """The decode mode of the cache already at ``out``, if there is a readable one."""
    try:
        return FeatureCache.open(out, require_complete=False).fingerprint_inputs.get("decode")
    except UserError:
        return None


def _cache_attrs(manifest, bb, weights, seed, fp, inputs, decode, device) -> dict:
    labels = ({"task": manifest.task, "label_names": list(manifest.classes)} if manifest.multilabel else
              {"classes": list(manifest.classes)})
    return {
        **labels,
        "backbone": bb.name,
        "weights": bb.weights,
        "weights_note": bb.weights_note,
        # Lets predict rebuild this backbone; the fingerprint uses the file's hash, not this path.
        "weights_source": bb.ref.source,
        "preprocess": bb.spec.to_dict(),
        "fingerprint": fp,
        "fingerprint_inputs": inputs,
        "feature_dim": bb.feature_dim,
        # Read by fit-head's cost table, which then needs no torchvision import of its own.
        "backbone_parameters": sum(p.numel() for p in bb.model.parameters()),
        "seed": seed,
        "data_root": manifest.root,
        "layout": manifest.layout,
        "validation": manifest.validation,
        "label_rules": [list(r) for r in manifest.label_rules],
        "decode": {"backend": decode.name, "mode": decode.mode, "reason": decode.reason, "device": device},
    }


def _extract_chunks(bb, manifest, store: PartStore, dist, *, decode, device, batch_size, workers, progress,
                    console, hw_decoder_load=None, amp_dtype=None, views=None) -> dict:
    """This rank's missing chunks (every world-th chunk, from its rank on), committed one by one.

    With ``views``, each train image's augmented views are made from its decoded plain crop (one decode
    per image) and go through the backbone with the plain crops, ``batch_size`` images at a time.
    """
    import torch

    from featcache.decode import make_loader
    from featcache.runtime.progress import image_progress

    mine = [c for c in range(store.n_chunks) if c % dist.world == dist.rank]
    done = store.done()
    pending = [c for c in mine if c not in done]
    resumed = sum(store.chunk_range(c)[1] - store.chunk_range(c)[0] for c in mine if c in done)
    rows = np.concatenate([np.arange(*store.chunk_range(c)) for c in pending]) if pending else np.empty(0, np.int64)
    model, layout = place(bb.model.for_inference(), device)
    loader = make_loader(manifest, bb.spec, backend=decode.name, batch_size=batch_size, workers=workers,
                         pin_memory=device.startswith("cuda"), rows=rows, device=device,
                         hw_decoder_load=hw_decoder_load)
    # A chunk's buffer exists from its first row to its commit: the chunks in flight, never all N rows.
    buffers = {}
    # Where the time goes: waiting for decoded batches, host-to-device copy, forward, committing rows.
    stage = {"decode_wait": 0.0, "host_to_device": 0.0, "forward": 0.0, "cache_write": 0.0}
    if views:
        stage["augment"] = 0.0
    make_views = _view_maker(manifest, views)
    images = view_images = 0
    sync = synchronizer(device)
    start = time.perf_counter()
    with image_progress(len(rows), "extract", enabled=progress and dist.is_main) as advance, torch.inference_mode():
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            stage["decode_wait"] += t1 - t0
            if batch is None:
                break
            for row, reason in batch.failed:
                _buffer(buffers, store, row).fail(row, reason)
            if len(batch.indices):
                x = batch.images.to(device, non_blocking=True)
                sync()
                t2 = time.perf_counter()
                viewed, extra = make_views(batch.indices, x)
                t_aug = time.perf_counter()
                with autocast(device, amp_dtype):  # a plain batch goes through as it is, with no copy
                    parts = [model(part.contiguous(memory_format=layout)).float().cpu()
                             for part in (torch.cat([x, extra]).split(batch_size) if len(extra) else [x])]
                    feats = (torch.cat(parts) if len(parts) > 1 else parts[0]).numpy()
                t3 = time.perf_counter()
                stage["host_to_device"] += t2 - t1
                stage["forward"] += t3 - t_aug
                if views:
                    stage["augment"] += t_aug - t2
                _put_rows(buffers, store, batch.indices, feats, viewed)
                images += len(batch.indices)
                view_images += len(extra)
            t4 = time.perf_counter()
            for c in sorted({int(r) // store.chunk_rows for r in (*batch.indices, *(r for r, _ in batch.failed))}):
                if buffers[c].complete:
                    store.save(buffers.pop(c))
            stage["cache_write"] += time.perf_counter() - t4
            advance(len(batch.indices) + len(batch.failed))
    if buffers:
        raise RuntimeError(f"chunks never completed: {sorted(buffers)[:5]}")
    return {"seconds": time.perf_counter() - start, "forward_seconds": stage["forward"], "images": images,
            "view_images": view_images, "resumed_rows": resumed, "stages": stage}


def _view_maker(manifest, views: dict | None):
    """``make(indices, images) -> (positions in the batch that have views, their views view-major)``:
    the train images of a batch get ``views["count"]`` augmented views, the others none."""
    from featcache.decode.augment import augment_params, augmented_views, torchvision_transform

    if not views:
        return lambda indices, images: ([], images[:0])
    transform = torchvision_transform(augment_params(views["augment"]))
    train = np.asarray(manifest.splits) == "train"

    def make(indices, images):
        viewed = [i for i, row in enumerate(indices.tolist()) if train[row]]
        keys = [manifest.paths[int(indices[i])] for i in viewed]
        return viewed, augmented_views(images[viewed], keys, views["count"], transform, views["seed"])

    return make


def _put_rows(buffers: dict, store: PartStore, indices: np.ndarray, feats: np.ndarray, viewed: list[int]) -> None:
    """The plain features of a batch's rows (the first ``len(indices)`` of ``feats``) and, for the rows at
    ``viewed``, their views (the rest, view-major) into the rows' chunk buffers."""
    n = len(indices)
    extra = feats[n:].reshape(-1, len(viewed), feats.shape[1]) if viewed else None
    of = {i: j for j, i in enumerate(viewed)}
    for i, (row, feat) in enumerate(zip(indices.tolist(), feats[:n])):
        _buffer(buffers, store, row).put(row, feat, None if i not in of else extra[:, of[i]])


def _buffer(buffers: dict, store: PartStore, row: int):
    """The buffer of the chunk holding ``row``, made when its first row arrives."""
    chunk = row // store.chunk_rows
    if chunk not in buffers:
        buffers[chunk] = store.buffer(chunk)
    return buffers[chunk]


def _check_space(out: Path, needed: int) -> None:
    """Refuse to assemble into a disk without room for the cache (the parts stay for the resume).

    A full disk in the middle of an HDF5 write can crash the process and leave a
    ``.partial`` that fills the disk; the bytes needed are known, so ask first.
    """
    import shutil

    free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    if free < needed * 1.05 + 2**20:
        raise UserError(f"not enough disk space to assemble {out}: {free / 2**20:,.0f} MB free, about "
                        f"{needed / 2**20:,.0f} MB needed; the extracted parts are kept, free some space and "
                        "rerun the same command to finish")


def _assemble(out: Path, store: PartStore, manifest, feature_dim: int, attrs: dict, dtype: str,
              compression: str) -> dict:
    """Every chunk, in manifest order, into the one cache file; then the parts go."""
    missing = sorted(set(range(store.n_chunks)) - store.done())
    if missing:
        raise RuntimeError(f"cannot assemble {out}: chunks {missing[:5]} were never committed")
    failed = store.failures()
    kept = np.ones(len(manifest), dtype=bool)
    kept[list(failed)] = False
    plain = np.flatnonzero(kept)
    viewed = store.view_rows()
    # The plain rows in manifest order, then each augmented view of the rows that have them.
    keep = np.concatenate([plain, np.tile(viewed, store.views)]).astype(np.int64)
    tags = np.repeat(np.arange(store.views + 1, dtype=np.int16), [len(plain)] + [len(viewed)] * store.views)
    _check_space(out, len(keep) * feature_dim * np.dtype(dtype).itemsize + len(keep) * 400)
    skipped = [(manifest.paths[i], reason) for i, reason in sorted(failed.items())]
    # Image files the scan could not take (a name that is not UTF-8, a pipe, an oversized file) are
    # image files not cached too; non-images and junk stay in the manifest's own list.
    skipped += [(path, reason) for path, reason in manifest.skipped
                if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS and not path.endswith("/")
                and reason not in (HIDDEN, SYSTEM)]
    write_cache(
        out,
        blocks=store.feature_blocks(),
        n_rows=len(keep),
        feature_dim=feature_dim,
        labels=np.asarray(manifest.labels)[keep],
        # Generators: the string columns are written a slab at a time, never copied whole.
        paths=(manifest.paths[i] for i in keep),
        splits=(manifest.splits[i] for i in keep),
        patients=(manifest.patients[i] for i in keep),
        skipped=skipped,
        attrs=attrs,
        dtype=dtype,
        compression=compression,
        views=tags if store.views else None,
    )
    store.remove()
    return {"rows": len(keep), "view_rows": len(viewed) * store.views, "skipped": [list(s) for s in skipped]}


def _print_summary(console, summary: dict) -> None:
    skipped = summary["skipped"]
    resumed = f", {summary['resumed_rows']:,} resumed from earlier" if summary.get("resumed_rows") else ""
    viewed = (f" ({summary['view_rows']:,} of them augmented views of train images)"
              if summary.get("view_rows") else "")
    console.print(
        f"wrote [bold]{summary['rows']:,}[/] rows to {summary['out']}{viewed}: {summary['images']:,} images in "
        f"{summary['seconds']:.1f} s ([bold]{summary['images_per_second']:.1f}[/] images/s){resumed}; "
        f"skipped {len(skipped)} image file{'s' if len(skipped) != 1 else ''} (could not be read or decoded)"
    )
    for path, reason in skipped[:10]:
        console.print(f"  [yellow]skipped[/] {path}: {reason}")
    if len(skipped) > 10:
        console.print(f"  ... and {len(skipped) - 10} more (see the cache's 'skipped' dataset)")
