"""The HDF5 feature cache: schema, fingerprint, writer and reader.

Schema (readable with h5py alone)::

    features  float32 (N, D)     one row per cached image, manifest order
    labels    int64   (N,)       index into attrs["classes"]
    paths     utf-8   (N,)       relative to the data folder
    splits    utf-8   (N,)       train / val / test / all
    patients  utf-8   (N,)       patient id, scoped by split folder
    skipped   utf-8   (K, 2)     path, reason: image files that were not cached

    attrs: classes (JSON list), backbone, weights, preprocess (JSON),
    fingerprint, fingerprint_inputs (JSON), complete, featcache_version,
    created, and run facts (decode, device, seconds, images/s).

A cache is written to ``CACHE.h5.partial`` and renamed into place only when
every row is in, so ``CACHE.h5`` is either absent or complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.errors import UserError

FORMAT_VERSION = 1
ROW_DATASETS = ("features", "labels", "paths", "splits", "patients")
PARTIAL_SUFFIX = ".partial"
# Aim for chunks of about 1 MiB: large enough for fast sequential reads,
# small enough that a partial last chunk costs little.
CHUNK_BYTES = 1 << 20


def fingerprint(inputs: dict) -> str:
    """Hex digest of everything that determines a cache's features."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def describe_difference(old: dict, new: dict) -> str:
    """Name the fingerprint inputs that differ, for a refusal message."""
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        if old.get(key) != new.get(key):
            a, b = _short(old.get(key)), _short(new.get(key))
            diffs.append(f"{key}: cache has {a}, this run has {b}")
    return "; ".join(diffs) or "fingerprint differs"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def _string_dtype():
    import h5py

    return h5py.string_dtype("utf-8")


