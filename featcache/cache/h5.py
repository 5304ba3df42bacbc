"""The HDF5 feature cache: schema, fingerprint, writer and reader.

Schema (readable with h5py alone)::

    features  float32 (N, D)     one row per cached image, manifest order
                                 (float16 with --dtype float16)
    labels    int64   (N,)       index into attrs["classes"]
              int8    (N, L)     multi-label sets (attrs["task"] = "multilabel"): the labels as read,
                                 1 / 0 / -1 uncertain / -2 not mentioned, columns named by
                                 attrs["label_names"] (JSON list; no "classes")
    paths     utf-8   (N,)       relative to the data folder
    splits    utf-8   (N,)       train / val / test / all
    patients  utf-8   (N,)       patient id, scoped by split folder
    skipped   utf-8   (K, 2)     path, reason: image files that were not cached
    views     int16   (N,)       only in caches extracted with --aug-views K: 0 for the plain view of every
                                 image (the first rows, manifest order), then views 1..K of each train
                                 image (view 1 of every train image, then view 2, ...); a cache without
                                 it holds plain rows only

    attrs: classes (JSON list), backbone, weights, preprocess (JSON),
    fingerprint, fingerprint_inputs (JSON), complete, rows_written,
    featcache_version, format_version, created, and run facts (decode,
    device, seconds, images/s).

Extraction never writes this file in place: rows are committed to part files
(:mod:`featcache.cache.parts`) and the cache is assembled into
``CACHE.h5.partial``, then renamed into place, so ``CACHE.h5`` is either
absent or complete, and a completed cache is never half-overwritten.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.data.labels import MULTICLASS, MULTILABEL, UNMENTIONED, single_label_only
from featcache.errors import UserError

FORMAT_VERSION = 1
ROW_DATASETS = ("features", "labels", "paths", "splits", "patients")
PARTIAL_SUFFIX = ".partial"
COMPRESSIONS = ("none", "gzip", "lzf")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Aim for chunks of about 1 MiB: large enough for fast sequential reads,
# small enough that reading one row costs little.
CHUNK_BYTES = 1 << 20
# Rows of a string dataset (paths, splits, patients) made into one array and written at a time.
STRING_ROWS = 1 << 15


def fingerprint(inputs: dict) -> str:
    """Hex digest of everything that determines a cache's features."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def describe_difference(old: dict, new: dict) -> str:
    """Name the fingerprint inputs that differ, for a refusal message."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: cache has {_short(old.get(key))}, this run has {_short(new.get(key))}")
    return "; ".join(diffs) or "fingerprint differs"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def looks_like_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def _attr_value(value):
    return value if isinstance(value, (str, int, float, bool)) else json.dumps(value)


def write_cache(
    path: str | os.PathLike,
    *,
    blocks,
    n_rows: int,
    feature_dim: int,
    labels,
    paths,
    splits,
    patients,
    skipped=(),
    attrs: dict,
    dtype: str = "float32",
    compression: str = "none",
    views=None,
) -> Path:
    """Write a complete cache to ``path`` via ``path.partial`` and an atomic rename.

    ``blocks`` yields float arrays of consecutive feature rows (any block
    size), and ``paths``, ``splits`` and ``patients`` may be any iterables of
    ``n_rows`` strings (generators too): both are written a slab at a time, so
    a cache of any size is written with flat memory. ``views`` (a view tag
    per row) is written only when given.
    """
    import h5py

    path = Path(path)
    tmp = partial_path(path)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    strings = h5py.string_dtype("utf-8")
    itemsize = np.dtype(dtype).itemsize
    rows_per_chunk = max(1, min(n_rows, CHUNK_BYTES // (feature_dim * itemsize)))
    extra = {} if compression == "none" else {"compression": compression}
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("features", shape=(n_rows, feature_dim), dtype=dtype,
                              chunks=(rows_per_chunk, feature_dim) if n_rows else None, **extra)
        at, digest = 0, hashlib.sha256()
        for block in blocks:
            block = np.ascontiguousarray(np.asarray(block).astype(dtype, copy=False))
            ds[at : at + len(block)] = block
            digest.update(block.tobytes())
            at += len(block)
        if at != n_rows:
            raise RuntimeError(f"cache assembly wrote {at} rows, expected {n_rows}")
        # The bytes of every feature row as written: bit rot or a hand edit is found, not trusted.
        f.attrs["features_sha256"] = digest.hexdigest()
        labels = np.asarray(labels)
        f.create_dataset("labels", data=labels.astype(np.int8 if labels.ndim == 2 else np.int64))
        for name, values in (("paths", paths), ("splits", splits), ("patients", patients)):
            _write_strings(f, name, values, n_rows)
        if views is not None:
            f.create_dataset("views", data=np.asarray(views, dtype=np.int16))
        f.create_dataset("skipped", data=np.array([list(s) for s in skipped], dtype=object).reshape(-1, 2),
                         dtype=strings)
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)
        f.attrs["featcache_version"] = __version__
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["rows_written"] = n_rows
        f.attrs["complete"] = True
    os.replace(tmp, path)
    return path


def _write_strings(f, name: str, values, n_rows: int) -> None:
    """A 1-D UTF-8 dataset of ``n_rows`` strings from an iterable, converted and written STRING_ROWS at a time."""
    import itertools

    import h5py

    ds = f.create_dataset(name, shape=(n_rows,), dtype=h5py.string_dtype("utf-8"))
    values, at = iter(values), 0
    while slab := list(itertools.islice(values, STRING_ROWS)):
        if at + len(slab) > n_rows:
            break
        ds[at : at + len(slab)] = np.array(slab, dtype=object)
        at += len(slab)
    if at != n_rows or next(values, None) is not None:
        raise RuntimeError(f"cache assembly: dataset '{name}' got a different number of rows than {n_rows}")


class FeatureCache:
    """Read side of a cache: attributes at once, arrays on demand.

    ``handle`` is an h5py file opened lazily once per process (and reopened
    after a fork), so a cache object can be handed to DataLoader workers.
    """

    def __init__(self, path: Path, attrs: dict, n_rows: int):
        self.path = path
        self.attrs = attrs
        self.n_rows = n_rows
        self._handle = None
        self._pid = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, require_complete: bool = True) -> "FeatureCache":
        import h5py

        path = Path(path)
        if not path.exists():
            partial = partial_path(path)
            parts = path.with_name(path.name + ".parts")
            hint = " (an extraction into it did not finish; rerun it to resume)" if partial.exists() or \
                parts.exists() else ""
            raise UserError(f"cache not found: {path}{hint}")
        if path.is_dir():
            raise UserError(f"cache path is a folder, not an HDF5 file: {path}")
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: _attr(v) for k, v in f.attrs.items()}
                missing = [name for name in (*ROW_DATASETS, "skipped") if name not in f]
                n_rows = f["features"].shape[0] if "features" in f else 0
                problem = None if missing else _schema_problem(f, attrs)
        except OSError:
            if looks_like_hdf5(path):
                raise UserError(f"{path} is a damaged HDF5 file (torn or truncated write); "
                                "rerun featcache extract to rebuild it") from None
            raise UserError(f"not an HDF5 file: {path}") from None
        if missing or "fingerprint" not in attrs:
            raise UserError(f"{path} is an HDF5 file but not a featcache cache (missing {', '.join(missing) or 'attrs'})")
        if problem:
            raise UserError(f"{path} is not a usable cache: {problem}")
        if require_complete and not attrs.get("complete"):
            raise UserError(f"{path} is incomplete (extraction did not finish); rerun featcache extract")
        return cls(path, attrs, n_rows)

    def verify(self) -> None:
        """Read every feature row: NaN or Inf, or bytes that differ from those written, are a UserError."""
        ds, digest = self.handle["features"], hashlib.sha256()
        step = max(1, CHUNK_BYTES // max(1, ds.shape[1] * ds.dtype.itemsize))
        for lo in range(0, ds.shape[0], step):
            block = np.ascontiguousarray(ds[lo : lo + step])
            if not np.isfinite(block).all():
                row = lo + int(np.argwhere(~np.isfinite(block))[0][0])
                raise UserError(f"{self.path}: dataset 'features' holds NaN or Inf (row {row}); rerun featcache "
                                "extract with --overwrite")
            digest.update(block.tobytes())
        expected = self.attrs.get("features_sha256")
        if expected and digest.hexdigest() != expected:
            raise UserError(f"{self.path}: dataset 'features' is not what was written (checksum mismatch); rerun "
                            "featcache extract with --overwrite")

    @property
    def task(self) -> str:
        return self.attrs.get("task", MULTICLASS)

    @property
    def label_names(self) -> list[str]:
        """The class names of a single-label cache, the label (column) names of a multi-label one."""
        return json.loads(self.attrs["label_names" if self.task == MULTILABEL else "classes"])

    @property
    def classes(self) -> list[str]:
        """The class names; a multi-label cache is refused here, for code that handles single-label sets only."""
        names = self.label_names
        single_label_only(self.task, str(self.path), len(names))
        return names

    @property
    def fingerprint_inputs(self) -> dict:
        return json.loads(self.attrs.get("fingerprint_inputs", "{}"))

    @property
    def handle(self):
        """This process's read-only h5py handle (opened on first use)."""
        import h5py

        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self):  # an open HDF5 handle must not cross a process boundary
        state = self.__dict__.copy()
        state["_handle"] = state["_pid"] = None
        return state

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def read(self, *names: str, plain: bool = False) -> dict[str, np.ndarray]:
        """Whole datasets by name; strings come back as Python ``str``. ``plain``: the rows of view 0
        only (one per image), leaving out the augmented views of a cache extracted with --aug-views."""
        import h5py

        out = {}
        # the plain rows come first (then each view of the train images): one slice, read from disk alone
        keep = slice(0, int(np.count_nonzero(self.view_tags() == 0))) if plain else slice(None)
        for name in names:
            ds = self.handle[name]
            out[name] = ds.asstr()[keep] if h5py.check_string_dtype(ds.dtype) else ds[keep]
        return out

    @property
    def n_views(self) -> int:
        """Views per train image: 1 (the plain one) plus the augmented views of --aug-views K."""
        return 1 + int(self.fingerprint_inputs.get("views", {}).get("count", 0))

    def view_tags(self) -> np.ndarray:
        """The view of every row (0: plain); all zeros for a cache without augmented views."""
        if "views" not in self.handle:
            return np.zeros(self.n_rows, dtype=np.int16)
        return self.handle["views"][()]

    def split_names(self) -> list[str]:
        present = set(self.read("splits")["splits"].tolist())
        return [s for s in ("train", "val", "test", "all") if s in present]

    def rows(self, split: str, views: bool = False) -> np.ndarray:
        """The rows of ``split``: its plain rows, or with ``views`` every view of them, view-major (as
        :meth:`view_rows` flattened)."""
        if views:
            return self.view_rows(split).ravel()
        return np.flatnonzero((self.read("splits")["splits"] == split) & (self.view_tags() == 0))

    def view_rows(self, split: str) -> np.ndarray:
        """(views, images) rows of ``split``: row [v, i] holds view v of its i-th image (views 1 for a
        split without augmented views)."""
        splits, tags = self.read("splits")["splits"], self.view_tags()
        blocks = [np.flatnonzero((splits == split) & (tags == v)) for v in range(int(tags.max(initial=0)) + 1)]
        blocks = [b for b in blocks if len(b)] or blocks[:1]
        if len(blocks) > 1 and _views_mismatch(blocks, self.read("paths")["paths"]):  # a plain split reads no paths
            raise UserError(f"{self.path}: the augmented views of the {split} split do not match its images "
                            "one for one; rerun featcache extract with --overwrite")
        return np.stack(blocks)

    def arrays(self, split: str, views: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """features (float32), labels and patients of one split, in cache order (``views``: every view of
        each image, view-major, as :meth:`rows`)."""
        f = self.handle
        rows = self.rows(split, views)
        if len(rows) == 0:
            return np.empty((0, f["features"].shape[1]), np.float32), np.empty(0, np.int64), np.empty(0, object)
        lo, hi = rows.min(), rows.max() + 1
        # Splits are contiguous in manifest order (and each view block in it); read one slab then select.
        features = f["features"][lo:hi][rows - lo].astype(np.float32, copy=False)
        labels = f["labels"][lo:hi][rows - lo]
        patients = f["patients"].asstr()[lo:hi][rows - lo]
        return features, labels, patients

    def dataset(self, split: str):
        """A torch ``Dataset`` of (feature, label) rows of ``split``, safe in DataLoader workers."""
        from featcache.cache.dataset import CacheDataset

        return CacheDataset(self, self.rows(split))


def _schema_problem(f, attrs: dict) -> str | None:
    """What makes an HDF5 file with featcache's dataset names unusable, in words naming the dataset."""
    task = attrs.get("task", MULTICLASS)
    if task not in (MULTICLASS, MULTILABEL):
        return f"attribute 'task' is {task!r}, neither {MULTICLASS} nor {MULTILABEL}"
    key, least = ("label_names", 1) if task == MULTILABEL else ("classes", 2)
    try:
        classes = json.loads(attrs.get(key, ""))
    except (TypeError, ValueError):
        return f"attribute '{key}' is not a JSON list of names"
    if not (isinstance(classes, list) and len(classes) >= least and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)):
        return f"attribute '{key}' must list {'two' if least == 2 else 'one'} or more distinct names"
    features = f["features"]
    if features.ndim != 2 or features.dtype.kind != "f":
        return f"dataset 'features' must be 2-D floats (rows x dimensions), found {features.ndim}-D {features.dtype}"
    n = features.shape[0]
    labels = f["labels"]
    if task == MULTILABEL:
        return _multilabel_problem(labels, n, len(classes)) or _row_problem(f, n) or _views_problem(f, n)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        return f"dataset 'labels' must be 1-D integers, found {labels.ndim}-D {labels.dtype}"
    problem = _row_problem(f, n) or _views_problem(f, n)
    if problem:
        return problem
    values = labels[()]
    if len(values) and (values.min() < 0 or values.max() >= len(classes)):
        return f"dataset 'labels' holds {int(values.min())}..{int(values.max())}, outside 0..{len(classes) - 1}"
    return None


