"""Every metric and threshold rule in one place (numpy only).

Fit-head and fine-tuning both report through :func:`binary_metrics`, so their
``metrics.json`` files compare key for key.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import UserError
from featcache.options import DEFAULT_POSITIVE_CLASS, DEFAULT_RESAMPLES

THRESHOLD_RULES = ("youden", "f1")


def positive_class_index(classes, positive: str | None = None) -> int:
    """The index of ``positive`` (``--positive-class``); by default :data:`DEFAULT_POSITIVE_CLASS` when
    present, otherwise the last class."""
    classes = list(classes)
    if positive is not None:
        if positive not in classes:
            raise UserError(f"--positive-class {positive} is not a class here; the classes are {', '.join(classes)}")
        return classes.index(positive)
    return classes.index(DEFAULT_POSITIVE_CLASS) if DEFAULT_POSITIVE_CLASS in classes else len(classes) - 1


def parse_threshold(rule: str | float, target_sensitivity: float | None = None) -> str | float:
    """``youden``, ``f1``, a fixed probability in [0, 1], or ``sensitivity>=T``.

    ``target_sensitivity`` (``--target-sensitivity``) wins over ``rule``: the
    highest threshold whose validation sensitivity reaches it.
    """
    if target_sensitivity is not None:
        if not 0.0 < target_sensitivity <= 1.0:
            raise UserError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
        return f"sensitivity>={target_sensitivity:g}"
    if isinstance(rule, str) and rule.lower() in THRESHOLD_RULES:
        return rule.lower()
    if isinstance(rule, str) and rule.startswith("sensitivity>="):
        return parse_threshold(None, float(rule.split(">=", 1)[1]))
    try:
        value = float(rule)
    except (TypeError, ValueError):
        raise UserError(f"--threshold takes youden, f1 or a number in [0, 1], got {rule!r}") from None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {value}")
    return value


def auroc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); None with one class."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        return float("nan")
    ranks = average_ranks(scores)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy's ``rankdata``).

    In numpy because importing scipy.stats costs 0.5-1.5 s, paid inside the
    timed fit of a cold ``fit-head`` that scores 64 heads on validation.
    """
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(first) - 1]
    return ranks


def roc_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting positive when score >= threshold."""
    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, yy = scores[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(yy)[last_of_run]
    fps = (last_of_run + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(len(y) - int(y.sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s[last_of_run]]
    return fpr, tpr, thresholds


def choose_threshold(y: np.ndarray, scores: np.ndarray, rule: str | float) -> float:
    """The operating point for ``rule``, chosen on the data given (validation, never test)."""
    if not isinstance(rule, str):
        return float(rule)
    fpr, tpr, thresholds = roc_curve(y, scores)
    if rule == "youden":
        best = int(np.argmax(tpr - fpr))
    elif rule == "f1":
        y = np.asarray(y).astype(bool)
        tp = tpr * y.sum()
        predicted = tp + fpr * (~y).sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(predicted + y.sum() > 0, 2 * tp / (predicted + y.sum()), 0.0)
        best = int(np.argmax(f1))
    elif rule.startswith("sensitivity>="):
        target = float(rule.split(">=", 1)[1])
        # tpr rises as the threshold falls: the first point reaching the
        # target is the most specific one that does.
        best = int(np.argmax(tpr >= target - 1e-12))
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")
    value = thresholds[best]
    return float(min(value, 1.0)) if np.isfinite(value) else 1.0


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, *, threshold: float, classes, positive: int) -> dict:
    """Clinical metrics of a two-class problem at ``threshold`` on the positive-class score.

    ``confusion_matrix`` has rows = true class, columns = predicted class,
    both in ``classes`` order. Undefined ratios (no positives predicted, say)
    are 0.0; AUROC with a single class present is None.
    """
    classes = list(classes)
    if len(classes) != 2:
        raise ValueError("binary_metrics needs exactly two classes")
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    negative = 1 - positive
    is_pos = y_true == positive
    pred_pos = scores >= threshold
    tp = int(np.sum(is_pos & pred_pos))
    fn = int(np.sum(is_pos & ~pred_pos))
    fp = int(np.sum(~is_pos & pred_pos))
    tn = int(np.sum(~is_pos & ~pred_pos))
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    cm = np.zeros((2, 2), dtype=np.int64)
    cm[positive, positive], cm[positive, negative] = tp, fn
    cm[negative, positive], cm[negative, negative] = fp, tn
    return {
        "n": int(len(y_true)),
        "accuracy": _ratio(tp + tn, len(y_true)),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "auroc": auroc(is_pos, scores),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "f1": _ratio(2 * precision * sensitivity, precision + sensitivity),
        "confusion_matrix": cm.tolist(),
    }


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, *, classes) -> dict:
    """Metrics of an argmax decision over three or more classes.

    Top-level ``auroc`` is the macro one-vs-rest mean; ``sensitivity`` and
    ``specificity`` are macro means of the per-class values, which are listed
    under ``per_class``. ``balanced_accuracy`` (= macro ``sensitivity``)
    averages over the classes present in ``y_true`` only, so a sample lacking
    a class (a small test split, a bootstrap resample) scores as scikit-learn.
    """
    classes = list(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = cm.sum() - tp - fn - fp
        recall, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
        per_class[name] = {
            "n": int(cm[i].sum()),
            "auroc": auroc(y_true == i, probs[:, i]),
            "sensitivity": recall,
            "specificity": _ratio(tn, tn + fp),
            "precision": precision,
            "f1": _ratio(2 * precision * recall, precision + recall),
        }
    aurocs = [m["auroc"] for m in per_class.values() if m["auroc"] is not None]
    values = list(per_class.values())
    # A class absent from y_true has no recall, not a recall of 0: it is left out
    # of the macro mean, as scikit-learn's balanced_accuracy_score does.
    recalls = [m["sensitivity"] for m in values if m["n"]]
    macro_recall = float(np.mean(recalls)) if recalls else 0.0
    return {
        "n": int(len(y_true)),
        "accuracy": _ratio(np.trace(cm), cm.sum()),
        "balanced_accuracy": macro_recall,
        "auroc": float(np.mean(aurocs)) if aurocs else None,
        "sensitivity": macro_recall,
        "specificity": float(np.mean([m["specificity"] for m in values])),
        "precision": float(np.mean([m["precision"] for m in values])),
        "f1": float(np.mean([m["f1"] for m in values])),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }


CALIBRATION_BINS = 10


def calibration(y_true: np.ndarray, probs: np.ndarray, *, positive: int | None, bins: int = CALIBRATION_BINS) -> dict:
    """Brier score, expected calibration error and the reliability-diagram bins.

    Two classes: bins of the positive-class probability against the observed
    positive rate. More: bins of the top-class confidence against accuracy.
    Brier is the mean squared error over all class probabilities, halved for
    two classes so it equals the usual binary (p - y)^2.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[y_true]
    brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    if positive is not None:
        brier /= 2.0
        confidence, hit = probs[:, positive], (y_true == positive).astype(float)
    else:
        confidence, hit = probs.max(axis=1), (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        if n:
            mean_p, rate = float(confidence[inside].mean()), float(hit[inside].mean())
            ece += n / len(y_true) * abs(mean_p - rate)
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                          "mean_predicted": mean_p, "observed": rate})
    return {"brier": brier, "ece": float(ece), "reliability": table}


