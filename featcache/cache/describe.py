"""featcache inspect: what a cache holds, or how far an extraction into it got."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featcache.cache.h5 import FeatureCache, partial_path
from featcache.data.labels import MULTILABEL, VALUE_NAMES, tally
from featcache.errors import UserError
from featcache.cache.parts import META, parts_dir


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def describe(path: str | os.PathLike) -> dict:
    """A JSON-ready description of a cache, or of the progress of an extraction into it."""
    path = Path(path)
    parts = parts_dir(path)
    if not path.exists() and parts.is_dir():
        return _describe_progress(path, parts)
    cache = FeatureCache.open(path, require_complete=False)
    cache.verify()
    a = cache.attrs
    classes = cache.label_names
    data = {**cache.read("labels", "splits", plain=True), **cache.read("skipped")}  # images, not their views
    rows, labelled = {}, {}
    for split in cache.split_names():
        if cache.task == MULTILABEL:
            rows[split] = int((data["splits"] == split).sum())
            continue
        counts = np.bincount(data["labels"][data["splits"] == split], minlength=len(classes))
        rows[split] = dict(zip(classes, counts.tolist()))
    if cache.task == MULTILABEL:
        labelled = {"task": MULTILABEL, "label_names": classes,
                    "labels_per_split": tally(data["labels"], data["splits"], classes)}
    with_h5 = cache.handle
    info = {
        "path": str(path),
        "state": "complete" if a.get("complete") else "incomplete",
        "backbone": a.get("backbone"),
        "weights": a.get("weights"),
        "weights_note": a.get("weights_note"),
        "feature_dim": int(with_h5["features"].shape[1]),
        "dtype": str(with_h5["features"].dtype),
        "compression": with_h5["features"].compression or "none",
        "rows": cache.n_rows,
        "views": cache.fingerprint_inputs.get("views"),
        "rows_per_split": rows,
        **(labelled or {"classes": classes}),
        "skipped": data["skipped"].tolist(),
        "preprocess": json.loads(a.get("preprocess", "{}")),
        "decode": json.loads(a.get("decode", "{}")),
        "extract": json.loads(a.get("extract", "{}")),
        "fingerprint": a.get("fingerprint"),
        "created": a.get("created"),
        "featcache_version": a.get("featcache_version"),
        "size_bytes": _size(path),
        "data_root": a.get("data_root"),
    }
    cache.close()
    if parts.is_dir():
        info["note"] = f"{parts.name} also exists: an extraction into this path is running or was interrupted"
    return info


def _describe_progress(path: Path, parts: Path) -> dict:
    try:
        meta = json.loads((parts / META).read_text())
    except (OSError, ValueError):
        raise UserError(f"{parts} holds no readable progress; rerun featcache extract") from None
    n_chunks = -(-meta["n_rows"] // meta["chunk_rows"])
    done = len(list(parts.glob("chunk-*.npz")))
    rows_done = min(meta["n_rows"], done * meta["chunk_rows"])
    from featcache.cache.lock import lock_path

    lock = lock_path(path)
    return {
        "path": str(path),
        "state": "in progress or interrupted",
        "chunks_committed": done,
        "chunks": n_chunks,
        "rows_committed_at_least": rows_done if done < n_chunks else meta["n_rows"],
        "rows": meta["n_rows"],
        "feature_dim": meta["feature_dim"],
        "dtype": meta["dtype"],
        "fingerprint": meta["fingerprint"],
        "size_bytes": _size(parts) + _size(partial_path(path)),
        "lock": lock.read_text().strip() if lock.exists() else "",
    }


def render(info: dict) -> list:
    from rich.table import Table

    if info["state"] != "complete" and "chunks" in info:
        holder = f"; lock held: {info['lock']}" if info.get("lock") else ""
        return [f"[bold]{info['path']}[/]: [yellow]{info['state']}[/] - {info['chunks_committed']} of "
                f"{info['chunks']} chunks committed (at least {info['rows_committed_at_least']:,} of "
                f"{info['rows']:,} rows){holder}. Rerun the same extract command to resume."]
    head = Table(show_header=False, title=info["path"], title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    extract = info.get("extract") or {}
    for key, value in (
        ("state", info["state"]),
        ("backbone", f"{info['backbone']} ({info['feature_dim']}-d, {info['dtype']}, compression "
                     f"{info['compression']})"),
        ("weights", info.get("weights_note") or info["weights"]),
        ("preprocess", ", ".join(f"{k} {v}" for k, v in info["preprocess"].items())),
        ("decode", f"{info['decode'].get('backend')} on {info['decode'].get('device')}"),
        ("rows", f"{info['rows']:,}"),
        ("views", f"the plain one and {info['views']['count']} augmented ({info['views']['augment']}) per train "
                  "image; val and test plain" if info.get("views") else "plain only"),
        ("skipped", f"{len(info['skipped'])} files"),
        ("extraction", f"{extract.get('seconds', 0):.1f} s, {extract.get('images_per_second', 0):.1f} images/s, "
                       f"{extract.get('processes', 1)} process(es)" if extract else "-"),
        ("size on disk", f"{info['size_bytes'] / 1e6:.1f} MB"),
        ("created", f"{info['created']} by featcache {info['featcache_version']}"),
        ("fingerprint", info["fingerprint"]),
        ("data", info.get("data_root") or "-"),
    ):
        head.add_row(key, str(value))
    if info.get("task") == MULTILABEL:
        return [head, *_label_tables(info), *_notes(info)]
    splits = Table(title="rows per split and class", title_justify="left")
    splits.add_column("split")
    for cls in info["classes"]:
        splits.add_column(cls, justify="right")
    splits.add_column("total", justify="right")
    for split, counts in info["rows_per_split"].items():
        splits.add_row(split, *(f"{counts[c]:,}" for c in info["classes"]), f"{sum(counts.values()):,}")
    return [head, splits, *_notes(info)]


def _notes(info: dict) -> list[str]:
    out = [f"  [yellow]skipped[/] {p}: {reason}" for p, reason in info["skipped"][:10]]
    if info.get("note"):
        out.append(f"[yellow]{info['note']}[/]")
    return out


def _label_tables(info: dict) -> list:
    """A multi-label cache: per split, each label's positive, negative, uncertain and unmentioned images."""
    from rich.table import Table

    tables = []
    for split, per_label in info["labels_per_split"].items():
        table = Table(title=f"{split}: {info['rows_per_split'][split]:,} images, labels as read",
                      title_justify="left")
        table.add_column("label")
        for word in VALUE_NAMES.values():
            table.add_column(word, justify="right")
        for name, counts in per_label.items():
            table.add_row(name, *(f"{counts[word]:,}" for word in VALUE_NAMES.values()))
        tables.append(table)
    return tables
