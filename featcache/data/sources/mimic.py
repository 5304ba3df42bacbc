"""``--format mimic DIR``: MIMIC-CXR-JPG (Johnson et al., 2019) as PhysioNet ships it.

``DIR`` holds ``mimic-cxr-2.0.0-split.csv`` (``dicom_id``, ``study_id``,
``subject_id``, ``split``: train / validate / test, the official split),
``mimic-cxr-2.0.0-chexpert.csv`` (``subject_id``, ``study_id`` and the 14
CheXpert labels: ``1.0`` / ``0.0`` / ``-1.0`` uncertain / blank not mentioned)
and ``mimic-cxr-2.0.0-metadata.csv`` (``dicom_id``, ``ViewPosition``, ...),
each plain or ``.gz``, and the images at
``files/pNN/pNNNNNNNN/sNNNNNNNN/DICOM_ID.jpg``. A study's labels apply to each
of its images (a study the labeller skipped: every label not mentioned); the
patient is the subject; ``--views`` filters on ``ViewPosition``.
"""

from __future__ import annotations

import os

from featcache.data.labels import MULTILABEL, UNMENTIONED
from featcache.data.sources.base import Listing, register, view_filter, view_kind
from featcache.data.sources.chexpert import OBSERVATIONS
from featcache.data.sources.table import CsvTable, dataset_folder, find_file

PREFIX = "mimic-cxr-2.0.0-"
SPLITS = {"train": "train", "validate": "val", "test": "test"}


@register("mimic", options=("val_fraction", "split_seed", "views"),
          expects="the MIMIC-CXR-JPG folder: mimic-cxr-2.0.0-{split,chexpert,metadata}.csv(.gz) and files/")
def read(data: str | os.PathLike, *, views, val_fraction, split_seed):
    folder = dataset_folder(data, "mimic", "mimic-cxr-2.0.0-*.csv.gz and files/p10/...")
    keep = view_filter(views)
    splits = CsvTable(find_file(folder, (PREFIX + "split.csv",), "MIMIC-CXR split file"),
                      ["dicom_id", "study_id", "subject_id", "split"])
    labels = _study_labels(CsvTable(find_file(folder, (PREFIX + "chexpert.csv",), "MIMIC-CXR label file"),
                                    ["subject_id", "study_id", *OBSERVATIONS]))
    positions = None
    if (views or "all").lower() != "all":
        positions = _view_positions(CsvTable(find_file(folder, (PREFIX + "metadata.csv",), "MIMIC-CXR metadata file"),
                                             ["dicom_id", "ViewPosition"]))
    unlabelled = (UNMENTIONED,) * len(OBSERVATIONS)
    listing = Listing(folder)
    for row, cells in splits.rows():
        dicom, study, subject = cells["dicom_id"], cells["study_id"], cells["subject_id"]
        for column, value in (("dicom_id", dicom), ("study_id", study), ("subject_id", subject)):
            if not value.replace("-", "").isalnum():
                raise splits.error(row, column, f"{value!r} is not an id")
        if cells["split"] not in SPLITS:
            raise splits.error(row, "split", f"unknown split {cells['split']!r} (expected train, validate or test)")
        if positions is not None:
            position = positions.get(dicom, "")
            if not keep(view_kind(position), position):
                listing.filtered += 1
                continue
        rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        listing.add(rel, labels.get((subject, study), unlabelled), SPLITS[cells["split"]], f"p{subject}",
                    where=f"{splits.path.name} row {row}", error=lambda message: splits.error(row, "dicom_id", message))
    return listing.manifest(layout=f"mimic, views {views}", classes=OBSERVATIONS, task=MULTILABEL,
                            val_fraction=val_fraction, split_seed=split_seed, val_source="official validate split",
                            patient_sources={"column subject_id": len(listing.paths)}, files=splits.path.name,
                            views=views, patient_column="subject_id")


def _study_labels(table: CsvTable) -> dict[tuple[str, str], tuple[int, ...]]:
    return {(cells["subject_id"], cells["study_id"]): table.label_values(row, cells, OBSERVATIONS)
            for row, cells in table.rows()}


def _view_positions(table: CsvTable) -> dict[str, str]:
    return {cells["dicom_id"]: cells["ViewPosition"] for _, cells in table.rows()}
