from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from featcache.errors import UserError
from featcache.data.manifest import _patient_id, _compile_patient_regex, scan
from featcache.data.splits import carve_patients
from helpers import kermany_names, make_dataset


@pytest.mark.parametrize(
    "stem, expected",
    [
        ("person123_bacteria_456", "person123"),
        ("person123_virus_78", "person123"),
        ("person447_virus_921_1", "person447"),
        ("IM-0115-0001", "IM-0115"),
        ("IM-0429-0001-0002", "IM-0429"),
        ("NORMAL2-IM-1427-0001", "NORMAL2-IM-1427"),
        ("NORMAL2-IM-0381-0001-0002", "NORMAL2-IM-0381"),
        ("scan_042", "scan_042"),  # no rule matches: the file stem
    ],
)
def test_kermany_patient_ids(stem, expected):
    assert _patient_id(stem, None)[0] == expected


def test_patient_regex_override_and_fallback():
    named = _compile_patient_regex(r"^(?P<patient>pt\d+)-")
    assert _patient_id("pt7-left", named) == ("pt7", "regex")
    assert _patient_id("other", named) == ("other", "file stem")
    grouped = _compile_patient_regex(r"^sub(\d+)")
    assert _patient_id("sub12_scan3", grouped)[0] == "12"
    with pytest.raises(UserError, match="patient-regex"):
        _compile_patient_regex("(unclosed")


def test_junk_is_skipped_and_counted(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": {"A": ["a1.jpeg", "a2.JPG"], "B": ["b1.png", "b2.Jpeg"]},
                                         "test": {"A": ["t.jpg"], "B": ["u.PNG"]}})
    for junk in ("train/.DS_Store", ".DS_Store", "train/A/._a1.jpeg", "train/B/Thumbs.db", "test/A/notes.txt",
                 "train/stray.jpeg"):
        (root / junk).write_bytes(b"junk")
    (root / "train" / "B" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "train" / "A" / ".hidden_dir").mkdir()
    (root / "train" / "A" / ".hidden_dir" / "x.jpeg").write_bytes(b"x")
    m = scan(root, min_val=0)
    assert sorted(m.paths) == sorted(["train/A/a1.jpeg", "train/A/a2.JPG", "train/B/b1.png", "train/B/b2.Jpeg",
                                      "test/A/t.jpg", "test/B/u.PNG"])
    assert m.skipped_by_reason() == {"hidden file": 3, "system file": 1, "not an image extension": 1,
                                     "not inside a class folder": 1, "junk folder": 1,
                                     "broken link or unreadable": 1}
    assert ("train/stray.jpeg", "not inside a class folder") in m.skipped


def test_rows_are_ordered_by_split_class_path(small_dataset):
    m = scan(small_dataset)
    keys = [({"train": 0, "val": 1, "test": 2}[s], lab, p) for s, lab, p in zip(m.splits, m.labels, m.paths)]
    assert keys == sorted(keys)
    assert m.classes == ("NORMAL", "PNEUMONIA")
    assert [m.classes[lab] for lab in m.labels] == [p.split("/")[1] for p in m.paths]


def test_validation_is_patient_grouped_stratified_and_seeded(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 40, 60, per_patient=3),
                                         "test": kermany_names("", 3, 3, per_patient=1)}, size=(8, 8))
    m = scan(root, val_fraction=0.2, split_seed=3)
    assert m.validation["source"] == "carved from train"
    train_p = {p for p, s in zip(m.patients, m.splits) if s == "train"}
    val_p = {p for p, s in zip(m.patients, m.splits) if s == "val"}
    assert train_p and val_p and not (train_p & val_p)
    counts = m.counts()
    for label in range(2):
        share = counts["val"][label] / (counts["val"][label] + counts["train"][label])
        assert 0.18 <= share <= 0.24  # 20 % of each class, to the nearest whole patient (3 images)
    val_paths = m.paths[m.indices("val")[0]:]
    assert scan(root, val_fraction=0.2, split_seed=3).paths == m.paths
    assert scan(root, val_fraction=0.2, split_seed=4).paths[m.indices("val")[0]:] != val_paths
    # Person numbers restart in test: ids are scoped by split folder.
    assert all(p.startswith("test/") for p, s in zip(m.patients, m.splits) if s == "test")
    assert all(p.startswith("train/") for p, s in zip(m.patients, m.splits) if s in ("train", "val"))