CI_METRICS = ("auroc", "sensitivity", "specificity", "accuracy")


def bootstrap_ci(y_true, probs, patients, *, score, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Percentile confidence intervals by cluster bootstrap over patients.

    Whole patients are drawn with replacement, so images of one patient (which
    are correlated) move together and the intervals are not too narrow.
    ``score(y, probs) -> dict`` gives the metrics to interval.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    members = patient_groups(patients)
    samples: dict[str, list[float]] = {}
    for rows in patient_resamples(members, n_resamples=n_resamples, seed=seed):
        for name, value in score(y_true[rows], probs[rows]).items():
            if value is not None:
                samples.setdefault(name, []).append(value)
    alpha = (1.0 - level) / 2.0
    out = {name: [float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))] for name, v in samples.items()}
    out.update(level=level, resamples=n_resamples, unit="patient", patients=len(members), seed=seed)
    return out


def patient_groups(patients) -> list[np.ndarray]:
    """The row indices of each patient, patients in order of first appearance."""
    groups: dict = {}
    for row, patient in enumerate(patients):
        groups.setdefault(patient, []).append(row)
    return [np.asarray(rows) for rows in groups.values()]


def patient_resamples(members: list[np.ndarray], *, n_resamples: int, seed: int):
    """Yield the rows of each bootstrap resample: as many patients as there are, drawn with replacement.

    A resample holds every image of each drawn patient, so its row count
    varies with the patients drawn; that is what keeps correlated images
    together. Separate from :func:`bootstrap_ci` so a test can see the draws.
    """
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[i] for i in chosen])


def _fast_binary(threshold: float, positive: int):
    def score(y, probs):
        is_pos = y == positive
        pred = probs[:, positive] >= threshold
        n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
        return {
            "auroc": auroc(is_pos, probs[:, positive]),
            "sensitivity": float((pred & is_pos).sum() / n_pos) if n_pos else None,
            "specificity": float((~pred & ~is_pos).sum() / n_neg) if n_neg else None,
            "accuracy": float((pred == is_pos).mean()),
        }

    return score


def _fast_multiclass(y, probs):
    m = multiclass_metrics(y, probs, classes=range(probs.shape[1]))
    return {name: m[name] for name in CI_METRICS}


