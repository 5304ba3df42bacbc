"""Label sources (--format folder | csv | nih | chexpert | mimic): rows, labels as read, patients, splits,
views, the carved validation split, multi-label caches, and bad input as one line naming file, row and column."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cache.h5 import FeatureCache
from featcache.cli import main
from featcache.data.demo import DEMO_DATA
from featcache.data.sources import SOURCES, read_manifest, register
from featcache.data.splits import iterative_stratification
from featcache.errors import UserError
from featcache.fit import fit_head
from helpers import CHEXPERT_HEADER, MIMIC_LABELS, flat, make_chexpert, make_mimic, make_nih, write_csv, write_image


def _kermany_csv(path: Path, data: Path = DEMO_DATA) -> Path:
    """A CSV of a folder's images: path (relative to the folder), class name and split, in shuffled order."""
    rows = sorted((p.relative_to(data).as_posix() for p in data.rglob("*.jpeg") if not p.name.startswith(".")),
                  key=lambda p: p[::-1])
    return write_csv(path, ["path", "label", "split"], [[p, p.split("/")[1], p.split("/")[0]] for p in rows])


def _one_line_error(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_csv_gives_the_folder_manifest(tmp_path):
    folder = read_manifest(DEMO_DATA)
    table = read_manifest(_kermany_csv(tmp_path / "kermany.csv"), format="csv", root=str(DEMO_DATA),
                          split_col="split")
    assert table.layout == "csv" and table.task == folder.task == "multiclass"
    for name in ("classes", "paths", "labels", "splits", "patients", "sizes", "mtimes_ns", "validation",
                 "patient_sources"):
        assert getattr(table, name) == getattr(folder, name), name
    assert table.digest() == folder.digest()


def test_csv_gives_the_folder_manifest_on_the_whole_shared_set(tmp_path, shared_data):
    folder = read_manifest(shared_data)
    table = read_manifest(_kermany_csv(tmp_path / "kermany.csv", shared_data), format="csv", root=str(shared_data),
                          split_col="split")
    assert len(table) == 5840 and table.validation == folder.validation
    assert table.digest() == folder.digest() and table.patients == folder.patients


def test_csv_extract_and_fit_head_match_the_folder(tmp_path, tiny_backbone):
    """Kermany through --format csv: the same cache rows and the same fit-head metrics as --format folder."""
    common = ["--backbone", tiny_backbone, "--weights", "none", "--batch-size", "50", "--workers", "0",
              "--no-progress"]
    csv_file = _kermany_csv(tmp_path / "labels" / "kermany.csv")
    assert main(["extract", str(DEMO_DATA), "--out", str(tmp_path / "folder.h5"), *common]) == 0
    assert main(["extract", str(csv_file), "--format", "csv", "--root", str(DEMO_DATA), "--split-col", "split",
                 "--out", str(tmp_path / "csv.h5"), *common]) == 0
    with h5py.File(tmp_path / "folder.h5") as a, h5py.File(tmp_path / "csv.h5") as b:
        assert set(a) == set(b)
        for name in ("paths", "labels", "splits", "patients", "features"):
            assert np.array_equal(a[name][()], b[name][()]), name
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"] and a.attrs["classes"] == b.attrs["classes"]
        assert a.attrs["layout"] == "splits" and b.attrs["layout"] == "csv"
    metrics = [fit_head(tmp_path / f"{kind}.h5", tmp_path / f"run-{kind}", n_resamples=20)
               for kind in ("folder", "csv")]
    for split in ("val", "test"):
        for key in ("n", "auroc", "accuracy", "sensitivity", "specificity"):
            assert metrics[0][split][key] == metrics[1][split][key], (split, key)
    assert metrics[0]["val"]["n"] == 45 and metrics[0]["test"]["n"] == 100


def test_csv_label_columns_and_joined_names(tmp_path):
    for i in range(6):
        write_image(tmp_path / "img" / f"pt{i // 2}-{i}.png", size=(20, 16), seed=i)
    cols = write_csv(tmp_path / "cols.csv", ["file", "Edema", "Mass", "who", "part"],
                     [[f"img/pt{i // 2}-{i}.png", v, w, f"p{i // 2}", s] for i, (v, w, s) in
                      enumerate([("1", "0", "train"), ("0.0", "", "train"), ("-1", "1.0", "valid"),
                                 ("", "-1.0", "valid"), ("1.0", "0", "test"), ("0", "1", "test")])])
    m = read_manifest(cols, format="csv", path_col="file", label_cols="Edema,Mass", patient_col="who",
                      split_col="part", min_val=0)
    assert m.task == "multilabel" and m.classes == ("Edema", "Mass")
    assert m.labels.dtype == np.int8 and m.labels.tolist() == [[1, 0], [0, -2], [-1, 1], [-2, -1], [1, 0], [0, 1]]
    assert m.splits == ("train", "train", "val", "val", "test", "test")
    assert m.validation == {"source": "val rows of column part", "images": 2}
    assert m.patients == ("p0", "p0", "p1", "p1", "p2", "p2")  # a patient column is read as is, not scoped
    joined = write_csv(tmp_path / "joined.csv", ["path", "label"],
                       [[f"img/pt{i // 2}-{i}.png", n] for i, n in
                        enumerate(["Edema", "Edema|Mass", "Mass", "Nodule", "Mass | Nodule", "Edema"])])
    m = read_manifest(joined, format="csv", patient_regex=r"^(pt\d+)-")
    assert m.task == "multilabel" and m.classes == ("Edema", "Mass", "Nodule") and set(m.splits) == {"all"}
    assert m.labels.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 0]]
    assert m.patients[:3] == ("all/pt0", "all/pt0", "all/pt1")


