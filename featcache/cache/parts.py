"""Committed progress of an extraction: one small file per chunk of manifest rows.

Rows are grouped in fixed chunks (rows ``[c * S, (c + 1) * S)``). A chunk is
written to a temporary name, flushed, and renamed, so after ``kill -9`` at
any moment every chunk file present is whole and the rerun redoes only the
chunks that are missing. Shards of a distributed run write disjoint chunks
into the same folder; the cache is assembled from it in manifest order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from featcache.options import DEFAULT_CHUNK_ROWS

PARTS_SUFFIX = ".parts"
META = "meta.json"


def parts_dir(cache: str | os.PathLike) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + PARTS_SUFFIX)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ChunkBuffer:
    """The rows of one chunk as they come back from the backbone; with ``views``, the augmented views
    of the rows that have them too (train images), as (views, D) per row."""

    def __init__(self, index: int, start: int, stop: int, feature_dim: int, dtype: str, views: int = 0):
        self.index, self.start, self.stop = index, start, stop
        self.features = np.zeros((stop - start, feature_dim), dtype=dtype)
        self.view_features = np.zeros((stop - start, views, feature_dim), dtype=dtype)
        self.ok = np.zeros(stop - start, dtype=bool)
        self.viewed = np.zeros(stop - start, dtype=bool)
        self.failed: dict[int, str] = {}

    def put(self, row: int, feature: np.ndarray, views: np.ndarray | None = None) -> None:
        self.features[row - self.start] = feature
        self.ok[row - self.start] = True
        if views is not None:
            self.view_features[row - self.start] = views
            self.viewed[row - self.start] = True

    def fail(self, row: int, reason: str) -> None:
        self.failed[row] = reason

    @property
    def complete(self) -> bool:
        return int(self.ok.sum()) + len(self.failed) == self.stop - self.start


class PartStore:
    """The ``CACHE.h5.parts/`` folder of one extraction (one fingerprint)."""

    def __init__(self, cache: str | os.PathLike, *, fingerprint: str, n_rows: int, feature_dim: int, dtype: str,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, views: dict | None = None):
        self.dir = parts_dir(cache)
        self.meta = {"fingerprint": fingerprint, "n_rows": n_rows, "feature_dim": feature_dim, "dtype": dtype,
                     "chunk_rows": chunk_rows, **({"views": views} if views else {})}
        self.views = views["count"] if views else 0
        self.chunk_rows = chunk_rows
        self.n_rows = n_rows
        self.n_chunks = -(-n_rows // chunk_rows)

    def previous_meta(self) -> dict | None:
        """What the folder left by an earlier extraction records about it (None: no readable folder)."""
        try:
            return json.loads((self.dir / META).read_text())
        except (OSError, ValueError):
            return None

    def prepare(self) -> str | None:
        """Create the folder, or keep one left by the same extraction. Says what it discarded, if anything."""
        note = None
        if self.dir.exists():
            old = self.previous_meta()
            if old == self.meta:
                return None
            shutil.rmtree(self.dir)
            note = f"discarded {self.dir.name}: progress of an interrupted run with other inputs"
        self.dir.mkdir(parents=True)
        _atomic_write(self.dir / META, lambda f: f.write(json.dumps(self.meta).encode()))
        return note

    def chunk_file(self, index: int) -> Path:
        return self.dir / f"chunk-{index:07d}.npz"

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_rows
        return start, min(self.n_rows, start + self.chunk_rows)

    def buffer(self, index: int) -> ChunkBuffer:
        return ChunkBuffer(index, *self.chunk_range(index), self.meta["feature_dim"], self.meta["dtype"], self.views)

    def done(self) -> set[int]:
        """Chunks committed by this or an earlier run; unreadable ones are removed to be redone."""
        found = set()
        for path in self.dir.glob("chunk-*.npz"):
            index = int(path.stem.split("-")[1])
            try:
                with np.load(path) as z:
                    rows, failed = z["rows"], z["failed_rows"]
                    start, stop = self.chunk_range(index)
                    whole = len(rows) + len(failed) == stop - start and z["features"].shape[0] == len(rows)
                    if self.views:
                        whole = whole and z["view_features"].shape[:2] == (len(z["view_rows"]), self.views)
            except Exception:
                whole = False
            if whole:
                found.add(index)
            else:
                path.unlink()
        return found

    def save(self, chunk: ChunkBuffer) -> None:
        rows = np.arange(chunk.start, chunk.stop)[chunk.ok]
        failed = sorted(chunk.failed)

        def write(f):
            np.savez(f, features=chunk.features[chunk.ok], rows=rows,
                     failed_rows=np.asarray(failed, dtype=np.int64),
                     failed_reasons=np.asarray([chunk.failed[r] for r in failed], dtype=str),
                     view_rows=np.arange(chunk.start, chunk.stop)[chunk.viewed],
                     view_features=chunk.view_features[chunk.viewed])

        _atomic_write(self.chunk_file(chunk.index), write)

    def failures(self) -> dict[int, str]:
        out = {}
        for index in range(self.n_chunks):
            with np.load(self.chunk_file(index)) as z:
                out.update(zip(z["failed_rows"].tolist(), z["failed_reasons"].tolist()))
        return out

    def feature_blocks(self):
        """Feature rows of every chunk, in manifest order (failed rows left out); then, for each augmented
        view in turn, that view of every row that has views, in manifest order."""
        for index in range(self.n_chunks):
            with np.load(self.chunk_file(index)) as z:
                yield z["features"]
        for view in range(self.views):
            for index in range(self.n_chunks):
                with np.load(self.chunk_file(index)) as z:
                    yield z["view_features"][:, view]

    def view_rows(self) -> np.ndarray:
        """The manifest rows that have augmented views, in manifest order."""
        if not self.views:
            return np.empty(0, np.int64)
        blocks = []
        for index in range(self.n_chunks):
            with np.load(self.chunk_file(index)) as z:
                blocks.append(z["view_rows"])
        return np.concatenate(blocks).astype(np.int64)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