def evaluate(y_true, probs, *, classes, threshold: float | None = None, positive: int | None = None,
             patients=None, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Every metric of one split: point estimates, calibration, and patient-bootstrap CIs.

    ``probs`` is (N, K). Two classes are judged at ``threshold`` on the
    ``positive`` class probability; more classes by argmax.
    """
    probs = np.asarray(probs, dtype=np.float64)
    binary = len(classes) == 2
    if binary:
        metrics = binary_metrics(y_true, probs[:, positive], threshold=threshold, classes=classes, positive=positive)
        score = _fast_binary(threshold, positive)
    else:
        metrics = multiclass_metrics(y_true, probs, classes=classes)
        score = _fast_multiclass
    metrics.update(calibration(y_true, probs, positive=positive if binary else None))
    if patients is not None and n_resamples:
        metrics["ci"] = bootstrap_ci(y_true, probs, patients, score=score, n_resamples=n_resamples, seed=seed)
    return metrics


# Multi-label sets: targets (N, L) of 1.0 / 0.0 / NaN (unknown under the fit's policy); every metric of a
# label uses only the rows where it is known.

# CheXpert's five competition observations (Irvin et al. 2019): their mean AUROC is the number papers quote.
COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
LABEL_METRICS = ("auroc", "average_precision", "sensitivity", "specificity", "f1")
# Rule-chosen thresholds need both values of a label on validation; without them a label is judged at this.
FALLBACK_THRESHOLD = 0.5


def average_precision(y: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the precision-recall curve as scikit-learn's step sum; None without positives."""
    y = np.asarray(y).astype(bool)
    if not y.any():
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, hits = np.asarray(scores, dtype=np.float64)[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # tied scores form one point
    tp = np.cumsum(hits)[last_of_run]
    precision = tp / (last_of_run + 1)
    recall_gain = np.diff(np.r_[0, tp]) / tp[-1]
    return float(np.sum(recall_gain * precision))


def label_thresholds(targets: np.ndarray, probs: np.ndarray, rule: str | float) -> list[float]:
    """One threshold per label, chosen by ``rule`` on the known rows of the data given (validation)."""
    out = []
    for j in range(targets.shape[1]):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j].astype(bool)
        if isinstance(rule, str) and (y.all() or not y.any()):
            out.append(FALLBACK_THRESHOLD)
        else:
            out.append(choose_threshold(y, probs[known, j], rule))
    return out


def _label_scores(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    pred = scores >= threshold
    tp, fn = int(np.sum(y & pred)), int(np.sum(y & ~pred))
    fp, tn = int(np.sum(~y & pred)), int(np.sum(~y & ~pred))
    precision, sensitivity = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "auroc": auroc(y, scores),
        "average_precision": average_precision(y, scores),
        "sensitivity": sensitivity if tp + fn else None,
        "specificity": _ratio(tn, tn + fp) if tn + fp else None,
        "precision": precision,
        "f1": _ratio(2 * precision * sensitivity, precision + sensitivity),
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def multilabel_summary(targets: np.ndarray, probs: np.ndarray, *, names, thresholds) -> dict:
    """Per-label metrics at each label's threshold, their macro means, micro AUROC and, where the five
    CheXpert competition labels are all present, their mean AUROC."""
    targets = np.asarray(targets, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    known = ~np.isnan(targets)
    per_label = {}
    for j, name in enumerate(names):
        y = targets[known[:, j], j].astype(bool)
        per_label[name] = {**_label_scores(y, probs[known[:, j], j], thresholds[j]),
                           "n_positive": int(y.sum()), "n_negative": int((~y).sum()), "threshold": thresholds[j]}
    out = {
        "n": int(len(targets)),
        "auroc": _mean(m["auroc"] for m in per_label.values()),
        "micro_auroc": auroc(targets[known].astype(bool), probs[known]),
        **{key: _mean(m[key] for m in per_label.values())
           for key in ("average_precision", "sensitivity", "specificity", "f1")},
    }
    if all(name in per_label for name in COMPETITION_LABELS):
        out["competition_auroc"] = _mean(per_label[name]["auroc"] for name in COMPETITION_LABELS)
    out["per_label"] = per_label
    return out


def _fast_multilabel(names, thresholds):
    def score(y, probs):
        m = multilabel_summary(y, probs, names=names, thresholds=thresholds)
        flat = {key: m.get(key) for key in ("micro_auroc", "competition_auroc", *LABEL_METRICS)}
        for name, values in m["per_label"].items():
            flat.update({(name, key): values[key] for key in LABEL_METRICS})
        return flat

    return score


def evaluate_multilabel(targets, probs, *, names, thresholds, patients=None, n_resamples: int = DEFAULT_RESAMPLES,
                        seed: int = 0) -> dict:
    """Every metric of one multi-label split, with patient-bootstrap CIs for the means (``ci``) and for each
    label's metrics (``per_label[name]["ci"]``)."""
    names = list(names)
    metrics = multilabel_summary(targets, probs, names=names, thresholds=thresholds)
    if patients is None or not n_resamples:
        return metrics
    ci = bootstrap_ci(np.asarray(targets), np.asarray(probs), patients, score=_fast_multilabel(names, thresholds),
                      n_resamples=n_resamples, seed=seed)
    for key in [k for k in ci if isinstance(k, tuple)]:
        name, metric = key
        metrics["per_label"][name].setdefault("ci", {})[metric] = ci.pop(key)
    metrics["ci"] = ci
    return metrics