def test_chexpert_rows_labels_patients_splits_views(tmp_path):
    folder = make_chexpert(tmp_path)
    m = read_manifest(folder, format="chexpert", split_seed=3)
    train = list(csv.DictReader((folder / "train.csv").open()))
    valid = list(csv.DictReader((folder / "valid.csv").open()))
    assert len(m) == len(train) + len(valid) and Path(m.root) == tmp_path
    assert m.task == "multilabel" and m.classes == tuple(CHEXPERT_HEADER[5:])
    encode = {"1.0": 1, "0.0": 0, "-1.0": -1, "": -2}
    row_of = {p: i for i, p in enumerate(m.paths)}
    for source, splits in ((train, {"train", "val"}), (valid, {"test"})):
        for r in source:
            i = row_of[r["Path"]]
            assert m.labels[i].tolist() == [encode[r[c]] for c in CHEXPERT_HEADER[5:]]
            assert m.patients[i] == r["Path"].split("/")[2] and m.splits[i] in splits
    assert set(np.unique(m.labels)) == {-2, -1, 0, 1}
    patients = {s: {p for p, t in zip(m.patients, m.splits) if t == s} for s in ("train", "val", "test")}
    assert patients["val"] and not patients["train"] & patients["val"]
    assert m.validation["source"] == "carved from train" and m.validation["seed"] == 3
    frontal = read_manifest(folder, format="chexpert", views="frontal")
    assert len(frontal) == sum(r["Frontal/Lateral"] == "Frontal" for r in train + valid) < len(m)
    assert all(p.endswith("_frontal.jpg") for p in frontal.paths)
    pa = read_manifest(folder, format="chexpert", views="PA")
    assert len(pa) == sum(r["AP/PA"] == "PA" for r in train + valid)


