from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from featcache.cache.h5 import write_cache
from featcache.errors import UserError
from featcache.fit import fit_head
from featcache.heads.base import LinearHead
from featcache.heads.logistic import DEFAULT_C_GRID


def synthetic_cache(path, *, sizes=None, dim=32, shift=0.8, seed=0, classes=("NORMAL", "PNEUMONIA")):
    """A complete cache of Gaussian features; class k's mean is moved by ``shift`` on dims 4k..4k+3."""
    sizes = sizes or {"train": 300, "val": 120, "test": 150}
    rng = np.random.default_rng(seed)
    paths, labels, splits, patients, feats = [], [], [], [], []
    k = len(classes)
    prior = [0.35, 0.65] if k == 2 else [1 / k] * k
    for split, n in sizes.items():
        y = rng.choice(k, size=n, p=prior)
        labels += y.tolist()
        splits += [split] * n
        paths += [f"{split}/{classes[c]}/{split}{i}.png" for i, c in enumerate(y)]
        patients += [f"{split}/p{i // 2}" for i in range(n)]
        x = rng.normal(size=(n, dim))
        for c in range(1, k):
            x[y == c, 4 * (c - 1) : 4 * c] += shift
        feats.append(x)
    write_cache(path, blocks=[np.concatenate(feats)], n_rows=len(paths), feature_dim=dim, labels=labels,
                paths=paths, splits=splits, patients=patients,
                attrs={"classes": list(classes), "backbone": "synthetic", "weights": "none:seed=0",
                       "fingerprint": "0" * 64, "fingerprint_inputs": {}})
    return path


