"""Multi-label heads: policies for uncertain and unmentioned labels at fit time, masked training of every label at
once, the choice by mean validation AUROC and a threshold per label on validation, per-label metrics with patient
CIs, labels joined from another source by path, and predict's column per label."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch

from featcache.cache.h5 import FeatureCache, write_cache
from featcache.cli import main
from featcache.data.labels import apply_policy
from featcache.data.sources import read_manifest
from featcache.eval.metrics import COMPETITION_LABELS, choose_threshold, evaluate_multilabel, multilabel_summary
from featcache.errors import UserError
from featcache.eval.rundir import RunRecord
from featcache.fit import fit_head, multilabel_score
from featcache.heads import LinearHeadSweep, LogisticHead, knn
from featcache.heads.sweep import HeadConfig
from helpers import CHEXPERT_HEADER, flat, make_chexpert, write_csv

NAMES = list(CHEXPERT_HEADER[5:])


def chexpert_cache(tmp_path, *, signal: float = 1.5, seed: int = 0):
    """A CheXpert fixture's manifest (labels, paths, patients, splits as read) over Gaussian features in which
    each observation's positives, and half as far its uncertain cases, are moved along a dimension of its own."""
    folder = make_chexpert(tmp_path, n_train_patients=70, n_valid_patients=20, seed=seed)
    m = read_manifest(folder, format="chexpert")
    labels = np.asarray(m.labels)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(len(m), len(NAMES) + 2))
    X[:, : len(NAMES)] += signal * (labels == 1) + 0.5 * signal * (labels == -1)
    path = write_cache(tmp_path / "cx.h5", blocks=[X], n_rows=len(m), feature_dim=X.shape[1], labels=labels,
                       paths=m.paths, splits=m.splits, patients=m.patients,
                       attrs={"task": "multilabel", "label_names": NAMES, "backbone": "synthetic",
                              "weights": "none:seed=0", "fingerprint": "0" * 64, "fingerprint_inputs": {}})
    return path, m


def single_label_cache(path):
    """Two classes, 20 train and 20 val images, the class moving every feature."""
    y = np.arange(40) % 2
    return write_cache(path, blocks=[np.random.default_rng(0).normal(size=(40, 4)) + y[:, None]], n_rows=40,
                       feature_dim=4, labels=y, paths=[f"{i}.png" for i in range(40)],
                       splits=["train"] * 20 + ["val"] * 20, patients=[str(i) for i in range(40)],
                       attrs={"classes": ["A", "B"], "backbone": "synthetic", "weights": "none:seed=0",
                              "fingerprint": "0" * 64, "fingerprint_inputs": {}})


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_policies_turn_labels_as_read_into_targets():
    read = np.array([[1, 0, -1, -2]], dtype=np.int8)
    nan = np.nan
    expected = {("ignore", "negative"): [1, 0, nan, 0], ("ones", "negative"): [1, 0, 1, 0],
                ("zeros", "negative"): [1, 0, 0, 0], ("ignore", "ignore"): [1, 0, nan, nan],
                ("ones", "ignore"): [1, 0, 1, nan]}
    for (uncertain, unmentioned), row in expected.items():
        got = apply_policy(read, uncertain, unmentioned)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got[0], np.array(row, dtype=np.float32))


