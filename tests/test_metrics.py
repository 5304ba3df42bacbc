from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import UserError
from featcache.eval.metrics import (
    auroc,
    binary_metrics,
    choose_threshold,
    parse_threshold,
    positive_class_index,
    roc_curve,
)

# Eight cases worked by hand. Positive class index 1.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
S = np.array([0.9, 0.8, 0.4, 0.6, 0.7, 0.3, 0.2, 0.55])


def test_binary_metrics_by_hand():
    m = binary_metrics(Y, S, threshold=0.5, classes=["NORMAL", "PNEUMONIA"], positive=1)
    # predicted positive: 0.9 0.8 0.6 (TP=3), 0.7 0.55 (FP=2); 0.4 is FN; 0.3 0.2 are TN.
    assert m["confusion_matrix"] == [[2, 2], [1, 3]]  # rows true NORMAL, PNEUMONIA
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["balanced_accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # Positive/negative pairs ranked correctly: 0.9 beats 4, 0.8 beats 4, 0.6 beats 3 (not 0.7),
    # 0.4 beats 2 (0.3, 0.2): 13 of 16.
    assert m["auroc"] == pytest.approx(13 / 16)


def test_confusion_matrix_follows_class_order_when_positive_is_first():
    y = 1 - Y  # now index 0 is the positive class
    m = binary_metrics(y, S, threshold=0.5, classes=["PNEUMONIA", "ZEBRA"], positive=0)
    assert m["confusion_matrix"] == [[3, 1], [2, 2]]
    assert m["sensitivity"] == pytest.approx(3 / 4)


def test_auroc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(np.ones(4), np.arange(4)) is None


def test_roc_curve_matches_scikit_learn():
    from sklearn.metrics import roc_curve as sk_roc

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 2)
    fpr, tpr, thr = roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk_roc(y, s, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr) and np.allclose(thr[1:], sk_thr[1:])


def test_threshold_rules_by_hand():
    # Youden: at 0.8 -> tpr 2/4, fpr 0; at 0.6 -> 3/4, 1/4 (J=.5); at 0.4 -> 4/4, 2/4 (J=.5);
    # first maximum in descending-threshold order wins: 0.8 gives J=.5 too, so it is picked.
    assert choose_threshold(Y == 1, S, "youden") == pytest.approx(0.8)
    # F1 at each cut: 0.9: 2/5, 0.8: 4/6, 0.7: 4/7, 0.6: 6/8, 0.55: 6/9, 0.4: 8/10 <- best, 0.3: 8/11 ...
    assert choose_threshold(Y == 1, S, "f1") == pytest.approx(0.4)
    assert choose_threshold(Y == 1, S, 0.3) == 0.3


def test_parse_threshold_and_positive_class():
    assert parse_threshold("0.5") == 0.5 and parse_threshold("Youden") == "youden"
    for bad in ("1.5", "best"):
        with pytest.raises(UserError, match="--threshold"):
            parse_threshold(bad)
    assert positive_class_index(["NORMAL", "PNEUMONIA"]) == 1
    assert positive_class_index(["PNEUMONIA", "NORMAL"]) == 0
    assert positive_class_index(["cat", "dog"]) == 1


def test_target_sensitivity_threshold_by_hand():
    # tpr reaches 3/4 first at 0.6 and 4/4 first at 0.4 (see the Youden case above).
    assert choose_threshold(Y == 1, S, parse_threshold("0.5", 0.75)) == pytest.approx(0.6)
    assert choose_threshold(Y == 1, S, parse_threshold("0.5", 0.9)) == pytest.approx(0.4)
    assert parse_threshold("youden", 0.95) == "sensitivity>=0.95"
    with pytest.raises(UserError, match="target-sensitivity"):
        parse_threshold("0.5", 1.5)