def _multilabel_problem(labels, n: int, n_labels: int) -> str | None:
    if labels.ndim != 2 or labels.dtype.kind != "i" or labels.shape != (n, n_labels):
        return (f"dataset 'labels' of a multi-label cache must be ({n}, {n_labels}) integers, found "
                f"{labels.shape} {labels.dtype}")
    values = labels[()]
    if values.size and (values.min() < UNMENTIONED or values.max() > 1):
        return f"dataset 'labels' holds {int(values.min())}..{int(values.max())}, outside -2..1"
    return None


def _row_problem(f, n: int) -> str | None:
    import h5py

    for name in ROW_DATASETS[1:]:
        ds = f[name]
        if ds.ndim != 1 and name != "labels":  # labels: 1-D or (N, L), checked by the caller
            return f"dataset '{name}' must be 1-D, found {ds.ndim}-D"
        if ds.shape[0] != n:
            return f"dataset '{name}' has {ds.shape[0]} rows where 'features' has {n}"
        if name in ("paths", "splits", "patients") and not h5py.check_string_dtype(ds.dtype):
            return f"dataset '{name}' must hold strings, found {ds.dtype}"
    return None


def _views_mismatch(blocks: list[np.ndarray], paths: np.ndarray) -> bool:
    """Whether some view block of a split is not its plain block's images, one for one and in order."""
    return any(len(b) != len(blocks[0]) or (paths[b] != paths[blocks[0]]).any() for b in blocks[1:])


def _views_problem(f, n: int) -> str | None:
    if "views" not in f:
        return None
    views = f["views"]
    if views.ndim != 1 or views.dtype.kind not in "iu" or views.shape[0] != n:
        return f"dataset 'views' must be {n} integers, one per row, found {views.shape} {views.dtype}"
    if n and views[()].min() < 0:
        return "dataset 'views' holds a negative view"
    return None


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