def test_multilabel_metrics_match_scikit_learn_on_the_known_rows():
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    rng = np.random.default_rng(1)
    names = [*COMPETITION_LABELS, "Fracture"]
    targets = (rng.random((300, 6)) < 0.3).astype(np.float64)
    probs = np.clip(0.3 * targets + rng.random((300, 6)) * 0.8, 0, 1)
    targets[rng.random((300, 6)) < 0.25] = np.nan
    thresholds = [0.3, 0.4, 0.5, 0.6, 0.45, 0.35]
    m = multilabel_summary(targets, probs, names=names, thresholds=thresholds)
    aurocs = []
    for j, name in enumerate(names):
        known = ~np.isnan(targets[:, j])
        y, s = targets[known, j].astype(int), probs[known, j]
        got = m["per_label"][name]
        aurocs.append(roc_auc_score(y, s))
        assert got["auroc"] == pytest.approx(aurocs[-1])
        assert got["average_precision"] == pytest.approx(average_precision_score(y, s))
        assert got["f1"] == pytest.approx(f1_score(y, s >= thresholds[j]))
        assert got["sensitivity"] == pytest.approx(np.mean(s[y == 1] >= thresholds[j]))
        assert got["specificity"] == pytest.approx(np.mean(s[y == 0] < thresholds[j]))
        assert (got["n_positive"], got["n_negative"]) == (int(y.sum()), int((1 - y).sum()))
    known = ~np.isnan(targets)
    assert m["auroc"] == pytest.approx(np.mean(aurocs))
    assert m["micro_auroc"] == pytest.approx(roc_auc_score(targets[known].astype(int), probs[known]))
    assert m["competition_auroc"] == pytest.approx(np.mean(aurocs[:5]))
    assert "competition_auroc" not in multilabel_summary(targets[:, 1:], probs[:, 1:], names=names[1:],
                                                         thresholds=thresholds[1:])
    patients = [f"p{i // 3}" for i in range(300)]
    with_ci = evaluate_multilabel(targets, probs, names=names, thresholds=thresholds, patients=patients,
                                  n_resamples=60, seed=0)
    assert with_ci["ci"]["unit"] == "patient" and with_ci["ci"]["patients"] == 100
    for key in ("auroc", "micro_auroc", "competition_auroc", "average_precision", "sensitivity", "specificity"):
        lo, hi = with_ci["ci"][key]
        assert lo <= with_ci[key] <= hi
    for name in names:
        per = with_ci["per_label"][name]
        assert set(per["ci"]) == {"auroc", "average_precision", "sensitivity", "specificity", "f1"}
        assert per["ci"]["auroc"][0] <= per["auroc"] <= per["ci"]["auroc"][1]


def _targets(rng, n=240, labels=3):
    X = rng.normal(size=(n, 8)).astype(np.float32)
    Y = (X[:, :labels] + 0.7 * rng.normal(size=(n, labels)) > 0.4).astype(np.float32)
    Y[rng.random((n, labels)) < 0.3] = np.nan
    return X, Y


def test_sweep_trains_each_label_on_its_known_entries_only():
    X, Y = _targets(np.random.default_rng(2))
    configs = [HeadConfig(0.1, 1e-3, cw, norm) for norm in ("standard", "l2") for cw in ("none", "balanced")]

    def fitted(targets):
        return LinearHeadSweep(configs, epochs=3, batch_size=64).fit(X, targets, targets.shape[1])

    base = fitted(Y)
    assert base.W_.shape == (2, 8, 2, 3) and base.b_.shape == (2, 1, 2, 3)
    other = Y.copy()
    other[:, 1] = 1.0 - np.nan_to_num(Y[:, 1], nan=1.0)  # another label's targets and mask changed
    np.testing.assert_array_equal(fitted(other).W_[..., [0, 2]], base.W_[..., [0, 2]])
    filled = Y.copy()
    filled[np.isnan(filled[:, 0]), 0] = 1.0  # label 0's unknown entries given a value
    assert not np.allclose(fitted(filled).W_[..., 0], base.W_[..., 0])
    probs = base.predict_proba(X)
    assert probs.shape == (4, 240, 3) and not np.allclose(probs.sum(axis=2), 1.0)
    head = base.export(configs[3])
    assert head.multilabel and head.state_dict()["task"] == "multilabel"
    np.testing.assert_allclose(head.predict_proba(X), probs[3], atol=1e-6)


