"""Every metric and threshold rule in one place (numpy only).

Fit-head and fine-tuning both report through :func:`binary_metrics`, so their
``metrics.json`` files compare key for key.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import UserError

THRESHOLD_RULES = ("youden", "f1")
POSITIVE_CLASS_NAME = "PNEUMONIA"


def positive_class_index(classes) -> int:
    """PNEUMONIA when present, otherwise the last class."""
    classes = list(classes)
    return classes.index(POSITIVE_CLASS_NAME) if POSITIVE_CLASS_NAME in classes else len(classes) - 1


def parse_threshold(rule: str | float) -> str | float:
    """``youden``, ``f1`` or a fixed probability in [0, 1]."""
    if isinstance(rule, str) and rule.lower() in THRESHOLD_RULES:
        return rule.lower()
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
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank over each run of tied scores.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


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