def test_nih_rows_labels_patients_splits_views(tmp_path):
    folder = make_nih(tmp_path / "nih")
    (folder / "Data_Entry_2017.csv").rename(folder / "Data_Entry_2017_v2020.csv")
    m = read_manifest(folder, format="nih")
    entries = {r["Image Index"]: r for r in csv.DictReader((folder / "Data_Entry_2017_v2020.csv").open())}
    test = set((folder / "test_list.txt").read_text().split())
    assert len(m) == len(entries) and m.task == "multilabel" and len(m.classes) == 14
    assert {p.split("/")[0] for p in m.paths} == {"images_001", "images_002"}
    for i, path in enumerate(m.paths):
        name = path.rsplit("/", 1)[1]
        assert path == f"images_00{1 if int(name[:8]) <= 15 else 2}/images/{name}"
        found = set(entries[name]["Finding Labels"].split("|")) - {"No Finding"}
        assert {c for c, v in zip(m.classes, m.labels[i]) if v == 1} == found
        assert set(m.labels[i].tolist()) <= {0, 1}
        assert m.patients[i] == entries[name]["Patient ID"]
        assert (m.splits[i] == "test") == (name in test)
    assert "val" in m.splits and not set(m.patients[k] for k in m.indices("val")) & set(
        m.patients[k] for k in m.indices("train"))
    pa = read_manifest(folder, format="nih", views="PA")
    assert len(pa) == sum(r["View Position"] == "PA" for r in entries.values())
    with pytest.raises(UserError, match="--views takes"):
        read_manifest(folder, format="nih", views=",")


def test_mimic_rows_labels_patients_splits_views(tmp_path):
    folder = make_mimic(tmp_path / "mimic-cxr-jpg")
    m = read_manifest(folder, format="mimic")

    def table(name):
        with gzip.open(folder / f"mimic-cxr-2.0.0-{name}.csv.gz", "rt") as f:
            return list(csv.DictReader(f))

    splits, meta = table("split"), {r["dicom_id"]: r for r in table("metadata")}
    labels = {(r["subject_id"], r["study_id"]): r for r in table("chexpert")}
    encode = {"1.0": 1, "0.0": 0, "-1.0": -1, "": -2}
    assert len(m) == len(splits) and m.classes == tuple(CHEXPERT_HEADER[5:])
    row_of = {p: i for i, p in enumerate(m.paths)}
    unlabelled = 0
    for r in splits:
        i = row_of[f"files/p{r['subject_id'][:2]}/p{r['subject_id']}/s{r['study_id']}/{r['dicom_id']}.jpg"]
        assert m.patients[i] == "p" + r["subject_id"]
        assert m.splits[i] == {"train": "train", "validate": "val", "test": "test"}[r["split"]]
        study = labels.get((r["subject_id"], r["study_id"]))
        expected = [encode[study[c]] for c in m.classes] if study else [-2] * 14
        unlabelled += study is None
        assert m.labels[i].tolist() == expected
    assert unlabelled and set(MIMIC_LABELS) == set(m.classes)
    assert m.validation == {"source": "official validate split", "images": sum(r["split"] == "validate"
                                                                               for r in splits)}
    frontal = read_manifest(folder, format="mimic", views="frontal")
    assert len(frontal) == sum(meta[r["dicom_id"]]["ViewPosition"] in ("PA", "AP") for r in splits) < len(m)


def test_iterative_stratification_keeps_every_label_share_and_patients_whole():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 3000)
    groups = np.repeat([f"patient{k:05d}" for k in range(3000)], sizes)
    labels = (rng.random((len(groups), 14)) < rng.uniform(0.01, 0.4, 14)).astype(np.int8)
    labels[rng.random(labels.shape) < 0.1] = -1
    val = iterative_stratification(groups, labels, fraction=0.2, seed=0)
    inside = np.isin(groups, sorted(val))
    assert abs(inside.mean() - 0.2) < 0.01
    shares = ((labels == 1) & inside[:, None]).sum(0) / (labels == 1).sum(0)
    assert np.all(np.abs(shares - 0.2) < 0.02), shares
    assert val == iterative_stratification(groups, labels, fraction=0.2, seed=0)
    assert val != iterative_stratification(groups, labels, fraction=0.2, seed=1)
    assert len(iterative_stratification(["a", "a", "b"], np.zeros((3, 2), np.int8), fraction=0.1, seed=0)) == 1