class CacheWriter:
    """Write one cache: rows by manifest index, failures compacted away at the end.

    Rows are stored at their manifest index while extraction runs, so batch
    order, padding and sharding cannot misplace them; ``finish`` removes the
    rows of undecodable files, sets ``complete`` and renames the file into place.
    """

    def __init__(self, out: str | os.PathLike, manifest, *, feature_dim: int, attrs: dict, dtype: str = "float32"):
        import h5py

        self.out = Path(out)
        self.partial = partial_path(self.out)
        self.n = len(manifest)
        self.written = np.zeros(self.n, dtype=bool)
        self.failed: dict[int, str] = {}
        self.manifest = manifest
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.partial, "w")
        try:
            self._create(feature_dim, attrs, dtype)
        except BaseException:
            self.file.close()
            raise

    def _create(self, dim: int, attrs: dict, dtype: str) -> None:
        f, m, n = self.file, self.manifest, self.n
        itemsize = np.dtype(dtype).itemsize
        rows_per_chunk = max(1, min(n, CHUNK_BYTES // (dim * itemsize)))
        f.create_dataset("features", shape=(n, dim), dtype=dtype, maxshape=(None, dim), chunks=(rows_per_chunk, dim))
        f.create_dataset("labels", data=np.asarray(m.labels, dtype=np.int64), maxshape=(None,), chunks=True)
        for name, values in (("paths", m.paths), ("splits", m.splits), ("patients", m.patients)):
            f.create_dataset(name, data=list(values), dtype=_string_dtype(), maxshape=(None,), chunks=True)
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
        f.attrs["featcache_version"] = __version__
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["complete"] = False

    def write(self, indices: np.ndarray, features: np.ndarray) -> None:
        """Store ``features[i]`` at manifest row ``indices[i]``; each row exactly once."""
        if len(indices) == 0:
            return
        indices = np.asarray(indices, dtype=np.int64)
        if self.written[indices].any():
            raise RuntimeError(f"rows written twice: {indices[self.written[indices]][:5].tolist()}")
        order = np.argsort(indices, kind="stable")
        indices, features = indices[order], features[order]
        ds = self.file["features"]
        start, stop = int(indices[0]), int(indices[-1]) + 1
        if stop - start == len(indices):  # the usual case: one contiguous slab
            ds[start:stop] = features
        else:
            ds[indices] = features
        self.written[indices] = True

    def fail(self, index: int, reason: str) -> None:
        if self.written[index] or index in self.failed:
            raise RuntimeError(f"row {index} reported twice")
        self.failed[int(index)] = reason

    def finish(self, extra_attrs: dict | None = None) -> dict:
        """Check every row is accounted for, drop failed rows, mark complete, move into place."""
        missing = np.flatnonzero(~self.written)
        missing = [int(i) for i in missing if int(i) not in self.failed]
        if missing:
            raise RuntimeError(f"{len(missing)} rows were never written, e.g. {missing[:5]}")
        f = self.file
        if self.failed:
            _drop_rows(f, sorted(self.failed))
        skipped = [[self.manifest.paths[i], reason] for i, reason in sorted(self.failed.items())]
        f.create_dataset(
            "skipped", data=np.array(skipped, dtype=object).reshape(-1, 2), dtype=_string_dtype()
        )
        for key, value in (extra_attrs or {}).items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
        f.attrs["rows_written"] = int(f["features"].shape[0])
        f.attrs["complete"] = True
        f.flush()
        f.close()
        os.replace(self.partial, self.out)
        return {"rows": self.n - len(self.failed), "skipped": skipped}

    def abort(self) -> None:
        """Close without completing; the partial file stays for inspection."""
        if self.file:
            self.file.close()


def _drop_rows(f, drop: list[int], block: int = 4096) -> None:
    """Remove rows ``drop`` from every row dataset, in place, keeping order.

    Rows only ever move to lower positions and each block is read before it
    is written over, so the copy is safe in a single file.
    """
    n = f["labels"].shape[0]
    keep = np.ones(n, dtype=bool)
    keep[drop] = False
    first = drop[0]
    for name in ROW_DATASETS:
        ds = f[name]
        write_at = first
        for start in range(first, n, block):
            stop = min(n, start + block)
            kept = keep[start:stop]
            if kept.any():
                values = ds[start:stop][kept]
                ds[write_at : write_at + len(values)] = values
                write_at += len(values)
        ds.resize(write_at, axis=0)


class FeatureCache:
    """Read side of a cache: attributes at once, arrays on demand."""

    def __init__(self, path: Path, attrs: dict, n_rows: int):
        self.path = path
        self.attrs = attrs
        self.n_rows = n_rows

    @classmethod
    def open(cls, path: str | os.PathLike, *, require_complete: bool = True) -> "FeatureCache":
        import h5py

        path = Path(path)
        if not path.exists():
            partial = partial_path(path)
            hint = f" ({partial.name} exists: the extraction did not finish; rerun it)" if partial.exists() else ""
            raise UserError(f"cache not found: {path}{hint}")
        if path.is_dir():
            raise UserError(f"cache path is a folder, not an HDF5 file: {path}")
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: _attr(v) for k, v in f.attrs.items()}
                missing = [name for name in (*ROW_DATASETS, "skipped") if name not in f]
                n_rows = f["features"].shape[0] if "features" in f else 0
        except OSError:
            raise UserError(f"not an HDF5 file: {path}") from None
        if missing or "fingerprint" not in attrs:
            raise UserError(f"{path} is an HDF5 file but not a featcache cache (missing {', '.join(missing) or 'attrs'})")
        if require_complete and not attrs.get("complete"):
            raise UserError(f"{path} is incomplete (extraction did not finish); rerun featcache extract")
        return cls(path, attrs, n_rows)

    @property
    def classes(self) -> list[str]:
        return json.loads(self.attrs["classes"])

    @property
    def fingerprint_inputs(self) -> dict:
        return json.loads(self.attrs.get("fingerprint_inputs", "{}"))

    def read(self, *names: str) -> dict[str, np.ndarray]:
        """Whole datasets by name; strings come back as Python ``str``."""
        import h5py

        out = {}
        with h5py.File(self.path, "r") as f:
            for name in names:
                ds = f[name]
                out[name] = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]
        return out

    def split_names(self) -> list[str]:
        present = set(self.read("splits")["splits"].tolist())
        return [s for s in ("train", "val", "test", "all") if s in present]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """features (float32), labels and patients of one split, in cache order."""
        import h5py

        with h5py.File(self.path, "r") as f:
            splits = f["splits"].asstr()[()]
            rows = np.flatnonzero(splits == split)
            if len(rows) == 0:
                return (np.empty((0, f["features"].shape[1]), np.float32), np.empty(0, np.int64), np.empty(0, object))
            lo, hi = rows[0], rows[-1] + 1
            # Splits are contiguous in manifest order; read one slab then select.
            features = f["features"][lo:hi][rows - lo].astype(np.float32, copy=False)
            labels = f["labels"][lo:hi][rows - lo]
            patients = f["patients"].asstr()[lo:hi][rows - lo]
        return features, labels, patients


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
