"""``--format chexpert DIR``: CheXpert (Irvin et al., 2019), ``CheXpert-v1.0`` or ``CheXpert-v1.0-small``.

``DIR`` is the dataset folder holding ``train.csv``, ``valid.csv`` and the
images (``train/patient00001/study1/view1_frontal.jpg``). The CSVs' ``Path``
column is relative to the folder holding ``DIR`` and starts with its name
(``CheXpert-v1.0-small/train/...``); paths are kept as written. Labels are the
14 observation columns, ``1.0`` / ``0.0`` / ``-1.0`` (uncertain) / blank (not
mentioned); the patient is the ``patientNNNNN`` part of the path; ``--views``
filters on ``Frontal/Lateral`` and ``AP/PA``. Splits: ``train.csv`` is train
(val carved from it by patient, stratified over the labels) and
``valid.csv`` is **test**, as papers evaluate (the official test set is not public).
"""

from __future__ import annotations

import os
import re

from featcache.data.labels import MULTILABEL
from featcache.data.sources.base import Listing, register, view_filter
from featcache.data.sources.table import CsvTable, dataset_folder, relative_path
from featcache.errors import UserError

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
FILES = (("train.csv", "train"), ("valid.csv", "test"))
PATIENT = re.compile(r"^patient\d+$")


@register("chexpert", options=("val_fraction", "split_seed", "views"),
          expects="the CheXpert-v1.0 or CheXpert-v1.0-small folder: train.csv, valid.csv, train/, valid/")
def read(data: str | os.PathLike, *, views, val_fraction, split_seed):
    folder = dataset_folder(data, "chexpert", "CheXpert-v1.0-small/ with train.csv and valid.csv")
    keep = view_filter(views)
    for name, split in FILES:  # both come in the download; without valid.csv there would be no test split
        if not (folder / name).is_file():
            raise UserError(f"CheXpert label file not found: {folder / name} (the {split} split; the download "
                            f"has both {' and '.join(f for f, _ in FILES)})")
    listing = Listing(folder.parent)
    for name, split in FILES:
        _read_table(CsvTable(folder / name, ["Path", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]), split, folder,
                    keep, listing)
    return listing.manifest(layout=f"chexpert, views {views}", classes=OBSERVATIONS, task=MULTILABEL,
                            val_fraction=val_fraction, split_seed=split_seed,
                            patient_sources={"patientNNNNN path part": len(listing.paths)},
                            files=" and ".join(f for f, _ in FILES), views=views, patient_column="Path")


def _read_table(table: CsvTable, split: str, folder, keep, listing: Listing) -> None:
    for row, cells in table.rows():
        rel = relative_path(cells["Path"], listing.root)
        if rel is None or rel.split("/", 1)[0] != folder.name:
            raise table.error(row, "Path", f"{cells['Path']!r} is not a path inside {folder.name}/ (CheXpert paths "
                                           f"start with the dataset folder's name, e.g. {folder.name}/train/...)")
        patient = next((part for part in rel.split("/") if PATIENT.match(part)), None)
        if patient is None:
            raise table.error(row, "Path", f"{rel} has no patientNNNNN folder")
        labels = table.label_values(row, cells, OBSERVATIONS)
        if not keep(cells["Frontal/Lateral"].lower(), cells["AP/PA"]):
            listing.filtered += 1
            continue
        listing.add(rel, labels, split, patient, where=f"{table.path.name} row {row}",
                    error=lambda message: table.error(row, "Path", message))