def test_multilabel_cache_stores_labels_as_read(tmp_path, tiny_backbone, capsys):
    folder = make_chexpert(tmp_path)
    (folder / "train" / "patient00002").rename(tmp_path / "moved")  # listed images whose files are gone
    broken = "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg"
    (tmp_path / broken).write_text("not an image\n")  # listed, present, undecodable
    out = tmp_path / "cx.h5"
    assert main(["extract", str(folder), "--format", "chexpert", "--out", str(out), "--backbone", tiny_backbone,
                 "--weights", "none", "--workers", "0", "--no-progress"]) == 0
    m = read_manifest(folder, format="chexpert")
    gone = [p for p, reason in m.skipped if "patient00002" in p and "no such file" in reason]
    assert gone and all("train.csv row" in reason for _, reason in m.skipped)
    with h5py.File(out) as f:
        kept = [i for i, p in enumerate(m.paths) if p != broken]
        assert f["labels"].dtype == np.int8 and f["labels"].shape == (len(m) - 1, 14)
        assert np.array_equal(f["labels"][()], m.labels[kept])
        assert list(f["paths"].asstr()[()]) == [m.paths[i] for i in kept]
        assert list(f["patients"].asstr()[()]) == [m.patients[i] for i in kept]
        assert f.attrs["task"] == "multilabel" and "classes" not in f.attrs
        assert json.loads(f.attrs["label_names"]) == list(CHEXPERT_HEADER[5:])
        assert sorted(f["skipped"].asstr()[()][:, 0]) == sorted([*gone, broken])
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    splits = np.array([m.splits[i] for i in kept])
    assert info["task"] == "multilabel" and info["rows_per_split"] == {s: int((splits == s).sum())
                                                                        for s in ("train", "val", "test")}
    edema = info["labels_per_split"]["train"]["Edema"]
    column = m.labels[kept][splits == "train", m.classes.index("Edema")]
    assert [edema[w] for w in ("positive", "negative", "uncertain", "not mentioned")] == [
        int((column == v).sum()) for v in (1, 0, -1, -2)]
    assert main(["inspect", str(out)]) == 0
    shown = flat(capsys.readouterr().out)
    assert "labels as read" in shown and "Support Devices" in shown
    assert FeatureCache.open(out).label_names == list(CHEXPERT_HEADER[5:])
    with h5py.File(out, "r+") as f:
        f["labels"][0, 3] = 2
    with pytest.raises(UserError, match="dataset 'labels' holds -2..2, outside -2..1"):
        FeatureCache.open(out)


def test_single_label_cache_schema_is_unchanged(small_cache):
    _, out, _ = small_cache
    with h5py.File(out) as f:
        assert f["labels"].dtype == np.int64 and f["labels"].ndim == 1
        assert "task" not in f.attrs and "label_names" not in f.attrs
        assert "task" not in json.loads(f.attrs["fingerprint_inputs"])
    assert FeatureCache.open(out).task == "multiclass"


@pytest.fixture
def labelled(tmp_path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / "imgs" / name, size=(20, 16))
    return tmp_path


