"""``--format csv FILE``: any CSV that names image paths and their labels.

Columns (names given by flags):

- ``--path-col`` (default ``path``): the image, relative to ``--root``
  (default: the CSV's folder); paths leaving the root are refused;
- labels, one of:
  ``--label-col`` (default ``label``): one class name per row (single-label),
  or names joined by ``|`` (multi-label: listed names 1, the others 0);
  ``--label-cols A,B,...``: one column per label, 1 / 0 / -1 (uncertain) /
  blank (not mentioned);
- ``--patient-col``: patient ids; without it they come from file names as
  for folders (Kermany names, ``--patient-regex``, else the stem), scoped by split;
- ``--split-col``: train / val / test (also valid, validate, validation);
  without it every row is in split ``all``. A val split smaller than
  ``--min-val`` is folded into train and carved, as for folders; a
  single-label set needs every class in every split, as folders do.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from featcache.data.labels import MULTICLASS, MULTILABEL
from featcache.data.manifest import SPLIT_ORDER, _compile_patient_regex, _patient_id, classes_differ
from featcache.data.sources.base import Listing, register
from featcache.data.sources.table import CsvTable, relative_path
from featcache.errors import UserError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test"}
MULTI_SEPARATOR = "|"


@register("csv", options=("val_fraction", "min_val", "split_seed", "patient_regex", "path_col", "label_col",
                          "label_cols", "patient_col", "split_col", "root"),
          expects="a CSV file of image paths and labels")
def read(data: str | os.PathLike, *, path_col=None, label_col=None, label_cols=None, patient_col=None,
         split_col=None, root=None, patient_regex=None, val_fraction, min_val, split_seed):
    file = Path(data).expanduser()
    if not file.is_file():
        raise UserError(f"label CSV not found: {file}" + (" (a folder: use --format folder)" if file.is_dir() else ""))
    base = Path(root).expanduser() if root else file.parent
    if not base.is_dir():
        raise UserError(f"--root {base} is not a folder")
    base = base.resolve()
    if label_col and label_cols:
        raise UserError("--label-col and --label-cols are alternatives: give one")
    columns = _column_list(label_cols) if label_cols else ()
    label_col = None if columns else (label_col or "label")
    path_col = path_col or "path"
    table = CsvTable(file, [path_col, *(columns or [label_col]), *(c for c in (patient_col, split_col) if c)])
    pattern = _compile_patient_regex(patient_regex)
    listing, sources = Listing(base), Counter()
    for row, cells in table.rows():
        rel = relative_path(cells[path_col], base)
        if rel is None:
            raise table.error(row, path_col, f"path {cells[path_col]!r} is empty or leaves the dataset root {base}")
        split = _split(cells, split_col, table, row)
        if patient_col:
            patient = cells[patient_col]
            if not patient:
                raise table.error(row, patient_col, "no patient id (blank)")
            source = f"column {patient_col}"
        else:
            patient, source = _patient_id(Path(rel).stem, pattern)
        label = table.label_values(row, cells, columns) if columns else _name(cells, label_col, table, row)
        if listing.add(rel, label, split, patient, where=f"{file.name} row {row}",
                       error=lambda message: table.error(row, path_col, message)):
            sources[source] += 1
    options = dict(val_fraction=val_fraction, split_seed=split_seed, min_val=min_val, scope=not patient_col,
                   patient_sources=dict(sources), files=file.name, val_source=f"val rows of column {split_col}",
                   patient_column=patient_col)
    if columns:
        return listing.manifest(layout="csv", classes=columns, task=MULTILABEL, **options)
    return _named_labels(listing, options, table, split_col)


def _column_list(label_cols) -> tuple[str, ...]:
    names = tuple(c.strip() for c in (label_cols.split(",") if isinstance(label_cols, str) else label_cols))
    if not names or not all(names) or len(set(names)) != len(names):
        raise UserError(f"--label-cols takes distinct column names joined by commas, got {label_cols!r}")
    return names


def _split(cells, split_col, table, row) -> str:
    if not split_col:
        return "all"
    value = cells[split_col]
    if value.lower() not in SPLIT_NAMES:
        raise table.error(row, split_col, f"unknown split {value!r} (expected train, val or test)")
    return SPLIT_NAMES[value.lower()]


def _name(cells, column, table, row) -> str:
    value = cells[column]
    names = [n.strip() for n in value.split(MULTI_SEPARATOR)]
    if not value or not all(names):
        raise table.error(row, column, f"no label in {value!r} (expected a class name, or names joined by "
                                       f"{MULTI_SEPARATOR})")
    return value


def _named_labels(listing: Listing, options: dict, table: CsvTable, split_col: str | None):
    """Class names per row: one each is single-label; any ``|``-joined row makes the set multi-label."""
    listing.require_images(options["files"])
    if any(MULTI_SEPARATOR in name for name in listing.labels):
        rows = [{n.strip() for n in name.split(MULTI_SEPARATOR)} for name in listing.labels]
        names = sorted(set().union(*rows))
        listing.labels = [tuple(int(n in r) for n in names) for r in rows]
        return listing.manifest(layout="csv", classes=names, task=MULTILABEL, **options)
    classes = sorted(set(listing.labels))
    if len(classes) < 2:
        raise UserError(f"{options['files']} gives one class ({classes[0]}); classification needs at least two")
    per_split: dict[str, set] = {}
    for split, name in zip(listing.splits, listing.labels):
        per_split.setdefault(split, set()).add(name)
    differ = classes_differ({s: sorted(per_split[s]) for s in sorted(per_split, key=SPLIT_ORDER.get)}, classes)
    if differ:  # as for folders: a class with no training (or no test) image cannot be fitted or scored
        raise UserError(f"{table.path}, column '{split_col}': {differ}")
    index = {c: i for i, c in enumerate(classes)}
    listing.labels = [index[name] for name in listing.labels]
    return listing.manifest(layout="csv", classes=classes, task=MULTICLASS, **options)