def test_multiclass_metrics_by_hand():
    from featcache.eval.metrics import multiclass_metrics

    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1], [.1, .2, .7], [.5, .1, .4]])
    m = multiclass_metrics(y, probs, classes=["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["b"]["sensitivity"] == 1.0 and m["per_class"]["b"]["specificity"] == pytest.approx(3 / 4)
    assert m["per_class"]["a"]["precision"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # class c one-vs-rest: scores .7 and .4 against .1 x4 -> every pair ranked right.
    assert m["per_class"]["c"]["auroc"] == 1.0
    assert m["auroc"] == pytest.approx(np.mean([m["per_class"][k]["auroc"] for k in "abc"]))


def test_calibration_by_hand():
    from featcache.eval.metrics import calibration

    y = np.array([1, 0, 1, 1])
    p1 = np.array([0.9, 0.9, 0.2, 0.6])
    c = calibration(y, np.c_[1 - p1, p1], positive=1, bins=2)
    assert c["brier"] == pytest.approx(np.mean((p1 - y) ** 2))
    # bin [0, .5): p .2, observed 1 -> gap .8, weight 1/4; bin [.5, 1]: mean p .8, observed 2/3.
    assert c["ece"] == pytest.approx(0.25 * 0.8 + 0.75 * abs(0.8 - 2 / 3))
    assert [b["n"] for b in c["reliability"]] == [1, 3]


def test_bootstrap_is_seeded_and_resamples_whole_patients():
    from featcache.eval.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, 50), 4)  # 50 patients, 4 identical-label images each
    p1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    probs = np.c_[1 - p1, p1]
    patients = np.repeat(np.arange(50), 4)
    sizes = []

    def score(yy, pp):
        sizes.append(len(yy))
        return {"accuracy": float(((pp[:, 1] >= 0.5) == yy).mean())}

    a = bootstrap_ci(y, probs, patients, score=score, n_resamples=200, seed=3)
    assert set(sizes) == {200}  # 50 patients drawn x 4 images each, whatever the draw
    b = bootstrap_ci(y, probs, patients, score=score, n_resamples=200, seed=3)
    c = bootstrap_ci(y, probs, patients, score=score, n_resamples=200, seed=4)
    assert a == b and a["accuracy"] != c["accuracy"]
    point = float(((p1 >= 0.5) == y).mean())
    assert a["accuracy"][0] <= point <= a["accuracy"][1] and a["patients"] == 50


def test_three_class_balanced_accuracy_without_a_class_matches_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score

    from featcache.eval.metrics import multiclass_metrics

    # No true "c" here, yet one image is predicted "c": scikit-learn drops c
    # from the mean (and warns that y_pred holds a class y_true lacks).
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.6, .3, .1], [.1, .8, .1], [.1, .2, .7], [.2, .7, .1],
                      [.3, .6, .1]])
    m = multiclass_metrics(y, probs, classes=["a", "b", "c"])
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected = balanced_accuracy_score(y, probs.argmax(axis=1))
    assert expected == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert m["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert m["sensitivity"] == pytest.approx(expected, abs=1e-12)
    assert m["per_class"]["c"]["n"] == 0
    # A class neither true nor predicted is not in scikit-learn's matrix at all.
    never = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1]])
    yy = np.array([0, 0, 1, 1])
    assert multiclass_metrics(yy, never, classes=["a", "b", "c"])["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(yy, never.argmax(axis=1)), abs=1e-12)


def _clustered_sample(seed=0, n_patients=60):
    """Patients of 1 to 8 images; every image of a patient has the patient's label and score."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, n_patients)
    label = rng.integers(0, 2, n_patients)
    score = np.clip(label * 0.25 + rng.random(n_patients) * 0.75, 0, 1)
    y, p1 = np.repeat(label, sizes), np.repeat(score, sizes)
    return y, np.c_[1 - p1, p1], np.repeat(np.arange(n_patients), sizes), rng


def _accuracy(yy, pp):
    return {"accuracy": float(((pp[:, 1] >= 0.5) == yy).mean())}


def test_patient_resamples_draw_whole_patients_of_unequal_size():
    from featcache.eval.metrics import bootstrap_ci, patient_groups, patient_resamples

    y, probs, patients, _ = _clustered_sample()
    members = patient_groups(patients)
    size_of = {int(patients[m[0]]): len(m) for m in members}
    counts = set()
    for rows in patient_resamples(members, n_resamples=50, seed=1):
        drawn = np.bincount(patients[rows], minlength=len(members))
        for patient, n in enumerate(drawn):
            assert n % size_of[patient] == 0  # every image of a drawn patient, never some of them
        assert drawn.sum() == len(rows)
        counts.add(len(rows))
    assert len(counts) > 10  # the row count follows the patients drawn; an image bootstrap keeps it at N

    seen = []
    bootstrap_ci(y, probs, patients, score=lambda yy, pp: seen.append(len(yy)) or _accuracy(yy, pp),
                 n_resamples=50, seed=1)
    assert len(set(seen)) > 10 and len(y) in range(min(seen), max(seen) + 1)


def test_patient_bootstrap_widens_with_within_patient_correlation():
    from featcache.eval.metrics import bootstrap_ci

    y, probs, patients, rng = _clustered_sample()
    # The same rows and the same patient sizes; only which images share a patient
    # differs. An image-level bootstrap cannot tell these apart.
    independent = rng.permutation(patients)

    def width(groups):
        lo, hi = bootstrap_ci(y, probs, groups, score=_accuracy, n_resamples=400, seed=2)["accuracy"]
        return hi - lo

    assert width(patients) > 1.5 * width(independent)


def test_average_ranks_match_scipy_rankdata():
    from scipy.stats import rankdata

    from featcache.eval.metrics import average_ranks

    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 500):
        values = np.round(rng.normal(size=n), 1)  # many ties
        assert np.array_equal(average_ranks(values), rankdata(values))
    assert np.isnan(auroc(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3])))
