"""Heads trained on cached features; every choice made on validation only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from featcache.cache import FeatureCache
from featcache.errors import UserError
from featcache.metrics import binary_metrics, choose_threshold, parse_threshold, positive_class_index

DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
CLASS_WEIGHTS = ("none", "balanced")
HEAD_KINDS = ("logistic",)


class LogisticHead:
    """Standardize, then scikit-learn's L2 logistic regression.

    Standardization statistics come from the training features only.
    """

    def __init__(self, C: float = 1.0, class_weight: str = "none", max_iter: int = 5000):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LogisticHead":
        from sklearn.linear_model import LogisticRegression

        self.mean_ = X.mean(axis=0)
        # A constant feature (dead ReLU channel) gets scale 1, not a division by 0.
        std = X.std(axis=0)
        self.scale_ = np.where(std > 1e-12, std, 1.0)
        self.model_ = LogisticRegression(
            C=self.C,
            class_weight="balanced" if self.class_weight == "balanced" else None,
            max_iter=self.max_iter,
        ).fit(self._standardize(X), y)
        self.classes_ = self.model_.classes_
        self.coef_ = self.model_.coef_
        self.intercept_ = self.model_.intercept_
        return self

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(self._standardize(X))

    def state_dict(self) -> dict:
        """Plain tensors, loadable with ``torch.load(..., weights_only=True)``."""
        import torch

        return {
            "mean": torch.from_numpy(np.asarray(self.mean_, dtype=np.float32)),
            "scale": torch.from_numpy(np.asarray(self.scale_, dtype=np.float32)),
            "coef": torch.from_numpy(np.asarray(self.coef_, dtype=np.float32)),
            "intercept": torch.from_numpy(np.asarray(self.intercept_, dtype=np.float32)),
        }


def _load_splits(cache: FeatureCache) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    present = cache.split_names()
    for needed in ("train", "val"):
        if needed not in present:
            raise UserError(
                f"{cache.path} has no {needed} split (splits: {', '.join(present)}); "
                "fit-head needs train and val, from DATA/train (val is carved from it) and optionally DATA/test"
            )
    return {s: cache.arrays(s)[:2] for s in ("train", "val", "test") if s in present}


def fit_head(
    cache_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    heads: str = "logistic",
    C: float | None = None,
    class_weight: str = "none",
    threshold: str | float = 0.5,
) -> dict:
    """Fit a head on ``cache_path``, choose C and the threshold on val, report val and test.

    Writes ``metrics.json``, ``head.pt``, ``confusion_matrix.png`` and
    ``roc.png`` into ``out_dir`` and returns the metrics.
    """
    if heads not in HEAD_KINDS:
        raise UserError(f"unknown head {heads!r}; choose one of: {', '.join(HEAD_KINDS)}")
    if class_weight not in CLASS_WEIGHTS:
        raise UserError(f"--class-weight takes {' or '.join(CLASS_WEIGHTS)}, got {class_weight!r}")
    if C is not None and C <= 0:
        raise UserError(f"--C must be positive, got {C}")
    rule = parse_threshold(threshold)
    cache = FeatureCache.open(cache_path)
    classes = cache.classes
    if len(classes) != 2:
        raise UserError(f"{cache.path} has {len(classes)} classes; fit-head handles two-class caches")
    positive = positive_class_index(classes)
    data = _load_splits(cache)
    (X_train, y_train), (X_val, y_val) = data["train"], data["val"]
    for split, (_, y) in (("train", data["train"]), ("val", data["val"])):
        if len(np.unique(y)) < 2:
            raise UserError(f"the {split} split of {cache.path} holds a single class; a head cannot be fitted or chosen")

    start = time.perf_counter()
    grid = (C,) if C is not None else DEFAULT_C_GRID
    candidates = []
    for c in grid:
        head = LogisticHead(C=c, class_weight=class_weight).fit(X_train, y_train)
        val_auroc = _auroc_of(head, X_val, y_val, positive)
        candidates.append({"C": c, "val_auroc": val_auroc, "head": head})
    # Highest validation AUROC; ties go to the smaller C (stronger regularization).
    best = max(candidates, key=lambda cand: (round(cand["val_auroc"], 12), -cand["C"]))
    head = best["head"]
    val_scores = head.predict_proba(X_val)[:, positive]
    thr = choose_threshold(y_val == positive, val_scores, rule)
    fit_seconds = time.perf_counter() - start

    scores = {"val": (y_val, val_scores)}
    if "test" in data:
        X_test, y_test = data["test"]
        scores["test"] = (y_test, head.predict_proba(X_test)[:, positive])
    metrics = {
        "classes": classes,
        "positive_class": classes[positive],
        "threshold": thr,
        "threshold_rule": rule if isinstance(rule, str) else "fixed",
        "selected": {"head": "logistic", "C": best["C"], "class_weight": class_weight},
        "candidates": [{"C": c["C"], "val_auroc": c["val_auroc"]} for c in candidates],
        "fit_seconds": fit_seconds,
        "cache": str(cache.path),
        "backbone": cache.attrs.get("backbone"),
        "weights": cache.attrs.get("weights"),
        "fingerprint": cache.attrs.get("fingerprint"),
        "n_train": int(len(y_train)),
    }
    for split, (y, s) in scores.items():
        metrics[split] = binary_metrics(y, s, threshold=thr, classes=classes, positive=positive)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_head(out_dir / "head.pt", head, metrics)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    from featcache.plots import plot_confusion_matrix, plot_roc

    shown = "test" if "test" in metrics else "val"
    plot_confusion_matrix(metrics[shown]["confusion_matrix"], classes, out_dir / "confusion_matrix.png",
                          title=f"{metrics['backbone']} + logistic, {shown} (threshold {thr:.3f})")
    plot_roc({split: scores[split] for split in scores}, positive, out_dir / "roc.png",
             title=f"{metrics['backbone']} + logistic head", threshold=thr)
    return metrics


def _auroc_of(head: LogisticHead, X: np.ndarray, y: np.ndarray, positive: int) -> float:
    from featcache.metrics import auroc

    return auroc(y == positive, head.predict_proba(X)[:, positive])


def _save_head(path: Path, head: LogisticHead, metrics: dict) -> None:
    import torch

    payload = {
        "state_dict": head.state_dict(),
        "config": json.dumps({k: metrics[k] for k in ("classes", "positive_class", "threshold", "selected",
                                                      "backbone", "weights", "fingerprint")}),
    }
    torch.save(payload, path)
