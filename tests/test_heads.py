from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from featcache.cache import CacheWriter
from featcache.errors import UserError
from featcache.heads import DEFAULT_C_GRID, fit_head
from featcache.manifest import Manifest


def synthetic_cache(path, *, sizes=None, dim=32, shift=0.8, seed=0, classes=("NORMAL", "PNEUMONIA")):
    """A complete cache of Gaussian features whose class means differ by ``shift``."""
    sizes = sizes or {"train": 300, "val": 120, "test": 150}
    rng = np.random.default_rng(seed)
    paths, labels, splits, patients, feats = [], [], [], [], []
    for split, n in sizes.items():
        y = (rng.random(n) < 0.65).astype(int)
        labels += y.tolist()
        splits += [split] * n
        paths += [f"{split}/{classes[c]}/{split}{i}.png" for i, c in enumerate(y)]
        patients += [f"{split}/p{i // 2}" for i in range(n)]
        x = rng.normal(size=(n, dim))
        x[:, :4] += shift * y[:, None]
        feats.append(x)
    n = len(paths)
    manifest = Manifest(root="/synthetic", layout="splits", classes=tuple(classes), paths=tuple(paths),
                        labels=tuple(labels), splits=tuple(splits), patients=tuple(patients),
                        sizes=(0,) * n, mtimes_ns=(0,) * n)
    writer = CacheWriter(path, manifest, feature_dim=dim,
                         attrs={"classes": list(classes), "backbone": "synthetic", "weights": "none:seed=0",
                                "fingerprint": "0" * 64, "fingerprint_inputs": {}})
    writer.write(np.arange(n), np.concatenate(feats).astype(np.float32))
    writer.finish()
    return path


def test_fit_head_writes_metrics_plots_and_a_safe_head(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    run = tmp_path / "run"
    metrics = fit_head(cache, run)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("classes", "positive_class", "threshold", "selected", "fit_seconds", "val", "test"):
        assert key in on_disk
    assert on_disk["positive_class"] == "PNEUMONIA" and on_disk["threshold"] == 0.5
    assert on_disk["selected"]["C"] in DEFAULT_C_GRID
    for split, n in (("val", 120), ("test", 150)):
        m = on_disk[split]
        assert m["n"] == n and sum(map(sum, m["confusion_matrix"])) == n
        assert set(m) >= {"accuracy", "balanced_accuracy", "auroc", "sensitivity", "specificity", "precision", "f1"}
        assert m["auroc"] > 0.85  # a 0.8-sigma shift on four dimensions is easy to find
    for png in ("roc.png", "confusion_matrix.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    head = torch.load(run / "head.pt", weights_only=True)
    assert head["state_dict"]["coef"].shape == (1, 32)
    assert json.loads(head["config"])["selected"] == on_disk["selected"]


def test_selection_is_on_validation_and_best_by_auroc(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    metrics = fit_head(cache, tmp_path / "run")
    best = max(c["val_auroc"] for c in metrics["candidates"])
    chosen = [c for c in metrics["candidates"] if c["C"] == metrics["selected"]["C"]][0]
    assert chosen["val_auroc"] == best
    assert metrics["val"]["auroc"] == pytest.approx(best)


def test_test_labels_never_steer_any_choice(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    first = fit_head(cache, tmp_path / "a", threshold="youden")
    with h5py.File(cache, "r+") as f:
        splits = f["splits"].asstr()[()]
        rows = np.flatnonzero(splits == "test")
        labels = f["labels"][()]
        labels[rows] = np.random.default_rng(5).permutation(labels[rows])
        labels[rows[:20]] = 1 - labels[rows[:20]]
        f["labels"][...] = labels
    second = fit_head(cache, tmp_path / "b", threshold="youden")
    for key in ("selected", "threshold", "candidates", "val"):
        assert first[key] == second[key]
    assert first["test"] != second["test"]


@pytest.mark.parametrize("rule", ["youden", "f1", "0.3"])
def test_threshold_rules_are_applied(tmp_path, rule):
    cache = synthetic_cache(tmp_path / "c.h5")
    metrics = fit_head(cache, tmp_path / "run", threshold=rule, class_weight="balanced", C=0.1)
    assert metrics["selected"] == {"head": "logistic", "C": 0.1, "class_weight": "balanced"}
    if rule == "0.3":
        assert metrics["threshold"] == 0.3 and metrics["threshold_rule"] == "fixed"
    else:
        assert 0 < metrics["threshold"] < 1 and metrics["threshold_rule"] == rule


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cache not found"):
        fit_head(tmp_path / "missing.h5", tmp_path / "run")
    no_val = synthetic_cache(tmp_path / "noval.h5", sizes={"train": 50, "test": 20})
    with pytest.raises(UserError, match="has no val split"):
        fit_head(no_val, tmp_path / "run")
    three = synthetic_cache(tmp_path / "three.h5")
    with h5py.File(three, "r+") as f:
        f.attrs["classes"] = json.dumps(["A", "B", "C"])
    with pytest.raises(UserError, match="3 classes"):
        fit_head(three, tmp_path / "run")
    with pytest.raises(UserError, match="--threshold"):
        fit_head(no_val, tmp_path / "run", threshold="best")
    with pytest.raises(UserError, match="class-weight"):
        fit_head(no_val, tmp_path / "run", class_weight="auto")
