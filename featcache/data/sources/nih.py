"""``--format nih DIR``: NIH ChestX-ray14 (Wang et al., 2017) as downloaded.

``DIR`` holds ``Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``) with
the columns ``Image Index`` (``00000001_000.png``), ``Finding Labels`` (the
findings joined by ``|``, or ``No Finding``), ``Patient ID`` and ``View
Position`` (PA / AP); the images under ``images/`` or the ``images_0NN/images/``
folders of the download; and the official split, ``train_val_list.txt``
(train; val is carved from it by patient) and ``test_list.txt`` (test).
Labels are the 14 findings, 1 or 0 (the set has no uncertain labels).
"""

from __future__ import annotations

import os

from featcache.data.labels import MULTILABEL
from featcache.data.sources.base import Listing, register, view_filter, view_kind
from featcache.data.sources.table import CsvTable, dataset_folder, find_file, read_list
from featcache.errors import UserError

ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_FILES = (("train_val_list.txt", "train"), ("test_list.txt", "test"))
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
            "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
NO_FINDING = "No Finding"
COLUMNS = {"image": "Image Index", "findings": "Finding Labels", "patient": "Patient ID", "view": "View Position"}


@register("nih", options=("val_fraction", "split_seed", "views"),
          expects="the NIH ChestX-ray14 folder: Data_Entry_2017.csv, images*/, train_val_list.txt, test_list.txt")
def read(data: str | os.PathLike, *, views, val_fraction, split_seed):
    folder = dataset_folder(data, "nih", "Data_Entry_2017.csv, images_0NN/images/, the split lists")
    keep = view_filter(views)
    entries = CsvTable(find_file(folder, ENTRY_FILES, "NIH label file"), list(COLUMNS.values()))
    split_of = _official_split(folder)
    images = _image_index(folder)
    listing, named = Listing(folder), set()
    index = {name: j for j, name in enumerate(FINDINGS)}
    for row, cells in entries.rows():
        name = cells[COLUMNS["image"]]
        named.add(name)
        if name not in split_of:
            raise entries.error(row, COLUMNS["image"], f"{name} is in neither {' nor '.join(f for f, _ in SPLIT_FILES)}")
        labels = _findings(cells[COLUMNS["findings"]], index, entries, row)
        patient = cells[COLUMNS["patient"]]
        if not patient:
            raise entries.error(row, COLUMNS["patient"], "no patient id (blank)")
        position = cells[COLUMNS["view"]]
        if not keep(view_kind(position), position):
            listing.filtered += 1
            continue
        rel = images.get(name, f"images/{name}")
        listing.add(rel, labels, split_of[name][0], patient, where=f"{entries.path.name} row {row}",
                    error=lambda message: entries.error(row, COLUMNS["image"], message))
    for name, (_, file, line) in split_of.items():
        if name not in named:
            raise UserError(f"{folder / file}, row {line}: {name} is not an image of {entries.path.name}")
    return listing.manifest(layout=f"nih, views {views}", classes=FINDINGS, task=MULTILABEL,
                            val_fraction=val_fraction, split_seed=split_seed,
                            patient_sources={"column Patient ID": len(listing.paths)}, files=entries.path.name,
                            views=views, patient_column=COLUMNS["patient"])


def _official_split(folder) -> dict[str, tuple[str, str, int]]:
    """image name -> (split, list file, row) from train_val_list.txt and test_list.txt."""
    split_of: dict[str, tuple[str, str, int]] = {}
    for file, split in SPLIT_FILES:
        path = find_file(folder, (file,), "NIH split list")
        for line, name in read_list(path):
            if name in split_of:
                _, other, other_line = split_of[name]
                raise UserError(f"{path}, row {line}: {name} is listed already ({other} row {other_line})")
            split_of[name] = (split, path.name, line)
    return split_of


def _image_index(folder) -> dict[str, str]:
    """image name -> path relative to ``folder``, from images/ and images_0NN/images/ (listed once)."""
    found: dict[str, str] = {}
    homes = [folder / "images"] + sorted(p / "images" for p in folder.glob("images_*") if p.is_dir())
    for home in homes:
        if not home.is_dir():
            continue
        with os.scandir(home) as entries:
            for entry in entries:
                found.setdefault(entry.name, f"{home.relative_to(folder).as_posix()}/{entry.name}")
    return found


def _findings(text: str, index: dict[str, int], table, row) -> tuple[int, ...]:
    values = [0] * len(index)
    for name in (n.strip() for n in text.split("|")):
        if name == NO_FINDING:
            continue
        if name not in index:
            raise table.error(row, COLUMNS["findings"], f"unknown label value {name!r} (expected {NO_FINDING} or "
                                                        f"findings among {', '.join(index)}, joined by |)")
        values[index[name]] = 1
    return tuple(values)