def test_small_val_folder_is_folded_and_large_one_kept(tmp_path):
    layout = {"train": kermany_names("", 10, 10), "val": {"NORMAL": ["IM-0900-0001.jpeg"],
                                                          "PNEUMONIA": ["person900_virus_1.jpeg"]}}
    root = make_dataset(tmp_path / "d", layout, size=(8, 8))
    m = scan(root)  # 2 val images < --min-val 100
    assert m.validation["folded_val_images"] == 2
    assert "val/NORMAL/IM-0900-0001.jpeg" in m.paths
    assert m.validation["source"] == "carved from train"
    assert sum(m.counts()["val"]) == m.validation["images"] > 2
    kept = scan(root, min_val=2)
    assert kept.validation == {"source": "folder", "images": 2}
    assert kept.counts()["val"] == [1, 1]


def test_flat_layout_is_one_split(tmp_path):
    root = make_dataset(tmp_path / "d", {"": {"cat": ["1.png", "2.png"], "dog": ["3.png"]}}, size=(8, 8))
    m = scan(root)
    assert m.layout == "flat" and set(m.splits) == {"all"}
    assert m.validation["source"] == "none"
    assert m.patients[0] == "all/1"


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train": {"A": ["1.png"], "B": ["2.png"]}, "test": {"A": ["3.png"]}}, r"test/ lacks B"),
        ({"train": {"A": ["1.png"], "B": ["2.png"]}, "test": {"A": ["3.png"], "B": ["4.png"], "C": ["5.png"]}},
         r"train/ lacks C"),
        ({"train": {"A": ["1.png"]}}, "one class folder"),
    ],
)
def test_class_mismatch_is_refused(tmp_path, layout, message):
    root = make_dataset(tmp_path / "d", layout, size=(8, 8))
    with pytest.raises(UserError, match=message):
        scan(root)


def test_empty_class_and_missing_folder_are_refused(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": {"A": ["1.png"], "B": ["2.png"]}}, size=(8, 8))
    (root / "train" / "C").mkdir()
    (root / "train" / "C" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(UserError, match=r"empty class folder: train/C"):
        scan(root)
    with pytest.raises(UserError, match="data folder not found"):
        scan(tmp_path / "nope")
    with pytest.raises(UserError, match="no class folders"):
        scan(tmp_path / "d" / "train" / "A")


def test_mixed_split_and_other_folders_are_refused(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": {"A": ["1.png"], "B": ["2.png"]}, "extra": {"A": ["3.png"]}},
                        size=(8, 8))
    with pytest.raises(UserError, match=r"mixes split folders \(train\) with other folders \(extra\)"):
        scan(root)


def test_carve_keeps_a_patient_on_each_side():
    patients = ["a", "a", "b", "c", "c", "c"]
    labels = [0, 0, 0, 1, 1, 1]
    chosen = carve_patients(patients, labels, fraction=0.9, seed=0)
    assert len(chosen & {"a", "b"}) == 1  # class 0 keeps one patient in train
    assert "c" not in chosen  # a class with one patient stays whole in train


def test_shared_set_scan(shared_data):
    m = scan(shared_data)
    counts = m.counts()
    assert sum(counts["train"]) + sum(counts["val"]) == 5216
    assert counts["test"] == [234, 390]
    assert len(m) == 5840
    assert m.skipped_by_reason() == {"hidden file": 3}
    assert m.patient_sources == {"kermany name": 5840}
    train_val = {p for p, s in zip(m.patients, m.splits) if s in ("train", "val")}
    by_class = Counter(m.classes[lab] for lab, p in {(lab, p) for lab, p, s in
                                                     zip(m.labels, m.patients, m.splits) if s != "test"})
    assert len(train_val) == 1211 + 1635 and by_class == {"NORMAL": 1211, "PNEUMONIA": 1635}
    val = {p for p, s in zip(m.patients, m.splits) if s == "val"}
    train = {p for p, s in zip(m.patients, m.splits) if s == "train"}
    assert not val & train
    share = np.array(counts["val"]) / (np.array(counts["val"]) + np.array(counts["train"]))
    assert np.all(np.abs(share - 0.15) < 0.01)


def test_label_from_name_preset_and_rules(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 6, 8), "test": kermany_names("", 2, 2)},
                        size=(8, 8))
    m = scan(root, label_from_name=["kermany-3class"])
    assert m.classes == ("BACTERIA", "NORMAL", "VIRUS")
    by_name = {p.rsplit("/", 1)[-1]: m.classes[lab] for p, lab in zip(m.paths, m.labels)}
    assert by_name["person1_bacteria_11.jpeg"] == "BACTERIA" and by_name["person1_virus_10.jpeg"] == "VIRUS"
    assert by_name["IM-0000-0001.jpeg"] == "NORMAL"
    assert m.label_rules == (("_bacteria_", "BACTERIA"), ("_virus_", "VIRUS"))
    assert m.digest() != scan(root).digest()
    custom = scan(root, label_from_name=[r"person\d*[02468]_=EVEN"])
    assert custom.classes == ("EVEN", "NORMAL", "PNEUMONIA")


