"""Helpers shared by the tests: small generated datasets and real-image subsets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data" / "chest_xray_224"))

# One quick fine-tuning recipe on the demo subset: resnet18 random init, 90 train images, one epoch, fp32.
QUICK = dict(weights="none", epochs=1, batch_size=16, max_images=90, amp="off", n_resamples=50, workers=0,
             progress=False)
# The QUICK runs conftest's quick_finetune makes once per session, by name. "full" and "frozen" are about
# keys, files and which weights move: 48 images of every split do (val and test are evaluated twice a run).
QUICK_RUNS = {
    "full": {**QUICK, "max_images": 48, "subsample_all": True},
    "frozen": {**QUICK, "max_images": 48, "subsample_all": True, "freeze_backbone": True},
    # frozen, three epochs with early stopping and a threshold chosen on validation; val and test whole
    "frozen-youden": {**QUICK, "max_images": 48, "epochs": 3, "early_stop": 1, "threshold": "youden",
                      "freeze_backbone": True},
}


def register_tiny(monkeypatch) -> str:
    """Registers the backbone "tiny" until ``monkeypatch`` is undone: a seeded random 8x8/8 convolution and a
    2x2 pool (32-d features), ResNet18's preprocessing."""
    from featcache.backbones import registry

    def load():
        import torch.nn as nn
        from torchvision.models import ResNet18_Weights

        def build(weights=None):
            return nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.AdaptiveAvgPool2d(2), nn.Flatten())

        return build, ResNet18_Weights.IMAGENET1K_V1

    registry.register("tiny", feature_dim=32, strip_head=lambda model: None, head_prefixes=())(load)
    monkeypatch.setitem(registry.REGISTRY, "tiny", registry.REGISTRY.pop("tiny"))  # removed again when undone
    return "tiny"


def flat(text: str) -> str:
    """Console output with every run of whitespace made one space: a phrase matches wherever rich (or a
    narrow terminal, or a longer number earlier in the line) happened to break it."""
    return " ".join(text.split())


