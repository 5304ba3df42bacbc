"""featcache curve: label-efficiency points from a cache, each a patient-grouped subset of train, the head chosen on
the whole of val, test read only to report; resumable point by point."""

from __future__ import annotations

import json
import shutil

import numpy as np

import featcache.curve as curve_module
from featcache.cache.h5 import FeatureCache, write_cache
from featcache.cli import main
from featcache.curve import curve, fraction_subset, shot_subset


def _train(cache):
    _, y, patients = FeatureCache.open(cache).arrays("train")
    return y, patients


def test_fraction_subsets_take_whole_patients_every_class_and_grow_nested(demo_cache):
    y, patients = _train(demo_cache)
    previous = None
    for fraction in (0.01, 0.05, 0.25, 1.0):
        keep = fraction_subset(patients, y, fraction, seed=3)
        taken = set(patients[keep])
        assert not taken & set(patients[~keep])  # no patient split between the subset and the rest
        assert set(np.unique(y[keep])) == set(np.unique(y))  # at least one patient of each class
        if previous is not None:
            assert previous <= taken
        previous = taken
    assert keep.all()
    small = fraction_subset(patients, y, 0.25, seed=3)
    for label in np.unique(y):  # about a quarter of each class's images, whole patients overshooting a little
        target = round(0.25 * (y == label).sum())
        assert target <= (y[small] == label).sum() <= target + 4
    assert not np.array_equal(small, fraction_subset(patients, y, 0.25, seed=4))


def test_a_class_that_is_no_patients_commonest_still_gets_a_patient():
    y = np.array([0, 0, 1, 0, 0, 0, 0])
    patients = np.array(["a", "a", "a", "b", "c", "d", "e"])
    for seed in range(5):
        keep = fraction_subset(patients, y, 0.1, seed=seed)
        assert set(y[keep]) == {0, 1} and keep[patients == "a"].all()


def test_shots_take_that_many_images_per_class_from_distinct_patients_first():
    y = np.array([0] * 6 + [1] * 3)
    patients = np.array(["a", "a", "a", "b", "b", "c", "d", "d", "e"])
    keep = shot_subset(patients, y, 3, seed=0)
    assert (y[keep] == 0).sum() == 3 and (y[keep] == 1).sum() == 3
    assert set(patients[keep & (y == 0)]) == {"a", "b", "c"}
    keep = shot_subset(patients, y, 2, seed=1)
    assert set(patients[keep & (y == 1)]) == {"d", "e"}


def test_points_are_test_blind(demo_cache, tmp_path):
    import h5py

    cache = shutil.copy(demo_cache, tmp_path / "c.h5")
    args = dict(fractions=[0.1, 1], repeats=1, heads="sweep", epochs=3, n_resamples=0, device="cpu")
    first = curve([cache], tmp_path / "a", **args)["points"]
    with h5py.File(cache, "r+") as f:
        rows = np.flatnonzero(f["splits"].asstr()[()] == "test")
        labels = f["labels"][()]
        labels[rows] = labels[np.random.default_rng(0).permutation(rows)]
        f["labels"][...] = labels
    second = curve([cache], tmp_path / "b", **args)["points"]
    keys = ("value", "train_images", "train_patients", "train_per_class", "head", "val_auroc")
    assert [{k: p[k] for k in keys} for p in first] == [{k: p[k] for k in keys} for p in second]
    assert [p["test_auroc"] for p in first] != [p["test_auroc"] for p in second]


def test_a_rerun_skips_finished_points_and_refuses_other_settings(demo_cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = dict(fractions=[0.25, 1], repeats=2, epochs=3, n_resamples=20, device="cpu")
    record = curve([demo_cache], out, **args)
    assert [(p["value"], p["repeat"]) for p in record["points"]] == [(0.25, 0), (1.0, 0), (0.25, 1), (1.0, 1)]
    assert all(p["test_auroc_ci"] for p in record["points"])
    assert {"curve.json", "curve.csv", "curve.png"} <= {p.name for p in out.iterdir()}

    saved = json.loads((out / "curve.json").read_text())  # as if killed before the last point
    saved["points"] = saved["points"][:3]
    (out / "curve.json").write_text(json.dumps(saved))
    fitted = []
    real = curve_module.fit_point
    monkeypatch.setattr(curve_module, "fit_point", lambda *a, **k: fitted.append(1) or real(*a, **k))
    again = curve([demo_cache], out, **args)
    assert len(fitted) == 1
    assert again["points"][:3] == record["points"][:3]
    assert again["points"][3]["head"] == record["points"][3]["head"]

    capsys.readouterr()
    argv = ["curve", str(demo_cache), "--out", str(out), "--fractions", "0.5", "--epochs", "3", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err
    assert main(argv + ["--repeats", "1", "--overwrite"]) == 0
    shown = capsys.readouterr().out
    assert "test AUROC" in shown and "0.5" in shown
    assert len(json.loads((out / "curve.json").read_text())["points"]) == 1
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("cache,mode,value,repeat,train_images,train_patients") and len(rows) == 2


def test_the_curve_rises_from_a_few_labels_to_all_of_them(demo_cache, tmp_path):
    record = curve([demo_cache], tmp_path / "out", fractions=[0.02, 1], repeats=3, n_resamples=0, device="cpu")
    by_value = {r["value"]: r for r in record["summary"]}
    small, full = by_value[0.02], by_value[1.0]
    assert small["train_images"] < full["train_images"] / 10
    assert full["test_auroc"] >= small["test_auroc"] - 0.02, (small, full)


def test_multilabel_caches_and_bad_points_are_refused_in_one_line(tmp_path, capsys, demo_cache):
    labels = np.random.default_rng(0).integers(0, 2, size=(20, 2)).astype(float)
    cache = write_cache(tmp_path / "ml.h5", blocks=[np.zeros((20, 3))], n_rows=20, feature_dim=3, labels=labels,
                        paths=[f"{i}.png" for i in range(20)], splits=["train"] * 10 + ["val"] * 10,
                        patients=[str(i) for i in range(20)],
                        attrs={"task": "multilabel", "label_names": ["A", "B"], "backbone": "synthetic",
                               "weights": "none:seed=0", "fingerprint": "0" * 64, "fingerprint_inputs": {}})
    for argv, words in ([[cache], "multi-label"], [[demo_cache, "--fractions", "1.5"], "(0, 1]"],
                        [[demo_cache, "--fractions", "1", "--per-class-shots", "2"], "not allowed"]):
        capsys.readouterr()
        assert main(["curve", *map(str, argv), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err