def test_logistic_fits_one_regression_per_label_on_its_known_rows():
    from sklearn.linear_model import LogisticRegression

    X, Y = _targets(np.random.default_rng(3))
    head = LogisticHead(C=0.1, class_weight="balanced").fit(X, Y)
    Z = head.norm.transform(X)
    for j in range(Y.shape[1]):
        known = ~np.isnan(Y[:, j])
        ref = LogisticRegression(C=0.1, class_weight="balanced", solver="newton-cholesky").fit(Z[known],
                                                                                                Y[known, j])
        np.testing.assert_allclose(head.predict_proba(X)[:, j], ref.predict_proba(Z)[:, 1], atol=1e-4)
    loaded = LogisticHead.from_state_dict(head.export().state_dict())
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("heads", ["logistic", "sweep"])
def test_fit_head_fits_every_label_and_chooses_on_validation(tmp_path, heads):
    cache, m = chexpert_cache(tmp_path)
    run = tmp_path / "run"
    metrics = fit_head(cache, run, heads=heads, threshold="youden", epochs=5, n_resamples=50)
    assert metrics["task"] == "multilabel" and metrics["classes"] == NAMES
    assert metrics["policy"] == {"uncertain": "ignore", "unmentioned": "negative"}
    best = max(h["val_auroc"] for h in metrics["heads"])
    chosen = [h for h in metrics["heads"] if h["name"] == metrics["selected"]["name"]][0]
    assert chosen["val_auroc"] == best and metrics["val"]["auroc"] == pytest.approx(best)
    head, config = RunRecord(run).read_head()
    assert config["task"] == "multilabel" and config["thresholds"] == metrics["thresholds"]
    payload = torch.load(run / "head.pt", weights_only=True)
    assert payload["head"]["weight"].shape == (len(NAMES) + 2, len(NAMES))
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r["split"] == "val"]
    probs = np.array([[float(r[f"p_{n}"]) for n in NAMES] for r in val])
    targets = np.array([[float(r[f"y_{n}"]) if r[f"y_{n}"] else np.nan for n in NAMES] for r in val])
    for j, name in enumerate(NAMES):  # one threshold per label, by the rule, on validation's known rows
        known = ~np.isnan(targets[:, j])
        y = targets[known, j].astype(bool)
        if y.any() and not y.all():
            assert metrics["thresholds"][name] == pytest.approx(choose_threshold(y, probs[known, j], "youden"),
                                                                abs=1e-5)
    test = metrics["test"]
    assert test["n"] == m.splits.count("test") and test["competition_auroc"] > 0.7
    assert set(test["per_label"]["Edema"]) >= {"auroc", "average_precision", "sensitivity", "specificity", "f1",
                                               "n_positive", "n_negative", "threshold", "ci"}
    assert (run / "roc_grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("heads", ["logistic", "sweep", "knn", "mlp"])
def test_multilabel_test_labels_never_steer_a_choice(tmp_path, heads):
    """For knn the choice is k and T, for mlp width x wd x lr and the epoch: each by mean validation AUROC."""
    import h5py

    cache, _ = chexpert_cache(tmp_path)
    first = fit_head(cache, tmp_path / "a", heads=heads, threshold="f1", epochs=3, n_resamples=0)
    with h5py.File(cache, "r+") as f:
        rows = np.flatnonzero(f["splits"].asstr()[()] == "test")
        labels = f["labels"][()]
        labels[rows] = labels[np.random.default_rng(0).permutation(rows)]
        f["labels"][...] = labels
    second = fit_head(cache, tmp_path / "b", heads=heads, threshold="f1", epochs=3, n_resamples=0)
    for key in ("selected", "thresholds", "heads"):
        assert first[key] == second[key]
    assert first["val"]["auroc"] == second["val"]["auroc"]
    assert first["test"]["per_label"] != second["test"]["per_label"]


def test_knn_averages_each_label_over_the_neighbours_that_know_it():
    sims = np.array([[0.9, 0.8, 0.1]], dtype=np.float32)
    targets, known = knn.vote_targets(np.array([[1, 0], [np.nan, 1], [0, np.nan]], dtype=np.float32), 2)
    probs = knn.vote_probabilities(sims, targets[None], [1, 2, 3], 0.1, None, known[None])[:, 0]
    w = np.exp(np.array([0.9, 0.8, 0.1]) / 0.1)
    assert np.allclose(probs[0], [1, 0])
    assert np.allclose(probs[1], [1, w[1] / (w[0] + w[1])])  # neighbour 2 does not know label 0: no vote there
    assert np.allclose(probs[2], [w[0] / (w[0] + w[2]), w[1] / (w[0] + w[1])])
    nobody = knn.vote_probabilities(sims[:, :1], targets[None, 1:2], [1], 0.1, None, known[None, 1:2])[0, 0]
    assert nobody[0] == knn.UNKNOWN_PROBABILITY and nobody[1] == 1.0

    X, Y = _targets(np.random.default_rng(4))
    head = knn.KnnHead(k=20, temperature=0.1).fit(X[:160], Y[:160], 3)
    probs = head.predict_proba(X[160:])
    assert probs.shape == (80, 3) and not np.allclose(probs.sum(axis=1), 1.0)
    assert multilabel_score(Y[160:], probs) > 0.7  # labels are thresholds of features 0-2: neighbours share them
    filled = Y[:160].copy()
    filled[np.isnan(filled[:, 0]), 0] = 1.0  # label 0's unknown entries given a value: only label 0 moves
    other = knn.KnnHead(k=20, temperature=0.1).fit(X[:160], filled, 3).predict_proba(X[160:])
    assert np.array_equal(other[:, 1:], probs[:, 1:]) and not np.allclose(other[:, 0], probs[:, 0])


def test_mlp_loss_is_masked_per_label_and_weighs_positives_as_the_sweep_does():
    from featcache.heads.base import positive_weight_vector
    from featcache.heads.mlp import MlpSweep, training_targets

    _, Y = _targets(np.random.default_rng(5), n=40)
    logits = torch.randn(2, 40, 3)
    target, weight, loss_of = training_targets(Y, 3, "balanced", "cpu")
    pos = positive_weight_vector(Y, "balanced")
    expected = 0.0
    for h in range(2):
        per_label = []
        for j in range(3):
            known = ~np.isnan(Y[:, j])
            y, z = torch.tensor(Y[known, j]), logits[h, known, j]
            w = torch.where(y == 1, float(pos[j]), 1.0)
            per_label.append((w * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).sum()
                             / w.sum())
        expected += torch.stack(per_label).mean()
    assert float(loss_of(logits, target, weight)) == pytest.approx(float(expected), rel=1e-5)
    flipped = target.clone()
    flipped[weight == 0] = 1.0 - flipped[weight == 0]  # what an unknown entry holds never reaches the loss
    assert float(loss_of(logits, flipped, weight)) == float(loss_of(logits, target, weight))

    X, Y = _targets(np.random.default_rng(6))
    grid = [{"width": 32, "weight_decay": 1e-4, "lr": 3e-2}]  # 160 rows: one step an epoch
    sweep = MlpSweep(grid, epochs=30).fit((X[:160], Y[:160]), (X[160:], Y[160:]), 3, multilabel_score)
    [(_, best, epoch, export)] = list(sweep.results())
    head = export()
    assert head.multilabel and best > 0.8 and 1 <= epoch <= 30
    assert multilabel_score(Y[160:], head.predict_proba(X[160:])) == pytest.approx(best, abs=1e-6)
    loaded = type(head).from_state_dict(head.state_dict())
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("heads", ["knn", "mlp"])
def test_probes_fit_every_label_under_the_policy_and_predict_reloads_them(tmp_path, heads):
    cache, m = chexpert_cache(tmp_path)
    runs = {p: fit_head(cache, tmp_path / p, heads=heads, uncertain=p, epochs=10, n_resamples=0)
            for p in ("ones", "ignore")}
    saved = {}
    for policy, metrics in runs.items():
        assert metrics["task"] == "multilabel" and set(metrics["thresholds"]) == set(NAMES)
        assert metrics["val"]["auroc"] == pytest.approx(max(h["val_auroc"] for h in metrics["heads"]), abs=1e-6)
        assert metrics["test"]["auroc"] > 0.7  # each label's positives are moved along a dimension of their own
        head, config = RunRecord(tmp_path / policy).read_head()  # knn: train rows and labels reread from the cache
        with open(tmp_path / policy / "predictions.csv") as f:
            val = [r for r in csv.DictReader(f) if r["split"] == "val"]
        X = FeatureCache.open(cache).arrays("val")[0]
        saved[policy] = np.array([[float(r[f"p_{n}"]) for n in NAMES] for r in val])
        np.testing.assert_allclose(head.predict_proba(X), saved[policy], atol=1e-5)
    assert not np.allclose(saved["ones"], saved["ignore"], atol=1e-3)  # uncertain as positive: another fit
    if heads == "knn":
        assert {h["class_weight"] for h in runs["ones"]["heads"]} == {"none"}
        assert torch.load(tmp_path / "ones" / "head.pt", weights_only=True)["head"]["uncertain"] == "ones"


def test_knn_on_a_multilabel_set_refuses_class_weighting_in_one_line(tmp_path, capsys):
    cache, _ = chexpert_cache(tmp_path)
    err = _one_line_error(["fit-head", cache, "--out", tmp_path / "r", "--heads", "knn", "--class-weight",
                           "balanced"], capsys)
    assert "--class-weight balanced does not apply to knn on a multi-label set" in err


def test_uncertain_policies_give_different_fits_from_one_cache(tmp_path, capsys):
    cache, m = chexpert_cache(tmp_path)
    before = _sha(cache)
    fits = {}
    for policy in ("ones", "ignore", "zeros"):
        out = tmp_path / policy
        assert main(["fit-head", str(cache), "--out", str(out), "--uncertain", policy, "--bootstrap", "20"]) == 0
        fits[policy] = json.loads((out / "metrics.json").read_text()), RunRecord(out).read_head()[0]
    shown = flat(capsys.readouterr().out)
    assert "competition" in shown and "uncertain: zeros, not mentioned: negative" in shown
    assert _sha(cache) == before  # every fit read the one cache; nothing was extracted or rewritten
    labels, splits = np.asarray(m.labels), np.asarray(m.splits)
    val = labels[splits == "val"]
    for j, name in enumerate(NAMES):
        counts = {p: (f[0]["val"]["per_label"][name]["n_positive"], f[0]["val"]["per_label"][name]["n_negative"])
                  for p, f in fits.items()}
        pos, neg, unc, blank = (int((val[:, j] == v).sum()) for v in (1, 0, -1, -2))
        assert counts == {"ones": (pos + unc, neg + blank), "ignore": (pos, neg + blank),
                          "zeros": (pos, neg + unc + blank)}
    assert {p: f[0]["policy"]["uncertain"] for p, f in fits.items()} == {p: p for p in fits}
    assert not np.allclose(fits["ones"][1].weight, fits["ignore"][1].weight)
    assert not np.allclose(fits["zeros"][1].weight, fits["ignore"][1].weight)
    ignored = fit_head(cache, tmp_path / "both", unmentioned="ignore", n_resamples=0)
    edema = NAMES.index("Edema")
    assert ignored["val"]["per_label"]["Edema"]["n_negative"] == int((val[:, edema] == 0).sum())


def test_fit_head_takes_labels_from_another_source_matched_by_path(tmp_path, capsys):
    cache, m = chexpert_cache(tmp_path)
    labels = np.asarray(m.labels)
    kept = [i for i in range(len(m)) if i % 5]  # every fifth image has no label in the new file
    rows = [[m.paths[i], *("1" if labels[i, j] == 1 else "0" for j in (NAMES.index("Edema"),
                                                                      NAMES.index("Cardiomegaly")))]
            for i in kept]
    rows.append(["CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg", "1", "0"])  # not in the cache
    new = write_csv(tmp_path / "relabelled.csv", ["path", "Oedema", "Big heart"], rows)
    before = _sha(cache)
    out = tmp_path / "run"
    assert main(["fit-head", str(cache), "--out", str(out), "--labels", str(new), "--format", "csv",
                 "--label-cols", "Oedema,Big heart", "--root", str(tmp_path), "--bootstrap", "20"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["Oedema", "Big heart"] and metrics["task"] == "multilabel"
    assert metrics["labels"]["matched"] == len(kept) and metrics["labels"]["dropped"] == len(m) - len(kept)
    splits = np.asarray(m.splits)[kept]
    assert metrics["val"]["n"] == int((splits == "val").sum()) and metrics["test"]["n"] == int((splits == "test").sum())
    edema = labels[kept, NAMES.index("Edema")][splits == "test"]
    assert metrics["test"]["per_label"]["Oedema"]["n_positive"] == int((edema == 1).sum())
    assert metrics["test"]["per_label"]["Oedema"]["auroc"] > 0.7  # the features carry Edema's signal
    assert _sha(cache) == before
    capsys.readouterr()
    # A single-label source relabels a multi-label cache as a two-class set.
    one = write_csv(tmp_path / "one.csv", ["path", "finding"],
                    [[m.paths[i], "EDEMA" if labels[i, NAMES.index("Edema")] == 1 else "CLEAR"] for i in kept])
    assert main(["fit-head", str(cache), "--out", str(tmp_path / "one"), "--labels", str(one), "--format", "csv",
                 "--label-col", "finding", "--root", str(tmp_path), "--bootstrap", "0"]) == 0
    two = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["classes"] == ["CLEAR", "EDEMA"] and two["positive_class"] == "EDEMA" and two["test"]["auroc"] > 0.7
    # Labels for train and val images only: the run has no test split, rather than an empty one.
    no_test = write_csv(tmp_path / "no_test.csv", ["path", "Oedema"],
                        [[m.paths[i], "1" if labels[i, NAMES.index("Edema")] == 1 else "0"]
                         for i in range(len(m)) if m.splits[i] != "test"])
    partial = fit_head(cache, tmp_path / "no_test", labels=str(no_test), n_resamples=0,
                       label_options={"format": "csv", "label_cols": "Oedema", "root": str(tmp_path)})
    assert "test" not in partial and partial["labels"]["dropped"] == m.splits.count("test")


def test_multilabel_flag_mistakes_are_one_line(tmp_path, capsys):
    cache, m = chexpert_cache(tmp_path)
    out = tmp_path / "run"
    cases = [
        (["--sampler", "balanced"], "a multi-label set takes shuffle"),
        (["--positive-class", "Edema"], "--positive-class applies to two-class sets"),
        (["--uncertain", "maybe"], "--uncertain takes ignore|ones|zeros, got 'maybe'"),
        (["--format", "csv"], "--format says how --labels is read; give --labels SOURCE"),
    ]
    for extra, expected in cases:
        assert expected in _one_line_error(["fit-head", cache, "--out", out, *extra], capsys)
    elsewhere = write_csv(tmp_path / "elsewhere.csv", ["path", "A"], [[p.split("/", 1)[1], "1"] for p in m.paths])
    err = _one_line_error(["fit-head", cache, "--out", out, "--labels", elsewhere, "--format", "csv", "--label-cols",
                           "A", "--root", tmp_path / "CheXpert-v1.0-small"], capsys)
    assert "has a label in" in err and "paths are matched as the cache stores them" in err
    # knn rereads its train labels from the cache when applied: fitted on other labels, predict would vote wrongly
    relabelled = write_csv(tmp_path / "relabelled.csv", ["path", "A"], [[p, "1"] for p in m.paths])
    err = _one_line_error(["fit-head", cache, "--out", out, "--heads", "knn", "--labels", relabelled, "--format",
                           "csv", "--label-cols", "A", "--root", tmp_path], capsys)
    assert "--heads knn reads its train labels back from the cache" in err


def test_single_label_caches_refuse_the_multilabel_policies(tmp_path, capsys):
    cache = single_label_cache(tmp_path / "c.h5")
    assert main(["fit-head", str(cache), "--out", str(tmp_path / "ok"), "--bootstrap", "0"]) == 0
    err = _one_line_error(["fit-head", cache, "--out", tmp_path / "r", "--uncertain", "ones"], capsys)
    assert "--uncertain and --unmentioned apply to multi-label sets" in err


def test_predict_writes_a_probability_and_a_decision_per_label(tmp_path, tiny_backbone):
    folder = make_chexpert(tmp_path, n_train_patients=30, n_valid_patients=8)
    cache = tmp_path / "cx.h5"
    assert main(["extract", str(folder), "--format", "chexpert", "--out", str(cache), "--backbone", tiny_backbone,
                 "--weights", "none", "--workers", "0", "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["fit-head", str(cache), "--out", str(run), "--unmentioned", "ignore", "--threshold", "f1",
                 "--bootstrap", "0"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    images = sorted((folder / "valid").rglob("*.jpg"))[:3]
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), *map(str, images), "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    with open(run / "predictions.csv") as f:
        cached = {r["path"]: r for r in csv.DictReader(f)}
    assert len(rows) == 3
    for row, image in zip(rows, images):
        same = cached[image.relative_to(tmp_path).as_posix()]
        for name in NAMES:
            p, thr = float(row[f"p_{name}"]), metrics["thresholds"][name]
            assert p == pytest.approx(float(same[f"p_{name}"]), abs=1e-4)
            assert row[f"pred_{name}"] == str(int(p >= thr))
        assert row["prediction"] == "|".join(n for n in NAMES if row[f"pred_{n}"] == "1")
        assert row["threshold_rule"] == "f1" and not row["error"]


@pytest.fixture
def tunable_tiny(tiny_backbone, monkeypatch) -> str:
    """The plumbing backbone with a head name: best.pt stores a fine-tuned head under it."""
    from dataclasses import replace

    from featcache.backbones import registry

    monkeypatch.setitem(registry.REGISTRY, tiny_backbone,
                        replace(registry.REGISTRY[tiny_backbone], head_prefixes=("fc.",)))
    return tiny_backbone


def test_finetune_trains_every_label_with_the_masked_loss_under_each_policy(tmp_path, tunable_tiny):
    from featcache.finetune import finetune

    folder = make_chexpert(tmp_path, n_train_patients=30, n_valid_patients=8)
    m = read_manifest(folder, format="chexpert")
    runs = {}
    for policy in ("ones", "ignore"):
        runs[policy] = finetune(folder, tmp_path / policy, backbone=tunable_tiny, weights="none", epochs=2,
                                batch_size=16, amp="off", workers=0, n_resamples=20, progress=False,
                                scan_options={"format": "chexpert"}, uncertain=policy, threshold="youden")
    val = np.asarray(m.labels)[np.asarray(m.splits) == "val"]
    edema = NAMES.index("Edema")
    for policy, metrics in runs.items():
        assert metrics["task"] == "multilabel" and metrics["policy"]["uncertain"] == policy
        assert set(metrics["thresholds"]) == set(NAMES) and "competition_auroc" in metrics["test"]
        history = json.loads((tmp_path / policy / "history.json").read_text())
        assert len(history) == 2 and all(0.0 <= h["val_auroc"] <= 1.0 for h in history)
        best = max(history, key=lambda h: h["val_auroc"])
        assert metrics["selected"]["epoch"] == best["epoch"]
        assert metrics["val"]["auroc"] == pytest.approx(best["val_auroc"])
    positives = {p: r["val"]["per_label"]["Edema"]["n_positive"] for p, r in runs.items()}
    assert positives == {"ones": int(np.isin(val[:, edema], (1, -1)).sum()), "ignore": int((val[:, edema] == 1).sum())}
    heads = {p: torch.load(tmp_path / p / "best.pt", weights_only=True)["model"] for p in runs}
    weight = [k for k in heads["ones"] if k.endswith("weight") and heads["ones"][k].shape[0] == len(NAMES)][0]
    assert not torch.allclose(heads["ones"][weight], heads["ignore"][weight])
    images = sorted((folder / "valid").rglob("*.jpg"))[:2]
    out = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "ones"), *map(str, images), "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [set(r) >= {f"p_{n}" for n in NAMES} | {f"pred_{n}" for n in NAMES} for r in rows] == [True, True]
    for row in rows:
        assert row["prediction"] == "|".join(n for n in NAMES if row[f"pred_{n}"] == "1")


def test_report_compares_multilabel_runs_label_by_label(tmp_path, capsys):
    from featcache.report.document import build_report

    cache, _ = chexpert_cache(tmp_path)
    runs = {}
    for policy in ("ignore", "ones"):
        runs[policy] = fit_head(cache, tmp_path / policy, heads="sweep", epochs=3, uncertain=policy,
                                n_resamples=20)
    facts = build_report([str(tmp_path / p) for p in runs], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    rows = {r["run"]: r for r in facts["multilabel"]}
    for policy, metrics in runs.items():
        assert rows[policy]["uncertain"] == policy and rows[policy]["split"] == "test"
        assert rows[policy]["competition_auroc"] == metrics["test"]["competition_auroc"]
        assert rows[policy]["per_label"]["Edema"]["auroc"] == metrics["test"]["per_label"]["Edema"]["auroc"]
        assert (tmp_path / "report" / f"roc_grid_{policy}.png").is_file()
    assert "AUROC per label" in text and all(f"| {name} |" in text for name in NAMES)
    assert "not a like-for-like comparison" in text
    fit_head(single_label_cache(tmp_path / "s.h5"), tmp_path / "single", n_resamples=0)
    err = _one_line_error(["report", tmp_path / "ones", tmp_path / "single", "--out", tmp_path / "mixed"], capsys)
    assert "ones: multi-label run; report multi-label runs together" in err


def test_a_run_config_fits_and_reports_a_multilabel_set_under_its_policy(tmp_path, tiny_backbone):
    from featcache.run import run_config

    folder = make_chexpert(tmp_path, n_train_patients=30, n_valid_patients=8)
    config = tmp_path / "cx.toml"
    config.write_text(f'data = "{folder}"\nformat = "chexpert"\nweights = "none"\nout = "{tmp_path / "out"}"\n'
                      f'uncertain = "zeros"\nunmentioned = "ignore"\nbootstrap = 0\n\n'
                      f'[[fixed]]\nbackbone = "{tiny_backbone}"\nheads = "logistic"\n')
    facts = run_config(config)
    metrics = json.loads((tmp_path / "out" / "runs" / f"{tiny_backbone}-logistic" / "metrics.json").read_text())
    assert metrics["policy"] == {"uncertain": "zeros", "unmentioned": "ignore"}
    assert [(r["uncertain"], r["unmentioned"]) for r in facts["multilabel"]] == [("zeros", "ignore")]


def test_finetune_multilabel_choices_are_blind_to_the_test_labels(tmp_path, tunable_tiny):
    from featcache.finetune import finetune

    folder = make_chexpert(tmp_path, n_train_patients=24, n_valid_patients=8)
    options = dict(backbone=tunable_tiny, weights="none", epochs=2, batch_size=16, amp="off", workers=0,
                   n_resamples=0, progress=False, scan_options={"format": "chexpert"}, threshold="youden")
    first = finetune(folder, tmp_path / "a", **options)
    with open(folder / "valid.csv") as f:  # valid.csv is the test split: its label rows shuffled
        rows = list(csv.reader(f))
    order = np.random.default_rng(0).permutation(len(rows) - 1) + 1
    write_csv(folder / "valid.csv", rows[0], [rows[i][:5] + rows[j][5:] for i, j in zip(range(1, len(rows)), order)])
    second = finetune(folder, tmp_path / "b", **options)
    for key in ("selected", "thresholds", "heads"):
        assert first[key] == second[key]
    assert first["test"]["per_label"] != second["test"]["per_label"]


def test_a_finetune_run_saved_before_the_policies_existed_is_still_recognised(tmp_path, tunable_tiny):
    from featcache.finetune import finetune

    folder = make_chexpert(tmp_path, n_train_patients=12, n_valid_patients=4)
    options = dict(backbone=tunable_tiny, weights="none", epochs=1, batch_size=16, amp="off", workers=0,
                   n_resamples=0, progress=False, scan_options={"format": "chexpert"})
    first = finetune(folder, tmp_path / "run", **options)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    settings = json.loads(last["settings"])
    del settings["uncertain"], settings["unmentioned"]  # as a run saved by an earlier featcache
    torch.save({**last, "settings": json.dumps(settings)}, tmp_path / "run" / "last.pt")
    assert finetune(folder, tmp_path / "run", **options) == first
    with pytest.raises(UserError, match=r"other settings \(uncertain\)"):
        finetune(folder, tmp_path / "run", **options, uncertain="ones")