def write_image(path: Path, *, size=(40, 48), value: int = 128, mode: str = "L", fmt: str | None = None,
                seed: int = 0) -> Path:
    """A small real image file with some texture, so decoders and backbones see pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    base = np.clip(value + rng.normal(0, 30, size=(h, w)), 0, 255).astype(np.uint8)
    if mode == "RGB":
        array = np.stack([base, np.roll(base, 3, axis=0), np.roll(base, 5, axis=1)], axis=-1)
    else:
        array = base
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, format=fmt)
    return path


def make_dataset(root: Path, layout: dict[str, dict[str, list[str]]], **kwargs) -> Path:
    """``layout``: split -> class -> file names (split "" for the flat layout)."""
    seed = 0
    for split, classes in layout.items():
        for cls, names in classes.items():
            for name in names:
                seed += 1
                value = 90 if cls == sorted(classes)[0] else 170
                write_image(root / split / cls / name, value=value, seed=seed, **kwargs)
    return root


def kermany_names(prefix_normal: str, n_normal_patients: int, n_pneu_patients: int, per_patient: int = 2):
    normal = [f"{prefix_normal}IM-{p:04d}-{k:04d}.jpeg" for p in range(n_normal_patients) for k in range(1, per_patient + 1)]
    pneu = [f"person{p}_{'bacteria' if k % 2 else 'virus'}_{p * 10 + k}.jpeg"
            for p in range(1, n_pneu_patients + 1) for k in range(per_patient)]
    return {"NORMAL": normal, "PNEUMONIA": pneu}


def link_subset(src: Path, dst: Path, per_class: dict[str, dict[str, int]]) -> Path:
    """Symlink every k-th file of ``src/split/class`` into ``dst`` (a real-image subset)."""
    src = src.resolve()
    for split, classes in per_class.items():
        for cls, wanted in classes.items():
            files = sorted(p for p in (src / split / cls).iterdir() if not p.name.startswith("."))
            step = len(files) / wanted
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(wanted):
                f = files[int(i * step)]
                (dst / split / cls / f.name).symlink_to(f)
    return dst


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_awkward_images(folder: Path, seed: int = 0) -> dict[str, str | None]:
    """Images every decoder must cope with, and files none can decode.

    Returns file name -> expected skip reason (None for a good image).
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gray = np.clip(120 + rng.normal(0, 40, size=(300, 260)), 0, 255).astype(np.uint8)
    rgb = np.stack([gray, np.roll(gray, 7, 0), np.roll(gray, 11, 1)], axis=-1)
    Image.fromarray(gray).save(folder / "baseline.jpeg", quality=92)
    Image.fromarray(gray).save(folder / "progressive.jpeg", quality=92, progressive=True)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpeg", quality=92)
    Image.fromarray((gray.astype(np.uint16) * 257)).save(folder / "sixteen_bit.png")
    rgba = np.concatenate([rgb, np.full((300, 260, 1), 200, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(gray).save(folder / "UPPER.JPG", format="JPEG", quality=92)
    Image.fromarray(gray).save(folder / "with spaces in name.jpeg", quality=92)
    data = (folder / "baseline.jpeg").read_bytes()
    (folder / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpeg").write_bytes(b"")
    (folder / "text.jpeg").write_text("not an image at all\n")
    # Hostile files: each must be refused from its header, before any backend allocates for it.
    frames = [Image.fromarray(np.roll(gray, 5 * k, 0)) for k in range(3)]
    frames[0].save(folder / "animated.jpeg", format="GIF", save_all=True, append_images=frames[1:])
    Image.fromarray(np.zeros((1, 8000), np.uint8)).save(folder / "strip.png")
    small_png = folder / "claims_huge.png"
    Image.fromarray(gray[:8, :8]).save(small_png)
    small_png.write_bytes(_claim_png_size(small_png.read_bytes(), 20000, 20000))
    (folder / "claims_huge.jpeg").write_bytes(_claim_jpeg_size(data, 12000, 12000))
    return {
        "animated.jpeg": "GIF data, not JPEG or PNG", "strip.png": "8000 x 1 pixels, a side ratio over 8",
        "claims_huge.png": "more than 64 megapixels",
        "claims_huge.jpeg": "12000 x 12000 pixels, over the 64-megapixel limit",
        "baseline.jpeg": None, "progressive.jpeg": None, "cmyk.jpeg": None, "sixteen_bit.png": None,
        "rgba.png": None, "UPPER.JPG": None, "with spaces in name.jpeg": None,
        "truncated.jpeg": "truncated image", "empty.jpeg": "empty file", "text.jpeg": "not an image",
    }


def _claim_png_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with an IHDR that claims ``width`` x ``height`` (CRC fixed, data unchanged)."""
    import struct
    import zlib

    ihdr = png[16:29]
    ihdr = struct.pack(">II", width, height) + ihdr[8:]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def _claim_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with a frame header (SOF0) that claims ``width`` x ``height``."""
    import struct

    at = jpeg.index(b"\xff\xc0") + 5  # marker (2), length (2), precision (1), then height and width
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4:]


# Label-source fixtures in each public format's exact shape (column names, value encodings, folder
# layouts, gzip), over small generated images. Each returns the folder (or file) to hand to --format.

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def write_csv(path: Path, header: list[str], rows: list[list], *, gz: bool = False) -> Path:
    import csv
    import gzip
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", newline="") as f:
            f.write(text.getvalue())
    else:
        path.write_text(text.getvalue())
    return path


def _cells(rng, n: int, choices=("1.0", "0.0", "-1.0", "")) -> list[str]:
    return [choices[int(k)] for k in rng.integers(0, len(choices), n)]


def make_chexpert(parent: Path, n_train_patients: int = 24, n_valid_patients: int = 4, seed: int = 0) -> Path:
    """``parent/CheXpert-v1.0-small`` with train.csv, valid.csv and
    ``train/patientNNNNN/studyS/viewV_{frontal,lateral}.jpg``: each patient one or two studies, a frontal view
    each and a lateral in some; train labels 1.0 / 0.0 / -1.0 / blank, valid labels 1.0 / 0.0 only."""
    rng = np.random.default_rng(seed)
    folder = parent / "CheXpert-v1.0-small"
    tables = {"train": [], "valid": []}
    patient = 0
    for split, n in (("train", n_train_patients), ("valid", n_valid_patients)):
        choices = ("1.0", "0.0", "-1.0", "") if split == "train" else ("1.0", "0.0")
        for _ in range(n):
            patient += 1
            for study in range(1, 1 + int(rng.integers(1, 3))):
                views = [("frontal", "Frontal", str(rng.choice(["AP", "PA"])))]
                if rng.random() < 0.4:
                    views.append(("lateral", "Lateral", ""))
                for v, (word, kind, position) in enumerate(views, 1):
                    rel = f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study{study}/view{v}_{word}.jpg"
                    write_image(parent / rel, size=(20, 16), seed=patient * 10 + study * 3 + v, fmt="JPEG")
                    tables[split].append([rel, str(rng.choice(["Female", "Male"])), str(int(rng.integers(20, 90))),
                                          kind, position, *_cells(rng, 14, choices)])
    for split, rows in tables.items():
        write_csv(folder / f"{split}.csv", CHEXPERT_HEADER, rows)
    return folder


NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]
NIH_FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def make_nih(folder: Path, n_patients: int = 30, seed: int = 0) -> Path:
    """``folder`` as NIH ChestX-ray14 downloads: Data_Entry_2017.csv (its header's split bracket columns and
    trailing comma included), train_val_list.txt, test_list.txt (patient-wise) and the PNGs spread over
    images_001/images/ and images_002/images/."""
    rng = np.random.default_rng(seed)
    rows, lists = [], {"train_val_list.txt": [], "test_list.txt": []}
    for patient in range(1, n_patients + 1):
        listed = "test_list.txt" if patient % 5 == 0 else "train_val_list.txt"
        for follow_up in range(int(rng.integers(1, 4))):
            name = f"{patient:08d}_{follow_up:03d}.png"
            found = [f for f in NIH_FINDINGS if rng.random() < 0.15]
            home = "images_001" if patient <= n_patients // 2 else "images_002"
            write_image(folder / home / "images" / name, size=(20, 16), seed=patient * 10 + follow_up, fmt="PNG")
            rows.append([name, "|".join(found) or "No Finding", str(follow_up), str(patient),
                         str(int(rng.integers(20, 90))), str(rng.choice(["M", "F"])), str(rng.choice(["PA", "AP"])),
                         "2500", "2048", "0.143", "0.143", ""])
            lists[listed].append(name)
    write_csv(folder / "Data_Entry_2017.csv", NIH_HEADER, rows)
    for name, names in lists.items():
        (folder / name).write_text("".join(n + "\n" for n in names))
    return folder


MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"]
MIMIC_METADATA = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                  "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                  "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]


def make_mimic(folder: Path, n_subjects: int = 20, seed: int = 0) -> Path:
    """``folder`` as MIMIC-CXR-JPG ships: mimic-cxr-2.0.0-{split,chexpert,metadata}.csv.gz and
    files/pNN/pNNNNNNNN/sNNNNNNNN/DICOM_ID.jpg; studies of two or three images (PA or AP, and LATERAL), the
    last subject's studies left out of the chexpert file, as the labeller skipped some."""
    rng = np.random.default_rng(seed)
    splits, labels, metadata = [], [], []
    for k in range(n_subjects):
        subject = 10000032 + k * 1117
        split = "test" if k % 7 == 3 else "validate" if k % 7 == 5 else "train"
        for s in range(int(rng.integers(1, 3))):
            study = 50000000 + k * 101 + s
            if k != n_subjects - 1:
                labels.append([str(subject), str(study), *_cells(rng, 14)])
            for position in ("PA" if rng.random() < 0.5 else "AP", "LATERAL")[: int(rng.integers(1, 3))]:
                dicom = "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, 5))
                write_image(folder / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg",
                            size=(20, 16), seed=int(rng.integers(0, 2**31)), fmt="JPEG")
                splits.append([dicom, str(study), str(subject), split])
                metadata.append([dicom, str(subject), str(study), "CHEST (PA AND LAT)", position, "3056", "2544",
                                 "21800506", "213014.531", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
    write_csv(folder / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], splits, gz=True)
    write_csv(folder / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *MIMIC_LABELS], labels, gz=True)
    write_csv(folder / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA, metadata, gz=True)
    return folder