def test_label_from_name_mistakes(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 4, 4), "test": kermany_names("", 1, 1)},
                        size=(8, 8))
    with pytest.raises(UserError, match="REGEX=CLASS"):
        scan(root, label_from_name=["bacteria"])
    with pytest.raises(UserError, match="not a valid regular expression"):
        scan(root, label_from_name=["(=X"])
    with pytest.raises(UserError, match="leaves one class"):
        scan(root, label_from_name=[".=ALL"])
    with pytest.raises(UserError, match=r"test/ has no VIRUS"):
        scan(root, label_from_name=["person[2-4]_virus=VIRUS"])


def test_seed_leaves_the_validation_split_where_split_seed_puts_it(tmp_path, capsys):
    import json

    from featcache.cli import main

    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 30, 30, per_patient=2)}, size=(8, 8))

    def val_paths(*flags):
        out = tmp_path / f"m{len(list(tmp_path.glob('m*.json')))}.json"
        assert main(["scan", str(root), "--out", str(out), *flags]) == 0
        m = json.loads(out.read_text())
        return {r["path"] for r in m["rows"] if r["split"] == "val"}

    default = val_paths()
    assert val_paths("--seed", "5") == default  # init and shuffling seed: the split does not move
    assert val_paths("--split-seed", "5") != default


def test_max_images_subsamples_train_only_unless_asked(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 40, 60, per_patient=2),
                                         "test": kermany_names("NORMAL2-", 10, 15, per_patient=1)}, size=(8, 8))
    m = scan(root, val_fraction=0.2)
    before = m.counts()
    small = m.limit(30, seed=1)
    after = small.counts()
    assert after["val"] == before["val"] and after["test"] == before["test"]
    assert sum(after["train"]) <= 30 and after["train"][0] < after["train"][1]  # classes in proportion
    assert small.limit(30, seed=1).paths == small.paths  # idempotent: extract may apply it again
    everything = m.limit(30, seed=1, subsample_all=True)
    assert len(everything) <= 30 and sum(everything.counts()["test"]) < sum(before["test"])
    with pytest.raises(UserError, match="--max-images"):
        m.limit(0)


