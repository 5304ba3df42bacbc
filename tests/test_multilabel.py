"""Multi-label heads: policies for uncertain and unmentioned labels at fit time, masked training of every label at
once, and per-label metrics with patient CIs."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.data.labels import apply_policy
from featcache.eval.metrics import COMPETITION_LABELS, evaluate_multilabel, multilabel_summary
from featcache.heads import LinearHeadSweep, LogisticHead
from featcache.heads.sweep import HeadConfig


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