def test_fit_head_writes_metrics_plots_and_a_safe_head(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    run = tmp_path / "run"
    metrics = fit_head(cache, run)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("classes", "positive_class", "threshold", "selected", "fit_seconds", "val", "test", "n_heads",
                "heads"):
        assert key in on_disk
    assert on_disk["positive_class"] == "PNEUMONIA" and on_disk["threshold"] == 0.5
    assert on_disk["selected"]["C"] in DEFAULT_C_GRID
    for split, n in (("val", 120), ("test", 150)):
        m = on_disk[split]
        assert m["n"] == n and sum(map(sum, m["confusion_matrix"])) == n
        assert set(m) >= {"accuracy", "balanced_accuracy", "auroc", "sensitivity", "specificity", "precision", "f1"}
        assert m["auroc"] > 0.75  # Bayes-optimal AUROC of a 0.8-sigma shift on four dimensions is 0.87
    for png in ("roc.png", "confusion_matrix.png", "pr.png", "reliability.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    payload = torch.load(run / "head.pt", weights_only=True)
    assert payload["head"]["weight"].shape == (32, 2)
    assert json.loads(payload["config"])["selected"] == on_disk["selected"]


def test_selection_is_on_validation_and_best_by_auroc(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    metrics = fit_head(cache, tmp_path / "run")
    assert metrics["n_heads"] == len(DEFAULT_C_GRID) == len(metrics["heads"])
    best = max(c["val_auroc"] for c in metrics["heads"])
    chosen = [c for c in metrics["heads"] if c["name"] == metrics["selected"]["name"]][0]
    assert chosen["val_auroc"] == best
    assert metrics["val"]["auroc"] == pytest.approx(best)


@pytest.mark.parametrize("heads", ["logistic", "sweep", "knn", "mlp"])
def test_test_labels_never_steer_any_choice(tmp_path, heads):
    cache = synthetic_cache(tmp_path / "c.h5")
    first = fit_head(cache, tmp_path / "a", threshold="youden", heads=heads, n_resamples=50)
    with h5py.File(cache, "r+") as f:
        splits = f["splits"].asstr()[()]
        rows = np.flatnonzero(splits == "test")
        labels = f["labels"][()]
        labels[rows] = np.random.default_rng(5).permutation(labels[rows])
        labels[rows[:20]] = 1 - labels[rows[:20]]
        f["labels"][...] = labels
    second = fit_head(cache, tmp_path / "b", threshold="youden", heads=heads, n_resamples=50)
    for key in ("selected", "threshold", "heads", "val"):
        assert first[key] == second[key]
    assert first["test"] != second["test"]


@pytest.mark.parametrize("rule", ["youden", "f1", "0.3"])
def test_threshold_rules_are_applied(tmp_path, rule):
    cache = synthetic_cache(tmp_path / "c.h5")
    metrics = fit_head(cache, tmp_path / "run", threshold=rule, class_weight="balanced", C=0.1)
    assert metrics["selected"] == {"head": "logistic", "name": "logistic_C_0.1_cw_balanced", "C": 0.1,
                                   "class_weight": "balanced", "norm": "standard"}
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
    single = synthetic_cache(tmp_path / "single.h5")
    with h5py.File(single, "r+") as f:
        splits = f["splits"].asstr()[()]
        labels = f["labels"][()]
        labels[splits == "val"] = 1
        f["labels"][...] = labels
    with pytest.raises(UserError, match="val split .* holds a single class"):
        fit_head(single, tmp_path / "run")
    with pytest.raises(UserError, match="unknown head 'forest'"):
        fit_head(no_val, tmp_path / "run", heads="forest")
    with pytest.raises(UserError, match="--sampler"):
        fit_head(no_val, tmp_path / "run", sampler="weighted")
    with pytest.raises(UserError, match="--threshold"):
        fit_head(no_val, tmp_path / "run", threshold="best")
    with pytest.raises(UserError, match="class-weight"):
        fit_head(no_val, tmp_path / "run", class_weight="auto")


def test_sweep_trains_dozens_of_heads_and_matches_logistic(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", sizes={"train": 600, "val": 300, "test": 300}, shift=0.5)
    logistic = fit_head(cache, tmp_path / "lr", n_resamples=0)
    sweep = fit_head(cache, tmp_path / "sw", heads="sweep", n_resamples=0)
    assert sweep["n_heads"] == 64 and len({h["name"] for h in sweep["heads"]}) == 64
    names = {h["name"] for h in sweep["heads"]}
    assert "lr_0.01_wd_0.0001_cw_balanced_norm_l2" in names
    assert {h["norm"] for h in sweep["heads"]} == {"standard", "l2"}
    assert sweep["val"]["auroc"] >= logistic["val"]["auroc"] - 0.01
    best = max(h["val_auroc"] for h in sweep["heads"])
    tied = [h for h in sweep["heads"] if round(h["val_auroc"], 12) == round(best, 12)]
    strongest = max(tied, key=lambda h: (h["weight_decay"], -h["lr"]))
    assert sweep["selected"]["name"] == strongest["name"]


def test_exported_heads_reproduce_their_scores(tmp_path):
    from featcache.cache.h5 import FeatureCache
    from featcache.heads.logistic import LogisticHead
    from featcache.heads.sweep import LinearHeadSweep, sweep_grid

    cache = FeatureCache.open(synthetic_cache(tmp_path / "c.h5"))
    X, y, _ = cache.arrays("train")
    Xv, _, _ = cache.arrays("val")
    logistic = LogisticHead(C=0.3).fit(X, y)
    assert np.allclose(logistic.export(2).predict_proba(Xv), logistic.predict_proba(Xv), atol=1e-5)
    grid = sweep_grid(lrs=(0.03, 0.1), weight_decays=(1e-3,), class_weights=("none",))
    sweep = LinearHeadSweep(grid, epochs=3).fit(X, y, 2)
    probs = sweep.predict_proba(Xv)
    for i, config in enumerate(sweep.order_):
        head = sweep.export(config)
        assert np.allclose(head.predict_proba(Xv), probs[i], atol=1e-5)
        again = LinearHead.from_state_dict(head.state_dict())
        assert np.allclose(again.predict_proba(Xv), probs[i], atol=1e-5)


def test_balanced_sampler_and_class_weights_raise_minority_sensitivity(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", sizes={"train": 400, "val": 200, "test": 200}, shift=0.6)
    plain = fit_head(cache, tmp_path / "a", heads="sweep", class_weight="none", n_resamples=0)
    sampled = fit_head(cache, tmp_path / "b", heads="sweep", class_weight="none", sampler="balanced",
                       n_resamples=0)
    assert plain["n_heads"] == sampled["n_heads"] == 32
    assert sampled["selected"]["sampler"] == "balanced"
    # NORMAL (35 %) is the minority; equal class sampling moves the 0.5 threshold toward it.
    assert sampled["val"]["specificity"] > plain["val"]["specificity"]


def test_target_sensitivity_is_met_on_validation(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    metrics = fit_head(cache, tmp_path / "run", target_sensitivity=0.95, n_resamples=0)
    assert metrics["threshold_rule"] == "sensitivity>=0.95"
    assert metrics["val"]["sensitivity"] >= 0.95


def test_confidence_intervals_contain_the_estimates(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    metrics = fit_head(cache, tmp_path / "run", n_resamples=300)
    for split in ("val", "test"):
        ci = metrics[split]["ci"]
        assert ci["unit"] == "patient" and ci["resamples"] == 300 and ci["level"] == 0.95
        for name in ("auroc", "sensitivity", "specificity", "accuracy"):
            lo, hi = ci[name]
            assert lo <= metrics[split][name] <= hi and hi - lo < 0.3
        assert 0 <= metrics[split]["brier"] <= 1 and 0 <= metrics[split]["ece"] <= 1


@pytest.mark.parametrize("heads", ["logistic", "sweep"])
def test_three_classes(tmp_path, heads):
    cache = synthetic_cache(tmp_path / "c.h5", classes=("BACTERIA", "NORMAL", "VIRUS"), shift=1.5)
    metrics = fit_head(cache, tmp_path / "run", heads=heads, n_resamples=100)
    assert metrics["positive_class"] is None and metrics["threshold"] is None
    assert metrics["threshold_rule"] == "argmax"
    test = metrics["test"]
    assert np.array(test["confusion_matrix"]).shape == (3, 3)
    assert set(test["per_class"]) == {"BACTERIA", "NORMAL", "VIRUS"}
    assert test["auroc"] == pytest.approx(np.mean([m["auroc"] for m in test["per_class"].values()]))
    assert test["auroc"] > 0.8 and "ci" in test


def test_several_caches_give_one_comparison(tmp_path):
    from featcache.fit import fit_heads

    a = synthetic_cache(tmp_path / "a.h5", shift=0.4)
    b = synthetic_cache(tmp_path / "b.h5", shift=1.2, seed=1)
    rows = fit_heads([str(a), str(b)], tmp_path / "cmp", n_resamples=50)
    assert [r["run"] for r in rows] == ["a", "b"]
    assert rows[1]["test_auroc"] > rows[0]["test_auroc"]
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text()) == json.loads(json.dumps(rows))
    assert (tmp_path / "cmp" / "a" / "metrics.json").exists() and (tmp_path / "cmp" / "b" / "head.pt").exists()


@pytest.mark.parametrize("classes", [("NORMAL", "PNEUMONIA"), ("BACTERIA", "NORMAL", "VIRUS")])
def test_exported_logistic_head_is_scikit_learns_model(tmp_path, classes):
    """head.pt's softmax must give scikit-learn's probabilities: for 3+ classes only a multinomial fit does."""
    from featcache.cache.h5 import FeatureCache
    from featcache.heads.logistic import LogisticHead

    cache = FeatureCache.open(synthetic_cache(tmp_path / "c.h5", classes=classes, shift=1.0))
    X, y, _ = cache.arrays("train")
    Xv, _, _ = cache.arrays("val")
    for C in (0.01, 1.0):
        head = LogisticHead(C=C).fit(X, y)
        exported = head.export(len(classes)).predict_proba(Xv)
        assert np.allclose(exported, head.model_.predict_proba(head.norm_.transform(Xv)), atol=1e-5)
        assert np.allclose(exported, head.predict_proba(Xv), atol=1e-5)


def test_threads_follow_the_problem_size_and_the_free_cores():
    from featcache.heads.sweep import MIN_MACS_PER_THREAD, choose_threads

    default_grid_512d = 2 * 64 * 256 * 512 * 2  # multiply-adds of one step of --heads sweep on resnet18 features
    assert choose_threads(default_grid_512d, cores=2, busy=0) == 2
    assert choose_threads(default_grid_512d, cores=2, busy=1) == 1  # a busy neighbour takes a core
    assert choose_threads(default_grid_512d, cores=2, busy=3) == 1
    assert choose_threads(default_grid_512d, cores=16, busy=0) == 16
    assert choose_threads(8 * MIN_MACS_PER_THREAD, cores=16, busy=0) == 8  # no more threads than the work can use
    assert choose_threads(default_grid_512d, cores=16, busy=14) == 2
    assert choose_threads(2 * 1 * 256 * 64 * 2, cores=2, busy=0) == 1  # one head on 64-d: too little to split
    assert choose_threads(default_grid_512d, cores=2, busy=0, limit=1) == 1  # OMP_NUM_THREADS=1 is kept


@pytest.mark.parametrize("busy, inside", [([0, 0], [2, 2]), ([1, 1], [1, 1]), ([0, 1], [2, 1])])
def test_sweep_sets_torch_threads_for_the_fit_and_restores_them(monkeypatch, busy, inside):
    """Two free cores: two threads; a busy core, from the start or from the second epoch on: one."""
    import featcache.heads.sweep as heads

    X = np.random.default_rng(0).normal(size=(600, 512)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    readings = iter(busy)
    monkeypatch.setattr(heads, "cpu_cores", lambda: 2, raising=False)
    monkeypatch.setattr(heads, "busy_cores", lambda: next(readings, busy[-1]), raising=False)
    seen = []
    randperm = torch.randperm

    def spy(*args, **kwargs):  # called once an epoch, inside the training loop
        seen.append(torch.get_num_threads())
        return randperm(*args, **kwargs)

    monkeypatch.setattr(torch, "randperm", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sweep = heads.LinearHeadSweep(heads.sweep_grid(), epochs=2).fit(X, y, 2)
        assert seen == inside and sweep.threads_ == inside
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="same number of heads"):
            heads.LinearHeadSweep(heads.sweep_grid()[:-1], epochs=1).fit(X, y, 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_busy_neighbour_is_seen_as_a_busy_core():
    import subprocess
    import sys
    import time

    from featcache.heads.sweep import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores() >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_the_positive_class_is_a_setting(tmp_path):
    from featcache.eval.metrics import positive_class_index

    assert positive_class_index(["NORMAL", "PNEUMONIA"]) == 1  # the default name, wherever it sorts
    assert positive_class_index(["PNEUMONIA", "ZEBRA"]) == 0
    assert positive_class_index(["benign", "malignant"]) == 1  # no such name: the last class
    assert positive_class_index(["benign", "malignant"], "benign") == 0
    with pytest.raises(UserError, match="--positive-class tumour is not a class here"):
        positive_class_index(["benign", "malignant"], "tumour")

    cache = synthetic_cache(tmp_path / "c.h5")
    default = fit_head(cache, tmp_path / "a", C=0.1, n_resamples=0)
    flipped = fit_head(cache, tmp_path / "b", C=0.1, n_resamples=0, positive_class="NORMAL")
    assert (default["positive_class"], flipped["positive_class"]) == ("PNEUMONIA", "NORMAL")
    # The same head at threshold 0.5, scored from the other side: sensitivity and specificity trade places.
    assert flipped["test"]["sensitivity"] == pytest.approx(default["test"]["specificity"])
    assert flipped["test"]["specificity"] == pytest.approx(default["test"]["sensitivity"])
    assert flipped["test"]["auroc"] == pytest.approx(default["test"]["auroc"])


def test_every_head_kind_is_registered_and_head_pt_records_its_kind(tmp_path):
    from featcache.heads import HEADS, Head
    from featcache.predict import load_run

    assert list(HEADS) == ["logistic", "sweep", "knn", "mlp"]
    assert all(issubclass(cls, Head) and cls.kind == name and cls.help for name, cls in HEADS.items())
    cache = synthetic_cache(tmp_path / "c.h5")
    X = np.random.default_rng(1).normal(size=(7, 32))
    for kind in HEADS:
        run = tmp_path / kind
        fit_head(cache, run, heads=kind, n_resamples=0, epochs=2)
        payload = torch.load(run / "head.pt", weights_only=True)
        assert payload["kind"] == payload["head"]["kind"] == kind
        head, config = load_run(run)
        assert isinstance(head, HEADS[kind]) and config["selected"]["head"] == kind
        # A head.pt written before kinds were recorded loads as the kind its config selected.
        payload.pop("kind")
        payload["head"].pop("kind")
        torch.save(payload, run / "head.pt")
        legacy, _ = load_run(run)
        assert isinstance(legacy, HEADS[kind])
        assert np.allclose(legacy.predict_proba(X), head.predict_proba(X))


@pytest.mark.parametrize("kind", ["standard", "l2"])
def test_feature_statistics_are_computed_without_a_copy_of_the_features(kind):
    import tracemalloc

    from featcache.heads.base import FeatureNorm

    X = np.random.default_rng(0).normal(2.0, 3.0, size=(100_000, 32)).astype(np.float32)
    tracemalloc.start()
    norm = FeatureNorm(kind).fit(X)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < X.nbytes  # a 100,000-row set is not copied (in float64, twice its size) to be summarized
    Z = X.astype(np.float64)
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True) if kind == "l2" else Z
    np.testing.assert_allclose(norm.mean_, Z.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(norm.scale_, Z.std(axis=0), rtol=1e-10)