def test_symlinked_folders_are_followed_once_and_never_out_of_their_class(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 3, 3)}, size=(8, 8))
    plain = scan(root, min_val=0)
    (root / "train" / "NORMAL" / "loop").symlink_to(".")
    (root / "train" / "PNEUMONIA" / "up").symlink_to("..")
    extra = tmp_path / "more"
    extra.mkdir()
    (root / "train" / "NORMAL" / "sub").mkdir()
    (root / "train" / "NORMAL" / "sub" / "IM-0777-0001.jpeg").write_bytes((root / "train" / "NORMAL").glob(
        "*.jpeg").__next__().read_bytes())
    (root / "train" / "NORMAL" / "again").symlink_to("sub")  # a second link to a folder already walked
    m = scan(root, min_val=0)
    assert len(m) == len(plain) + 1 and set(plain.paths) <= set(m.paths)  # the linked folder counted once
    reasons = dict(m.skipped)
    assert "symlinked folder already walked" in reasons["train/NORMAL/loop/"]
    assert reasons["train/PNEUMONIA/up/"] == "symlinked folder outside its class folder"
    assert "already walked" in (reasons.get("train/NORMAL/again/") or reasons["train/NORMAL/sub/"])


def test_names_that_are_not_utf8_are_skipped_at_scan_and_extract_finishes(tmp_path):
    from featcache.extract import extract

    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 4, 4), "test": kermany_names("", 2, 2)},
                        size=(16, 16))
    good = next((root / "train" / "NORMAL").glob("*.jpeg"))
    bad = os.fsencode(root / "train" / "NORMAL") + b"/x\xff.jpeg"
    with open(bad, "wb") as f:
        f.write(good.read_bytes())
    m = scan(root, min_val=0)
    assert ("train/NORMAL/x\\xff.jpeg", "name is not valid UTF-8") in m.skipped
    summary = extract(root, tmp_path / "c.h5", weights="none", workers=0, progress=False, manifest=m)
    assert summary["status"] == "written"
    from featcache.cache.h5 import FeatureCache

    skipped = FeatureCache.open(tmp_path / "c.h5").read("skipped")["skipped"]
    assert any("x\\xff.jpeg" in str(row[0]) for row in skipped)


def test_only_regular_files_of_a_sane_size_are_images(tmp_path, monkeypatch):
    from featcache.data import manifest as manifest_module

    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 3, 3)}, size=(8, 8))
    os.mkfifo(root / "train" / "NORMAL" / "pipe.jpeg")  # would hang any decoder
    (root / "train" / "NORMAL" / "zero.jpeg").symlink_to("/dev/zero")  # would never end
    (root / "train" / "PNEUMONIA" / "huge.png").write_bytes(b"\x89PNG" + b"\0" * 2048)
    monkeypatch.setattr(manifest_module, "MAX_FILE_BYTES", 1024)
    reasons = dict(scan(root, min_val=0).skipped)
    assert reasons["train/NORMAL/pipe.jpeg"].startswith("not a regular file")
    assert reasons["train/NORMAL/zero.jpeg"].startswith("not a regular file")
    assert reasons["train/PNEUMONIA/huge.png"].startswith("larger than the file size cap")


def test_folders_that_cannot_be_read_are_named(tmp_path, monkeypatch):
    """Simulated (tests run as root, which reads any folder): the layout's folders and a class's subfolders."""
    from pathlib import Path

    root = make_dataset(tmp_path / "d", {"train": kermany_names("", 3, 3)}, size=(8, 8))
    (root / "train" / "NORMAL" / "locked").mkdir()
    real_iterdir, real_walk = Path.iterdir, os.walk

    def iterdir(self):
        if self == root / "train":
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(UserError, match=r"cannot read the folder .*train \(Permission denied\)"):
        scan(root)
    monkeypatch.setattr(Path, "iterdir", real_iterdir)

    def walk(top, **kw):
        onerror = kw.get("onerror")
        for entry in real_walk(top, **kw):
            if entry[0].endswith("locked"):
                onerror(PermissionError(13, "Permission denied", entry[0]))
                continue
            yield entry

    monkeypatch.setattr(os, "walk", walk)
    reasons = dict(scan(root, min_val=0).skipped)
    assert reasons["train/NORMAL/locked/"] == "folder cannot be read"
