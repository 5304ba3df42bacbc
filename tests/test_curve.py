"""featcache curve: label-efficiency points from a cache, each a patient-grouped subset of train, the head chosen on
the whole of val, test read only to report; resumable point by point."""

from __future__ import annotations

import json
import shutil

import numpy as np

import featcache.curve as curve_module
from featcache.cache.h5 import FeatureCache
from featcache.cli import main
from featcache.curve import curve, fraction_subset, label_fraction_subsets, label_shot_subset, shot_subset
from featcache.data.labels import apply_policy
from test_multilabel import NAMES, chexpert_cache


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


def test_mixed_tasks_misplaced_flags_and_bad_points_are_refused_in_one_line(tmp_path, capsys, demo_cache):
    multilabel, _ = chexpert_cache(tmp_path)
    for argv, words in ([[multilabel, demo_cache], "one task"],
                        [[multilabel, "--positive-class", "Edema"], "--positive-class applies to two-class sets"],
                        [[demo_cache, "--uncertain", "ones"], "--uncertain and --unmentioned apply to multi-label"],
                        [[demo_cache, "--fractions", "1.5"], "(0, 1]"],
                        [[demo_cache, "--fractions", "1", "--per-class-shots", "2"], "not allowed"]):
        capsys.readouterr()
        assert main(["curve", *map(str, argv), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1


def _multilabel_train(tmp_path, policy=("ignore", "negative")):
    cache, _ = chexpert_cache(tmp_path)
    _, labels, patients = FeatureCache.open(cache).arrays("train")
    return cache, apply_policy(labels, *policy), patients


def test_multilabel_fractions_take_whole_patients_stratified_over_every_label_and_nested(tmp_path):
    _, targets, patients = _multilabel_train(tmp_path)
    fractions = [0.2, 0.5, 1.0]
    keeps = label_fraction_subsets(patients, targets, fractions, seed=3)
    assert keeps[1.0].all()
    assert set(patients[keeps[0.2]]) < set(patients[keeps[0.5]])  # nested as the fraction grows
    positives = targets == 1
    for fraction in (0.2, 0.5):
        keep = keeps[fraction]
        assert not set(patients[keep]) & set(patients[~keep])
        assert abs(keep.mean() - fraction) < 0.12
        for j in range(targets.shape[1]):  # every label keeps both values, and about its share of positives
            assert positives[keep, j].any() and (targets[keep, j] == 0).any()
            if positives[:, j].sum() >= 20:
                assert abs(positives[keep, j].sum() / positives[:, j].sum() - fraction) < 0.15
    again = label_fraction_subsets(patients, targets, fractions, seed=3)
    other = label_fraction_subsets(patients, targets, fractions, seed=4)
    assert np.array_equal(again[0.2], keeps[0.2]) and not np.array_equal(other[0.2], keeps[0.2])


def test_multilabel_shots_take_that_many_positives_of_every_label_and_a_negative(tmp_path):
    _, targets, patients = _multilabel_train(tmp_path, ("ignore", "ignore"))
    for shots in (1, 3):
        keep = label_shot_subset(patients, targets, shots, seed=0)
        for j in range(targets.shape[1]):
            assert (targets[keep, j] == 1).sum() >= min(shots, (targets[:, j] == 1).sum())
            assert (targets[keep, j] == 0).any()
        assert keep.sum() <= 2 * shots * targets.shape[1]
    available = (targets == 1).sum(axis=0)
    keep = label_shot_subset(patients, targets, 30, seed=0)  # more than the rarest labels have: all of theirs
    assert available.min() < 30
    np.testing.assert_array_equal((targets[keep] == 1).sum(axis=0)[available < 30], available[available < 30])


def test_multilabel_points_are_test_blind_follow_the_policy_and_plot_the_mean_auroc(tmp_path, capsys):
    import h5py

    cache, _ = chexpert_cache(tmp_path)
    args = dict(fractions=[0.3, 1], repeats=1, heads="sweep", epochs=3, n_resamples=30, device="cpu")
    first = curve([cache], tmp_path / "a", **args)
    keys = ("value", "train_images", "train_patients", "train_per_class", "head", "val_auroc")
    with h5py.File(cache, "r+") as f:
        rows = np.flatnonzero(f["splits"].asstr()[()] == "test")
        labels = f["labels"][()]
        labels[rows] = labels[np.random.default_rng(0).permutation(rows)]
        f["labels"][...] = labels
    second = curve([cache], tmp_path / "b", **args)
    assert [{k: p[k] for k in keys} for p in first["points"]] == [{k: p[k] for k in keys} for p in second["points"]]
    assert [p["test_auroc"] for p in first["points"]] != [p["test_auroc"] for p in second["points"]]
    full = [p for p in first["points"] if p["value"] == 1.0][0]
    assert full["test_auroc"] > 0.7 and full["test_auroc_ci"][0] <= full["test_auroc"] <= full["test_auroc_ci"][1]
    assert set(full["train_per_class"]) == set(NAMES)
    assert first["settings"]["policy"] == {"uncertain": "ignore", "unmentioned": "negative"}
    assert first["summary"][0]["test_auroc_ci"] is not None
    assert (tmp_path / "a" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["curve", str(cache), "--out", str(tmp_path / "ones"), "--fractions", "1", "--repeats", "1",
                 "--epochs", "3", "--bootstrap", "0", "--device", "cpu", "--uncertain", "ones"]) == 0
    assert "test mean AUROC" in capsys.readouterr().out
    ones = json.loads((tmp_path / "ones" / "curve.json").read_text())
    assert ones["settings"]["policy"]["uncertain"] == "ones"
    assert ones["points"][0]["train_per_class"] != full["train_per_class"]  # uncertain counted as positive
    assert ones["points"][0]["val_auroc"] != full["val_auroc"]
