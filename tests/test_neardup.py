"""The report's near-duplicate check: the kNN head's exact blocked search across splits, its threshold learnt
from within-patient pairs of train and val."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.cache.h5 import FeatureCache, write_cache
from featcache.heads import knn
from featcache.report import analysis

DIM = 32


def _patients(rng, split: str, n_patients: int, sibling_noise: float):
    """Two images per patient: a random row and a sibling ``sibling_noise`` away from it."""
    base = rng.normal(size=(n_patients, DIM))
    rows = np.stack([base, base + sibling_noise * rng.normal(size=base.shape)], axis=1).reshape(-1, DIM)
    patients = [f"{split}-p{i // 2}" for i in range(2 * n_patients)]
    return rows, patients


def leaky_cache(path, *, train_noise=0.3, test_noise=0.3, planted=(3, 17, 40)):
    """train 120 patients, val 30, test 40 (two images each); test's last rows are copies of the ``planted``
    train rows, each filed under a patient of its own."""
    rng = np.random.default_rng(0)
    parts = {"train": _patients(rng, "train", 120, train_noise), "val": _patients(rng, "val", 30, train_noise),
             "test": _patients(rng, "test", 40, test_noise)}
    X_test, test_patients = parts["test"]
    parts["test"] = (np.concatenate([X_test, parts["train"][0][list(planted)]]),
                     test_patients + [f"copy-{i}" for i in planted])
    features = np.concatenate([X for X, _ in parts.values()])
    patients = [p for _, ps in parts.values() for p in ps]
    splits = [s for s, (X, _) in parts.items() for _ in range(len(X))]
    paths = [f"{s}/NORMAL/{i}.png" for i, s in enumerate(splits)]
    write_cache(path, blocks=[features], n_rows=len(paths), feature_dim=DIM, labels=[i % 2 for i in range(len(paths))],
                paths=paths, splits=splits, patients=patients,
                attrs={"classes": ["NORMAL", "PNEUMONIA"], "backbone": "synthetic", "weights": "none:seed=0",
                       "fingerprint": "0" * 64, "fingerprint_inputs": {}})
    return FeatureCache.open(path), paths, planted


def _sibling_cosines(cache) -> np.ndarray:
    """Every train and val image's cosine to its patient's other image, computed directly (two per patient)."""
    data = cache.read("features", "splits")
    X = analysis.unit_embeddings(data["features"], data["splits"]).numpy()
    keep = np.isin(data["splits"], ("train", "val"))
    pairs = X[keep].reshape(-1, 2, DIM)
    cos = (pairs[:, 0] * pairs[:, 1]).sum(axis=1)
    return np.repeat(cos, 2)


def test_planted_copies_across_splits_are_found_and_counted(tmp_path):
    cache, paths, planted = leaky_cache(tmp_path / "c.h5")
    dup = analysis.near_duplicates(cache, top=5)
    assert dup["pairs_above"] == {"train-val": 0, "train-test": 3, "val-test": 0}
    found = {(p["a"], p["b"]) for p in dup["closest"][:3]}
    n_before_test = 240 + 60 + 80
    assert found == {(paths[i], paths[n_before_test + k]) for k, i in enumerate(planted)}
    assert all(p["cosine"] == pytest.approx(1.0, abs=1e-5) and not p["same_patient"] for p in dup["closest"][:3])
    assert dup["closest"][3]["cosine"] < dup["threshold"] < 1.0
    assert dup["images"] == {"train-val": 60, "train-test": 83, "val-test": 83}


def test_the_threshold_is_a_quantile_of_within_patient_pairs_of_train_and_val_only(tmp_path):
    close, _, _ = leaky_cache(tmp_path / "close.h5", train_noise=0.3)
    far, _, _ = leaky_cache(tmp_path / "far.h5", train_noise=0.6)
    test_moved, _, _ = leaky_cache(tmp_path / "test_moved.h5", train_noise=0.3, test_noise=0.05)
    thresholds = {}
    for name, cache in (("close", close), ("far", far), ("test_moved", test_moved)):
        data = cache.read("features", "splits", "patients")
        X = analysis.unit_embeddings(data["features"], data["splits"])
        thresholds[name] = analysis.duplicate_threshold(X, data["patients"], data["splits"])
        expected = np.quantile(_sibling_cosines(cache), analysis.WITHIN_PATIENT_QUANTILE)
        assert thresholds[name]["threshold"] == pytest.approx(expected, abs=1e-5)
        assert thresholds[name]["within_patient_images"] == 300
    assert thresholds["far"]["threshold"] < thresholds["close"]["threshold"] - 0.05  # moving the pairs moves it
    # Test images never steer it: their siblings moved, the threshold did not (the test split's own
    # standardization statistics are train's, so the train and val embeddings are the same).
    assert thresholds["test_moved"]["threshold"] == pytest.approx(thresholds["close"]["threshold"], abs=1e-6)


def test_blocks_stay_bounded_and_give_the_same_answer(tmp_path, monkeypatch):
    cache, _, _ = leaky_cache(tmp_path / "c.h5")
    whole = analysis.near_duplicates(cache)
    shapes, patient_blocks = [], []
    real, real_blocks = knn.similarity_blocks, analysis._patient_blocks

    def spy(train, queries, block_bytes=None):
        for start, block in real(train, queries, block_bytes):
            shapes.append(tuple(block.shape))
            yield start, block

    def spy_patients(order, codes, block_rows):
        for rows in real_blocks(order, codes, block_rows):
            patient_blocks.append(len(rows))
            yield rows

    monkeypatch.setattr(knn, "similarity_blocks", spy)
    monkeypatch.setattr(analysis, "_patient_blocks", spy_patients)
    monkeypatch.setattr(knn, "BLOCK_BYTES", 5 * 240 * 4)  # five queries against the 240 train rows at a time
    monkeypatch.setattr(analysis, "PATIENT_BLOCK_ROWS", 7)  # three patients (six rows) a block
    small = analysis.near_duplicates(cache)
    assert max(rows * cols for rows, cols in shapes) <= 5 * 240 and sum(rows for rows, _ in shapes) == 60 + 83 + 83
    assert max(patient_blocks) == 6 and sum(patient_blocks) == 240 + 60
    assert small["threshold"] == pytest.approx(whole["threshold"], abs=1e-6)
    assert small["pairs_above"] == whole["pairs_above"]
    # The same pairs; the three copies tie at cosine 1 up to float rounding, so their order may differ.
    assert {(p["a"], p["b"]) for p in small["closest"]} == {(p["a"], p["b"]) for p in whole["closest"]}
    assert [p["cosine"] for p in small["closest"]] == pytest.approx([p["cosine"] for p in whole["closest"]])


def test_patient_blocks_keep_patients_whole():
    codes = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 4])
    order = np.argsort(codes, kind="stable")
    blocks = list(analysis._patient_blocks(order, codes, 4))
    assert [codes[b].tolist() for b in blocks] == [[0, 0, 0, 1], [2, 2], [3, 3, 3, 3, 3], [4]]


def test_too_few_within_patient_pairs_fall_back_to_the_fixed_cosine():
    X = knn.l2_rows(np.random.default_rng(0).normal(size=(30, 4)))
    patients = np.array(["a", "a"] + [f"p{i}" for i in range(28)])
    out = analysis.duplicate_threshold(X, patients, np.array(["train"] * 30))
    assert out["threshold"] == analysis.DUPLICATE_COSINE and out["within_patient_images"] == 2
    assert "fixed cosine" in out["rule"]
