"""What every label source shares: the registry, the listing of rows as read, views, and the Manifest they make.

A source reads its files into a :class:`Listing` (one ``add`` per listed
image: the path checked against the dataset root and for duplicates, the file
looked at once) and calls :meth:`Listing.manifest`, which carves the
validation split and orders the rows as :func:`featcache.data.manifest.scan`
does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.data.labels import MULTICLASS, MULTILABEL
from featcache.data.manifest import IMAGE_EXTENSIONS, NOT_IMAGE, SPLIT_ORDER, Manifest, stat_skip_reason
from featcache.data.splits import assign_validation, patients_across_splits
from featcache.errors import UserError

MISSING = "listed, but no such file"


@dataclass(frozen=True)
class Source:
    name: str
    read: Callable[..., Manifest]
    options: tuple[str, ...]  # the scan options it takes, beyond DATA
    expects: str  # what DATA is, in words


SOURCES: dict[str, Source] = {}


def register(name: str, *, options: tuple[str, ...], expects: str):
    """Decorator: ``read(data, **options) -> Manifest`` becomes ``--format name``."""
    def add(read):
        if name in SOURCES:
            raise ValueError(f"label source {name!r} is registered twice")
        SOURCES[name] = Source(name, read, options, expects)
        return read

    return add


# View positions as DICOM writes them (NIH "View Position", MIMIC "ViewPosition", CheXpert "AP/PA").
FRONTAL = frozenset({"PA", "AP"})
LATERAL = frozenset({"LATERAL", "LL", "RL"})
VIEW_WORDS = "frontal, lateral, all, or view positions such as PA,AP"


def view_filter(views: str) -> Callable[[str, str], bool]:
    """``keep(kind, position)`` for ``--views``: kind is frontal / lateral / other, position the DICOM one."""
    text = (views or "all").strip()
    if text.lower() == "all":
        return lambda kind, position: True
    if text.lower() in ("frontal", "lateral"):
        wanted = text.lower()
        return lambda kind, position: kind == wanted
    positions = {p.strip().upper() for p in text.split(",") if p.strip()}
    if not positions:
        raise UserError(f"--views takes {VIEW_WORDS}, got {views!r}")
    return lambda kind, position: position.upper() in positions


def view_kind(position: str) -> str:
    position = position.upper()
    return "frontal" if position in FRONTAL else "lateral" if position in LATERAL else "other"


class Listing:
    """The images a source lists, as read: paths relative to ``root``, labels, splits, patients."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: list[str] = []
        self.labels: list = []
        self.splits: list[str] = []
        self.patients: list[str] = []
        self.sizes: list[int] = []
        self.mtimes: list[int] = []
        self.wheres: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.listed = 0
        self.filtered = 0  # rows left out by --views
        self._seen: dict[str, str] = {}

    def add(self, rel: str, label, split: str, patient: str, *, where: str, error: Callable[[str], UserError]) -> bool:
        """One listed image (``where``: its file and row, for messages); False when its file is not usable.

        ``error(message)`` makes the one-line UserError naming the file, row and column.
        """
        if "\0" in rel:  # no file name holds one: the label file is damaged, not an image missing
            raise error(f"path {rel!r} holds a NUL byte, which no file name can")
        if rel in self._seen:
            raise error(f"duplicate path {rel} (also listed at {self._seen[rel]})")
        self._seen[rel] = where
        self.listed += 1
        reason = None
        if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            reason = NOT_IMAGE
        else:
            try:
                st = os.stat(os.path.join(self.root, rel))
            except OSError:
                reason = f"{MISSING} ({where})"
            else:
                reason = stat_skip_reason(st)
        if reason:
            self.skipped.append((rel, reason))
            return False
        self.paths.append(rel)
        self.labels.append(label)
        self.splits.append(split)
        self.patients.append(patient)
        self.wheres.append(where)
        self.sizes.append(st.st_size)
        self.mtimes.append(st.st_mtime_ns)
        return True

    def require_images(self, files: str, views: str = "all") -> None:
        """Refuse a listing none of whose images can be read (the root is wrong, or nothing is downloaded)."""
        if not self.listed and self.filtered:
            raise UserError(f"no images left: {files or 'the label files'} list {self.filtered:,}, and --views "
                            f"{views} keeps none of them")
        if not self.paths:
            example = f" (e.g. {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
            raise UserError(f"no usable images: {files or 'the label files'} list {self.listed:,}, none found "
                            f"under {self.root}{example}")

    def manifest(self, *, layout: str, classes, task: str = MULTICLASS, val_fraction: float, split_seed: int,
                 min_val: int = 0, scope: bool = False, val_source: str = "split column",
                 patient_sources: dict | None = None, files: str = "", views: str = "all",
                 patient_column: str | None = None) -> Manifest:
        """The Manifest of the usable rows: validation carved where there is none, rows in scan's order.

        ``patient_column`` names where patient ids are read, for the refusal of a patient in two splits.
        """
        self.require_images(files, views)
        multilabel = task == MULTILABEL
        labels = np.asarray(self.labels, dtype=np.int8).reshape(len(self.paths), -1) if multilabel else self.labels
        splits, patients, validation = assign_validation(
            self.splits, self.patients, labels, min_val=min_val, fraction=val_fraction, seed=split_seed,
            scope=scope, source=val_source)
        self._check_patients_apart(splits, patients, patient_column)
        order = sorted(range(len(self.paths)), key=(
            (lambda i: (SPLIT_ORDER[splits[i]], self.paths[i])) if multilabel else
            (lambda i: (SPLIT_ORDER[splits[i]], labels[i], self.paths[i]))))
        return Manifest(
            root=str(self.root),
            layout=layout,
            classes=tuple(classes),
            paths=tuple(self.paths[i] for i in order),
            labels=labels[np.asarray(order)] if multilabel else tuple(labels[i] for i in order),
            splits=tuple(splits[i] for i in order),
            patients=tuple(patients[i] for i in order),
            sizes=tuple(self.sizes[i] for i in order),
            mtimes_ns=tuple(self.mtimes[i] for i in order),
            skipped=tuple(sorted(self.skipped)),
            validation=validation,
            patient_sources=patient_sources or {},
            task=task,
        )

    def _check_patients_apart(self, splits: list[str], patients: list[str], column: str | None) -> None:
        """Refuse a patient with images in two of train, val and test: scores on the later ones would leak."""
        crossing = patients_across_splits(splits, patients)
        if crossing is None:
            return
        n, i, j = crossing
        where = f"{self.wheres[i]}, column '{column}'" if column else self.wheres[i]
        raise UserError(f"{where}: patient {patients[i]} is in {splits[i]} here and in {splits[j]} at "
                        f"{self.wheres[j]}; {n:,} patient{'s are' if n > 1 else ' is'} in more than one of train, "
                        "val and test, and a patient's images must all be in one split")