@pytest.mark.parametrize("rows, columns, expected", [
    ([["imgs/a.png", "1"], ["imgs/b.png", "maybe"]], ["path", "Edema"], "labels.csv, row 3, column 'Edema': "
                                                                          "unknown label value 'maybe'"),
    ([["imgs/a.png", "1"], ["../outside.png", "0"]], ["path", "Edema"], "labels.csv, row 3, column 'path': path "
                                                                          "'../outside.png' is empty or leaves"),
    ([["imgs/a.png", "1"], ["imgs/./a.png", "0"]], ["path", "Edema"], "labels.csv, row 3, column 'path': duplicate "
                                                                        "path imgs/a.png (also listed at labels.csv "
                                                                        "row 2)"),
    ([["imgs/a.png", "1"]], ["file", "Edema"], "labels.csv, row 1: no column 'path'"),
])
def test_csv_bad_input_is_one_line_naming_file_row_and_column(labelled, capsys, rows, columns, expected):
    table = write_csv(labelled / "labels.csv", columns, rows)
    err = _one_line_error(["scan", table, "--format", "csv", "--label-cols", "Edema"], capsys)
    assert expected in err, err


def test_bad_input_of_each_format(labelled, tmp_path, capsys):
    err = _one_line_error(["scan", tmp_path / "absent.csv", "--format", "csv"], capsys)
    assert "label CSV not found" in err and "absent.csv" in err
    err = _one_line_error(["scan", DEMO_DATA, "--label-cols", "A,B"], capsys)
    assert "--label-cols does not apply to --format folder" in err
    nih = make_nih(tmp_path / "nih", n_patients=6)
    with (nih / "test_list.txt").open("a") as f:
        f.write("00000099_000.png\n")
    err = _one_line_error(["scan", nih, "--format", "nih"], capsys)
    assert "test_list.txt, row" in err and "00000099_000.png is not an image of Data_Entry_2017.csv" in err
    cx = make_chexpert(tmp_path / "cx", n_train_patients=3, n_valid_patients=1)
    text = (cx / "valid.csv").read_text().splitlines()
    (cx / "valid.csv").write_text("\n".join(text[:2] + [text[2].replace(",1.0,", ",2.0,", 1)] + text[3:]) + "\n")
    err = _one_line_error(["scan", cx, "--format", "chexpert"], capsys)
    assert "valid.csv, row 3, column" in err and "unknown label value '2.0'" in err
    mimic = make_mimic(tmp_path / "mimic", n_subjects=3)
    (mimic / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    err = _one_line_error(["scan", mimic, "--format", "mimic"], capsys)
    assert "MIMIC-CXR label file not found" in err and "mimic-cxr-2.0.0-chexpert.csv" in err


def test_missing_files_are_skipped_with_the_reason_and_the_run_goes_on(labelled, capsys):
    table = write_csv(labelled / "labels.csv", ["path", "label"],
                      [["imgs/a.png", "A"], ["imgs/gone.png", "B"], ["imgs/b.png", "B"], ["imgs/c.png", "A"],
                       ["imgs/notes.txt", "A"]])
    m = read_manifest(table, format="csv")
    assert m.paths == ("imgs/a.png", "imgs/c.png", "imgs/b.png") and m.classes == ("A", "B")
    assert dict(m.skipped) == {"imgs/gone.png": "listed, but no such file (labels.csv row 3)",
                               "imgs/notes.txt": "not an image extension"}
    assert main(["scan", str(table), "--format", "csv"]) == 0
    assert "listed, but no such file" in flat(capsys.readouterr().out)


def test_run_config_takes_the_label_source_keys(tmp_path):
    from featcache.run import read_config

    config = tmp_path / "c.toml"
    config.write_text('data = "x.csv"\nformat = "csv"\nlabel_col = "finding"\nsplit_col = "split"\n'
                      'root = "images"\nviews = "frontal"\n[[fixed]]\nbackbone = "resnet18"\n')
    assert read_config(config)["format"] == "csv"
    config.write_text('data = "x.csv"\nformat = 3\n[[fixed]]\nbackbone = "resnet18"\n')
    with pytest.raises(UserError, match="format must be a str"):
        read_config(config)


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_every_source_refuses_the_options_it_does_not_take(fmt, tmp_path):
    source = SOURCES[fmt]
    stray = next(name for name in ("views", "label_from_name") if name not in source.options)
    value = "frontal" if stray == "views" else ["x=Y"]
    with pytest.raises(UserError, match=f"--{stray.replace('_', '-')} does not apply to --format {fmt}"):
        read_manifest(tmp_path, format=fmt, **{stray: value})
    with pytest.raises(ValueError, match="registered twice"):
        register(fmt, options=(), expects="")(lambda data: None)
    with pytest.raises(UserError, match="unknown --format 'dicom'"):
        read_manifest(tmp_path, format="dicom")


@pytest.mark.parametrize("sides, patients", [
    (("train", "test"), ["P0", "P1", "P2", "P3", "P0", "P4"]),
    (("train", "val"), ["P0", "P1", "P0", "P3", "P4", "P5"]),
    (("val", "test"), ["P0", "P1", "P2", "P3", "P2", "P5"]),
])
def test_csv_refuses_a_patient_in_two_given_splits(tmp_path, capsys, sides, patients):
    for i in range(6):
        write_image(tmp_path / "img" / f"p{i}.png", size=(20, 16), seed=i)
    splits = ["train", "train", "val", "val", "test", "test"]
    table = write_csv(tmp_path / "leak.csv", ["path", "label", "split", "pid"],
                      [[f"img/p{i}.png", "AB"[i % 2], s, p] for i, (s, p) in enumerate(zip(splits, patients))])
    err = _one_line_error(["scan", table, "--format", "csv", "--split-col", "split", "--patient-col", "pid",
                           "--min-val", "1"], capsys)
    first = patients.index(next(p for p in patients if patients.count(p) > 1))
    second = patients.index(patients[first], first + 1)
    assert (f"leak.csv row {first + 2}, column 'pid': patient {patients[first]} is in {sides[0]} here and in "
            f"{sides[1]} at leak.csv row {second + 2}; 1 patient is in more than one of train, val and test") in err


def test_csv_counts_the_patients_in_two_splits_and_keeps_scoped_file_name_ids_apart(tmp_path, capsys):
    for i in range(6):
        write_image(tmp_path / "img" / f"person{i % 3}_{i}.png", size=(20, 16), seed=i)
    rows = [[f"img/person{i % 3}_{i}.png", "AB"[i % 2], ["train", "train", "test"][i // 2], f"P{i % 3}"]
            for i in range(6)]
    table = write_csv(tmp_path / "leak.csv", ["path", "label", "split", "pid"], rows)
    err = _one_line_error(["scan", table, "--format", "csv", "--split-col", "split", "--patient-col", "pid"], capsys)
    assert "patient P1 is in train here and in test at leak.csv row 6; 2 patients are in more than one" in err
    m = read_manifest(table, format="csv", split_col="split", min_val=0)  # ids from file names: scoped by split
    assert set(m.patients) >= {"train/person1", "test/person1"}


def test_nih_chexpert_and_mimic_refuse_a_patient_in_two_splits(tmp_path, capsys):
    nih = make_nih(tmp_path / "nih", n_patients=10)
    train_val = (nih / "train_val_list.txt").read_text().split()
    moved = next(n for n in train_val if sum(m[:8] == n[:8] for m in train_val) > 1)  # one image of two or more
    (nih / "train_val_list.txt").write_text("".join(n + "\n" for n in train_val if n != moved))
    with (nih / "test_list.txt").open("a") as f:
        f.write(moved + "\n")
    err = _one_line_error(["scan", nih, "--format", "nih"], capsys)
    assert f"column 'Patient ID': patient {int(moved[:8])} is in " in err and "1 patient is in more than one" in err
    assert "is in test here and in train at Data_Entry_2017.csv row" in err or "is in train here and in test" in err

    cx = make_chexpert(tmp_path / "cx", n_train_patients=6, n_valid_patients=2)
    valid = (cx / "valid.csv").read_text()
    patient = valid.split("/valid/", 1)[1].split("/", 1)[0]  # a valid patient, also seen in train
    (cx / "valid" / patient).rename(cx / "valid" / "patient00001")
    (cx / "valid.csv").write_text(valid.replace(f"/valid/{patient}/", "/valid/patient00001/"))
    err = _one_line_error(["scan", cx, "--format", "chexpert"], capsys)
    assert "train.csv row " in err and "column 'Path': patient patient00001 is in " in err
    assert " and in test at valid.csv row 2; 1 patient is in more than one of train, val and test" in err

    mimic = make_mimic(tmp_path / "mimic", n_subjects=8)
    with gzip.open(mimic / "mimic-cxr-2.0.0-split.csv.gz", "rt") as f:
        rows = list(csv.reader(f))
    subject = next(r[2] for r in rows[1:] if r[3] == "train" and sum(q[2] == r[2] for q in rows) > 1)
    last = max(i for i, r in enumerate(rows) if r[2] == subject)
    rows[last][3] = "test"
    write_csv(mimic / "mimic-cxr-2.0.0-split.csv.gz", rows[0], rows[1:], gz=True)
    err = _one_line_error(["scan", mimic, "--format", "mimic"], capsys)
    assert f"column 'subject_id': patient p{subject} is in " in err and f"test at mimic-cxr-2.0.0-split.csv.gz row " \
                                                                      f"{last + 1}" in err


def test_csv_refuses_a_class_missing_from_a_split_as_folders_do(tmp_path, capsys):
    for i in range(5):
        write_image(tmp_path / "img" / f"p{i}.png", size=(20, 16), seed=i)
    table = write_csv(tmp_path / "labels.csv", ["path", "label", "split"],
                      [["img/p0.png", "A", "train"], ["img/p1.png", "B", "train"], ["img/p2.png", "A", "test"],
                       ["img/p3.png", "B", "test"], ["img/p4.png", "C", "test"]])
    err = _one_line_error(["scan", table, "--format", "csv", "--split-col", "split"], capsys)
    assert ("labels.csv, column 'split': classes differ across splits (train lacks C) - found train: A, B; "
            "test: A, B, C") in err
    (tmp_path / "folder" / "test" / "C").mkdir(parents=True)
    for i, (split, cls) in enumerate([("train", "A"), ("train", "B"), ("test", "A"), ("test", "B"), ("test", "C")]):
        write_image(tmp_path / "folder" / split / cls / f"p{i}.png", size=(20, 16), seed=i)
    err = _one_line_error(["scan", tmp_path / "folder"], capsys)
    assert "classes differ across splits (train/ lacks C) - found train/: A, B; test/: A, B, C" in err


def test_a_nul_byte_in_a_listed_path_is_refused_naming_file_row_and_column(labelled, tmp_path, capsys):
    table = labelled / "nul.csv"
    table.write_bytes(b'path,label\nimgs/a.png,A\n"imgs/b\x00.png",B\nimgs/c.png,B\n')
    err = _one_line_error(["scan", table, "--format", "csv"], capsys)
    assert "nul.csv, row 3, column 'path': path 'imgs/b\\x00.png' holds a NUL byte" in err
    cx = make_chexpert(tmp_path / "cx", n_train_patients=3, n_valid_patients=1)
    lines = (cx / "train.csv").read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace(".jpg", "\0.jpg", 1)
    (cx / "train.csv").write_text("".join(lines))
    err = _one_line_error(["scan", cx, "--format", "chexpert"], capsys)
    assert "train.csv, row 3, column 'Path': path " in err and "holds a NUL byte" in err


def test_a_list_or_label_file_that_is_not_gzip_or_is_cut_short_is_one_line(tmp_path, capsys):
    nih = make_nih(tmp_path / "nih", n_patients=10)
    (nih / "test_list.txt").unlink()
    (nih / "test_list.txt.gz").write_bytes(b"00000005_000.png\n")  # named .gz, not compressed
    err = _one_line_error(["scan", nih, "--format", "nih"], capsys)
    assert "test_list.txt.gz, row 1: not a readable gzip file (BadGzipFile" in err
    text = "".join(f"{n:08d}_000.png\n" for n in range(1, 3000))
    (nih / "test_list.txt.gz").write_bytes(gzip.compress(text.encode())[:-20])  # truncated
    err = _one_line_error(["scan", nih, "--format", "nih"], capsys)
    assert "test_list.txt.gz, row " in err and "not a readable gzip file (EOFError" in err
    mimic = make_mimic(tmp_path / "mimic", n_subjects=8)
    packed = (mimic / "mimic-cxr-2.0.0-split.csv.gz").read_bytes()
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(packed[:len(packed) // 2])
    err = _one_line_error(["scan", mimic, "--format", "mimic"], capsys)
    assert "mimic-cxr-2.0.0-split.csv.gz, row " in err and "not a readable gzip file (EOFError" in err


def test_read_errors_name_the_row_a_spreadsheet_shows(labelled, capsys):
    table = labelled / "latin.csv"
    table.write_bytes(b"path,label\nimgs/a.png,Caf\xe9\nimgs/b.png,B\n")
    err = _one_line_error(["scan", table, "--format", "csv"], capsys)
    assert "latin.csv, row 2: not UTF-8 text (byte 0xe9" in err
    lines = [b"path,label"] + [b"imgs/a%d.png,A" % i for i in range(2000)]
    lines[1500] = b"imgs/b.png,Caf\xe9"  # past the first chunks the text layer decodes
    table.write_bytes(b"\n".join(lines) + b"\n")
    err = _one_line_error(["scan", table, "--format", "csv"], capsys)
    assert "latin.csv, row 1501: not UTF-8 text" in err
    table.write_bytes(b"path,label\nimgs/a.png," + b"A" * (csv.field_size_limit() + 1) + b"\nimgs/b.png,B\n")
    err = _one_line_error(["scan", table, "--format", "csv"], capsys)
    assert "latin.csv, row 2: not readable as CSV (field larger than field limit" in err


def test_chexpert_without_valid_csv_and_views_that_leave_nothing_say_so(tmp_path, capsys):
    cx = make_chexpert(tmp_path / "cx", n_train_patients=3, n_valid_patients=1)
    (cx / "valid.csv").unlink()
    err = _one_line_error(["scan", cx, "--format", "chexpert"], capsys)
    assert "CheXpert label file not found: " in err and "valid.csv (the test split; the download has both" in err
    nih = make_nih(tmp_path / "nih", n_patients=10)  # frontal views only
    err = _one_line_error(["scan", nih, "--format", "nih", "--views", "lateral"], capsys)
    rows = len((nih / "Data_Entry_2017.csv").read_text().splitlines()) - 1
    assert f"no images left: Data_Entry_2017.csv list {rows}, and --views lateral keeps none of them" in err


def test_the_report_refuses_a_leaderboard_figure_that_is_not_a_number(tmp_path, capsys):
    row = {"backbone": "a", "rank": 1, "val_auroc": 0.7, "test_auroc": 0.66, "test_auroc_ci": [0.6, 0.7],
           "difference_to_first": None, "difference_to_first_ci": None, "sensitivity": 0.5, "specificity": 0.5}
    for key, value in (("test_auroc", "0.66"), ("test_auroc_ci", [0.6]), ("sensitivity", True), ("gmacs", "1.8")):
        zoo = tmp_path / f"zoo-{key}"
        zoo.mkdir()
        (zoo / "leaderboard.json").write_text(json.dumps({"ranked_by": "val_auroc", "rows": [{**row, key: value}]}))
        err = _one_line_error(["report", zoo, "--out", tmp_path / "r"], capsys)
        assert f"leaderboard.json, row 1 of rows (a), field '{key}': {value!r} is not " in err
        assert not (tmp_path / "r").exists()
