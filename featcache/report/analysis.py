"""Task E: why test performance disappoints, answered with measurements.

Each function takes a cache, a run's history or its predictions and returns
plain numbers (JSON-ready); :mod:`featcache.report.document` lays them out.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from featcache.cache.h5 import FeatureCache
from featcache.eval.metrics import auroc, binary_metrics, choose_threshold, positive_class_index
from featcache.fit import grid_edges

SHIFT_FOLDS = 5
# A validation loss this many times the training loss is overfitting, whichever epoch was best.
LOSS_RATIO_OVERFIT = 10.0


def class_balance(cache: FeatureCache) -> dict:
    """Images per split and class, and each split's share of the positive (or each) class."""
    data = cache.read("labels", "splits", plain=True)
    classes = cache.classes
    out = {}
    for split in cache.split_names():
        counts = np.bincount(data["labels"][data["splits"] == split], minlength=len(classes))
        out[split] = {c: int(n) for c, n in zip(classes, counts)}
    return out


def weighting_and_threshold(cache: FeatureCache, C: float = 0.1, positive_class: str | None = None) -> list[dict]:
    """What class weighting and the threshold rule change, on val and test (two classes only).

    Four logistic heads (weighting none/balanced x threshold 0.5/Youden on val),
    the same C; the test split only reports.
    """
    from featcache.heads.logistic import LogisticHead

    classes = cache.classes
    if len(classes) != 2 or "test" not in cache.split_names():
        return []
    positive = positive_class_index(classes, positive_class)
    X, y, _ = cache.arrays("train")
    splits = {s: cache.arrays(s)[:2] for s in ("val", "test")}
    rows = []
    for weighting in ("none", "balanced"):
        head = LogisticHead(C=C, class_weight=weighting).fit(X, y)
        scores = {s: head.predict_proba(Xs)[:, positive] for s, (Xs, _) in splits.items()}
        for rule in (0.5, "youden"):
            thr = choose_threshold(splits["val"][1] == positive, scores["val"], rule)
            row = {"class_weight": weighting, "threshold_rule": "0.5" if rule == 0.5 else rule, "threshold": thr}
            for s, (_, ys) in splits.items():
                m = binary_metrics(ys, scores[s], threshold=thr, classes=classes, positive=positive)
                row.update({f"{s}_{k}": m[k] for k in ("sensitivity", "specificity", "balanced_accuracy", "accuracy")})
            rows.append(row)
    return rows


def domain_shift(cache: FeatureCache, a: tuple[str, ...] = ("train", "val"), b: tuple[str, ...] = ("test",),
                 seed: int = 0) -> dict | None:
    """AUROC of a classifier telling split group ``b`` from ``a`` on the embeddings.

    Cross-validated by patient groups; 0.5 means the embeddings cannot tell
    them apart (no shift), 1.0 that every test image is recognisably test.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    from featcache.heads.base import FeatureNorm

    present = cache.split_names()
    if not any(s in present for s in b) or not any(s in present for s in a):
        return None
    parts = [(cache.arrays(s), int(s in b)) for s in (*a, *b) if s in present]
    X = np.concatenate([p[0][0] for p in parts])
    domain = np.concatenate([np.full(len(p[0][0]), p[1]) for p in parts])
    groups = np.concatenate([p[0][2] for p in parts])
    folds = min(SHIFT_FOLDS, int(min(domain.sum(), len(domain) - domain.sum())))
    if folds < 2:
        return None
    scores = []
    for train_idx, test_idx in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(X, domain, groups):
        norm = FeatureNorm().fit(X[train_idx])
        model = LogisticRegression(C=0.1, max_iter=500, solver="newton-cholesky")
        model.fit(norm.transform(X[train_idx]), domain[train_idx])
        scores.append(auroc(domain[test_idx], model.predict_proba(norm.transform(X[test_idx]))[:, 1]))
    return {"auroc": float(np.mean(scores)), "folds": [float(v) for v in scores], "a": list(a), "b": list(b),
            "n_a": int((domain == 0).sum()), "n_b": int(domain.sum())}


DUPLICATE_COSINE = 0.98  # the threshold when train and val hold too few within-patient pairs to learn one from
MIN_WITHIN_PATIENT = 20  # images with a sibling of their patient needed to learn the threshold from them
# The near-duplicate threshold is this quantile of the within-patient nearest cosines: each train or val image
# and the most alike other image of its patient. A cross-split pair above it is more alike than 95 % of the
# images known to show one patient are to their closest sibling. A low quantile flags nearly every image: an
# image's nearest among thousands of another split's is closer than its nearest among the one to few other
# images of its patient (Kermany, resnet18 random init: the 5 % quantile, cosine -0.50, flags 624 of 624 test
# images against train; the 95 %, 0.915, flags 132).
WITHIN_PATIENT_QUANTILE = 0.95
THRESHOLD_SPLITS = ("train", "val")  # the threshold never reads a test image
SPLIT_PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
# Rows per block of the within-patient search, whole patients per block: (rows x rows) float32 cosines.
PATIENT_BLOCK_ROWS = 1024


def _take(X, rows: np.ndarray):
    """``X[rows]``, a view when the rows are one contiguous run (a cache's splits usually are)."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return X[int(rows[0]) : int(rows[-1]) + 1]
    return X[rows]


def unit_embeddings(features: np.ndarray, splits: np.ndarray):
    """Unit rows (torch, float32) of the features standardized per dimension with train statistics.

    Raw ReLU features share a large positive offset and a few dominant
    dimensions, which make every pair look alike; standardized, the cosine
    tells images apart.
    """
    import torch

    from featcache.heads.base import FIT_BLOCK_ROWS, FeatureNorm
    from featcache.heads.knn import l2_rows

    train = np.flatnonzero(splits == "train")
    norm = FeatureNorm().fit(_take(features, train) if len(train) else features)
    out = torch.empty(features.shape, dtype=torch.float32)
    for lo in range(0, len(features), FIT_BLOCK_ROWS):  # one copy of the rows, not one per step
        block = torch.from_numpy(np.asarray(features[lo : lo + FIT_BLOCK_ROWS], dtype=np.float32))
        out[lo : lo + len(block)] = l2_rows(norm.transform(block))
    return out


def _patient_blocks(order: np.ndarray, codes: np.ndarray, block_rows: int):
    """Consecutive slices of ``order`` (rows sorted by patient code), whole patients each, at most
    ``block_rows`` rows unless one patient alone has more."""
    sorted_codes = codes[order]
    bounds = np.r_[np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]), len(order)]
    lo = 0
    while lo < len(order):
        hi = int(bounds[np.searchsorted(bounds, lo + block_rows, side="right") - 1])
        if hi <= lo:  # one patient with more rows than a block: that patient alone
            hi = int(bounds[np.searchsorted(bounds, lo, side="right")])
        yield order[lo:hi]
        lo = hi


def within_patient_nearest(X, codes: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """Per row (unit rows ``X``), the cosine to the most alike other row of its patient (``codes``, integers);
    NaN for a patient's only row. Rows go in blocks of whole patients (at most ``block_rows``, default
    :data:`PATIENT_BLOCK_ROWS`, unless one patient has more), never an N x N matrix."""
    order = np.argsort(codes, kind="stable")
    out = np.full(len(codes), np.nan, dtype=np.float32)
    for rows in _patient_blocks(order, codes, block_rows or PATIENT_BLOCK_ROWS):
        sims = (X[rows] @ X[rows].T).numpy()
        same = codes[rows][:, None] == codes[rows][None, :]
        np.fill_diagonal(same, False)
        sims[~same] = -np.inf
        has = same.any(axis=1)
        out[rows[has]] = sims.max(axis=1)[has]
    return out


def duplicate_threshold(X, patients: np.ndarray, splits: np.ndarray,
                        quantile: float = WITHIN_PATIENT_QUANTILE) -> dict:
    """The near-duplicate cosine, chosen from within-patient pairs of train and val (never test):
    the ``quantile`` of each image's cosine to its most alike other image of the same patient."""
    rows = np.flatnonzero(np.isin(splits, THRESHOLD_SPLITS))
    codes = np.unique(patients[rows], return_inverse=True)[1]
    sims = within_patient_nearest(_take(X, rows), codes)
    sims = sims[~np.isnan(sims)].astype(np.float64)
    if len(sims) < MIN_WITHIN_PATIENT:
        return {"threshold": DUPLICATE_COSINE, "within_patient_images": len(sims),
                "rule": f"the fixed cosine {DUPLICATE_COSINE} (only {len(sims)} train and val images have another "
                        f"image of their patient, {MIN_WITHIN_PATIENT} are needed to learn it)"}
    return {"threshold": float(np.quantile(sims, quantile)), "quantile": quantile,
            "rule": f"the {quantile:.0%} quantile of {len(sims):,} within-patient nearest cosines (train and val)",
            "within_patient_images": len(sims),
            "within_patient_quantiles": {q: float(np.quantile(sims, q)) for q in (0.05, 0.25, 0.5, 0.75)}}


def near_duplicates(cache: FeatureCache, *, top: int = 12) -> dict:
    """Image pairs in different splits whose embeddings nearly coincide (a leakage check).

    Each image of the later split of a pair (val of train-val, test of
    train-test and val-test) is searched against the earlier split with the
    kNN head's exact blocked search (:func:`featcache.heads.knn.nearest`), on
    :func:`unit_embeddings`. A pair is an image and its nearest image of the
    other split; pairs at or above :func:`duplicate_threshold` are counted
    per split pair and the closest are returned for a human to judge
    (byte-identical files are found by :func:`exact_duplicates`).
    """
    from featcache.heads.knn import nearest

    data = cache.read("features", "splits", "paths", "patients", plain=True)  # augmented views are not images
    splits, paths, patients = data["splits"], data["paths"], data["patients"]
    X = unit_embeddings(data.pop("features"), splits)
    threshold = duplicate_threshold(X, patients, splits)
    counts, closest, quantiles = {}, [], {}
    for s1, s2 in SPLIT_PAIRS:
        rows1, rows2 = np.flatnonzero(splits == s1), np.flatnonzero(splits == s2)
        if not len(rows1) or not len(rows2):
            continue
        sims, index = nearest(_take(X, rows1), _take(X, rows2), 1)
        sims, partner = sims[:, 0].numpy(), rows1[index[:, 0].numpy()]
        counts[f"{s1}-{s2}"] = int((sims >= threshold["threshold"]).sum())
        quantiles[f"{s1}-{s2}"] = {q: float(np.quantile(sims, q)) for q in (0.5, 0.9, 0.99, 1.0)}
        for i in np.argsort(-sims, kind="stable")[:top]:
            a, b = int(partner[i]), int(rows2[i])
            closest.append({"a": str(paths[a]), "b": str(paths[b]), "splits": f"{s1}-{s2}",
                            "cosine": float(sims[i]), "same_patient": bool(patients[a] == patients[b])})
    closest.sort(key=lambda p: -p["cosine"])
    return {**threshold, "pairs_above": counts, "closest": closest[:top], "nearest_quantiles": quantiles,
            "images": {f"{s1}-{s2}": int((splits == s2).sum()) for s1, s2 in SPLIT_PAIRS if f"{s1}-{s2}" in counts}}


def exact_duplicates(root: str, paths, splits) -> list[list[str]]:
    """Groups of byte-identical files that sit in different splits."""
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path, split in zip(paths, splits):
        try:
            with open(os.path.join(root, path), "rb") as f:
                by_hash[hashlib.sha1(f.read()).hexdigest()].append((split, path))
        except OSError:
            continue
    return [[p for _, p in group] for group in by_hash.values() if len({s for s, _ in group}) > 1]


def overfitting(history: list[dict]) -> dict:
    """Does the whole curve show overfitting? Validation loss far above the training loss at any
    epoch, validation loss rising for the last two epochs, or a train-validation gap that grew
    after the best epoch."""
    if not history:
        return {"flag": False, "reason": "no epochs"}
    gaps = [h["val_loss"] - h["train_loss"] for h in history]
    best = max(range(len(history)), key=lambda i: history[i]["val_auroc"])
    ratios = [h["val_loss"] / max(h["train_loss"], 1e-12) for h in history]
    worst = max(range(len(history)), key=lambda i: ratios[i])
    far_apart = ratios[worst] >= LOSS_RATIO_OVERFIT
    rising_val = len(history) >= 3 and history[-1]["val_loss"] > history[-2]["val_loss"] > history[-3]["val_loss"]
    grew = gaps[-1] - gaps[best] > 0.1
    flag = bool(far_apart or rising_val or grew)
    if far_apart:
        reason = (f"validation loss {history[worst]['val_loss']:.3f} is {ratios[worst]:.0f}x the training loss "
                  f"{history[worst]['train_loss']:.3f} at epoch {history[worst]['epoch']}")
    elif rising_val:
        reason = "validation loss rose for the last two epochs while training went on"
    elif grew:
        reason = f"the val-train loss gap grew from {gaps[best]:.3f} (best epoch) to {gaps[-1]:.3f}"
    else:
        reason = f"no growing gap (val-train loss gap {gaps[-1]:.3f} at the last epoch)"
    return {"flag": flag, "reason": reason, "gaps": gaps, "loss_ratios": ratios, "best_epoch": history[best]["epoch"],
            "accuracy_gap_last": history[-1]["train_accuracy"] - history[-1]["val_accuracy"]}


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def worst_errors(predictions: list[dict], classes, *, split: str = "test", k: int = 6) -> dict[str, list[dict]]:
    """Per true class, the ``k`` wrong predictions made with the most confidence."""
    out = {}
    for cls in classes:
        wrong = []
        for row in predictions:
            if row["split"] != split or row["label"] != cls:
                continue
            probs = {c: float(row[f"p_{c}"]) for c in classes}
            predicted = max(probs, key=probs.get)
            if predicted != cls:
                wrong.append({"path": row["path"], "predicted": predicted, "confidence": probs[predicted],
                              "p_true": probs[cls]})
        out[cls] = sorted(wrong, key=lambda r: -r["confidence"])[:k]
    return out


def views_ablation(cache: FeatureCache, kind: str, *, positive_class: str | None = None, seed: int = 0,
                   n_resamples: int = 1000) -> list[dict]:
    """The same head kind fitted on the plain train rows of a cache with augmented views, then on every
    view of the same images: each chooses its own head on the plain val rows and is tested on the plain
    test rows, so the views are the only difference (empty for a cache without views or without test)."""
    from featcache.curve import fit_point
    from featcache.fit import load_splits
    from featcache.heads import HeadSettings, resolve_head_options

    classes = cache.classes
    if cache.n_views < 2 or "test" not in cache.split_names():
        return []
    data = load_splits(cache)
    positive = positive_class_index(classes, positive_class) if len(classes) == 2 else None
    rows, images = [], len(data["train"][1]) // cache.n_views
    for views in (1, cache.n_views):
        keep = np.arange(len(data["train"][1])) < images * views  # view-major: the first block is view 0
        point = fit_point(data, keep, kind=resolve_head_options(kind, None, "shuffle"), classes=classes,
                          positive=positive, settings=HeadSettings(seed=seed, cache=str(cache.path)),
                          n_resamples=n_resamples, seed=seed, views=views)
        rows.append({"augmented_views": views - 1, **{k: point[k] for k in (
            "train_images", "train_rows", "head", "val_auroc", "test_auroc", "test_auroc_ci")}})
    return rows


def augmentation_ablation(runs: list[dict]) -> list[dict]:
    """Fine-tuning runs that differ by --augment, side by side (empty when there is nothing to compare)."""
    groups = defaultdict(list)
    for run in runs:
        settings = run.get("run", {}).get("settings")
        if run["kind"] == "finetune" and settings:
            groups[(run["backbone"], settings["freeze_backbone"])].append(run)
    rows = []
    for (backbone, frozen), members in groups.items():
        if len({m["run"]["settings"]["augment"] for m in members}) < 2:
            continue
        for m in sorted(members, key=lambda m: m["run"]["settings"]["augment"]):
            test = m["metrics"].get("test", {})
            rows.append({"backbone": backbone, "mode": "frozen" if frozen else "full",
                         "augment": m["run"]["settings"]["augment"], "val_auroc": m["metrics"]["val"]["auroc"],
                         "test_auroc": test.get("auroc"), "test_accuracy": test.get("accuracy"),
                         "overfitting": m.get("overfitting", {}).get("flag")})
    return rows


EXTREME_THRESHOLD = 0.02  # a threshold this close to 0 or 1 decides almost nothing
MIN_THRESHOLD_VAL = 50  # fewer validation images than this make a chosen threshold unreliable


def run_warnings(runs: list[dict]) -> list[dict]:
    """What a careful reader would flag, computed from each run's metrics and history.

    Each warning is ``{"run", "kind", "text"}``; an empty list means nothing to flag.
    """
    out = []
    n_tests = {r["name"]: r["metrics"].get("test", {}).get("n") for r in runs}
    largest = max((n for n in n_tests.values() if n), default=None)
    for run in runs:
        name, metrics = run["name"], run["metrics"]

        def flag(kind, text, name=name):
            out.append({"run": name, "kind": kind, "text": text})

        classes = metrics.get("classes", [])
        for split in ("val", "test"):
            cm = metrics.get(split, {}).get("confusion_matrix")
            if cm:
                predicted = np.asarray(cm).sum(axis=0)
                if (predicted > 0).sum() == 1 and len(predicted) > 1:
                    flag("one class predicted", f"predicts {classes[int(np.argmax(predicted))]} for every "
                                                f"{split} image")
        thr, rule = metrics.get("threshold"), metrics.get("threshold_rule")
        if thr is not None and min(thr, 1 - thr) <= EXTREME_THRESHOLD:
            flag("extreme threshold", f"threshold {thr:.3f} is within {EXTREME_THRESHOLD} of {round(thr)}")
        n_val = metrics.get("val", {}).get("n")
        if rule not in (None, "fixed", "argmax") and n_val is not None and n_val < MIN_THRESHOLD_VAL:
            flag("threshold from few images", f"threshold chosen ({rule}) on only {n_val} validation images")
        out += [{"run": name, "kind": "head on the grid's edge", "text": t} for t in grid_edges(metrics)]
        history = run.get("history") or []
        accuracies = [h["val_accuracy"] for h in history]
        if len(accuracies) >= 2 and max(accuracies) - min(accuracies) < 1e-9:
            flag("flat validation accuracy", f"validation accuracy is {accuracies[0]:.3f} at every one of "
                                             f"{len(accuracies)} epochs: the model may predict one class throughout")
        if largest and n_tests[name] and n_tests[name] < largest:
            flag("smaller test set", f"tested on {n_tests[name]:,} images where another run has {largest:,}: "
                                     "their test figures are not comparable")
    return out


def classification_report(confusion: list[list[int]], classes) -> dict:
    """scikit-learn's ``classification_report(output_dict=True)``, from a confusion matrix (rows: true class).

    Per class precision, recall, F1 and support, then ``accuracy``, ``macro avg`` and ``weighted avg``;
    an undefined ratio (no prediction of a class, no image of it) is 0, as scikit-learn's default.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    hits = np.diag(cm)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(hits), where=denom > 0)
    out = {c: {"precision": float(p), "recall": float(r), "f1-score": float(f), "support": int(n)}
           for c, p, r, f, n in zip(classes, precision, recall, f1, support)}
    total = support.sum()
    out["accuracy"] = float(hits.sum() / total) if total else 0.0
    out["macro avg"] = {"precision": float(precision.mean()), "recall": float(recall.mean()),
                        "f1-score": float(f1.mean()), "support": int(total)}
    weights = support / total if total else np.zeros_like(support)
    out["weighted avg"] = {"precision": float(weights @ precision), "recall": float(weights @ recall),
                           "f1-score": float(weights @ f1), "support": int(total)}
    return out


def paired_comparison(a: list[dict], b: list[dict], classes, *, threshold_a: float | None,
                      threshold_b: float | None, split: str = "test", n_resamples: int = 1000,
                      seed: int = 0, positive_class: str | None = None) -> dict | None:
    """Run A against run B on the same images: paired patient-bootstrap CI of the AUROC difference
    (A minus B), and McNemar's exact test on which images each gets right at its own threshold.

    ``a`` and ``b`` are predictions.csv rows; images are matched by path. None when the two runs share
    no image of ``split`` or have two classes only in name.
    """
    from scipy.stats import binomtest

    from featcache.eval.metrics import auroc, patient_groups, patient_resamples, positive_class_index

    if len(classes) != 2:
        return None
    positive = positive_class_index(classes, positive_class)
    pos_name = classes[positive]
    pairs, patients, unit = _paired_rows(a, b, split)
    if not pairs:
        return None
    y = np.array([r["label"] == pos_name for r, _ in pairs])
    score_a = np.array([float(r[f"p_{pos_name}"]) for r, _ in pairs])
    score_b = np.array([float(r[f"p_{pos_name}"]) for _, r in pairs])
    diff = auroc(y, score_a) - auroc(y, score_b)
    draws = []
    for rows in patient_resamples(patient_groups(patients), n_resamples=n_resamples, seed=seed):
        if y[rows].all() or not y[rows].any():
            continue
        draws.append(auroc(y[rows], score_a[rows]) - auroc(y[rows], score_b[rows]))
    right_a = (score_a >= (0.5 if threshold_a is None else threshold_a)) == y
    right_b = (score_b >= (0.5 if threshold_b is None else threshold_b)) == y
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p_value = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    ci = [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))] if draws else None
    return {"n": len(pairs), "patients": len(set(patients)), "auroc_difference": float(diff),
            "auroc_difference_ci": ci, "resamples": len(draws), "unit": unit,
            "accuracy_a": float(right_a.mean()), "accuracy_b": float(right_b.mean()),
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": float(p_value)}


def _paired_rows(a: list[dict], b: list[dict], split: str) -> tuple[list, list, str]:
    """The (A row, B row) pairs of the images both runs scored in ``split`` (matched by path), each pair's
    bootstrap unit (its patient, else its path) and the unit's name."""
    rows_b = {r["path"]: r for r in b if r["split"] == split}
    pairs = [(r, rows_b[r["path"]]) for r in a if r["split"] == split and r["path"] in rows_b]
    patients = [r.get("patient") or r["path"] for r, _ in pairs]
    unit = "patient" if all(r.get("patient") for r, _ in pairs) else "image (no patient column)"
    return pairs, patients, unit


def paired_mean_auroc(a: list[dict], b: list[dict], names, *, split: str = "test", n_resamples: int = 1000,
                      seed: int = 0) -> dict | None:
    """Multi-label run A against run B on the same images: the difference of their mean AUROCs over labels
    (A minus B; each label on the rows where A's target is known) with its paired patient-bootstrap CI.
    None when the two runs share no image of ``split``."""
    from featcache.eval.metrics import patient_groups, patient_resamples
    from featcache.fit import multilabel_score

    pairs, patients, unit = _paired_rows(a, b, split)
    if not pairs:
        return None
    targets = np.array([[float(r[f"y_{n}"]) if r[f"y_{n}"] != "" else np.nan for n in names] for r, _ in pairs])
    score_a, score_b = (np.array([[float(r[f"p_{n}"]) for n in names] for r in run])
                        for run in zip(*pairs))
    draws = [multilabel_score(targets[rows], score_a[rows]) - multilabel_score(targets[rows], score_b[rows])
             for rows in patient_resamples(patient_groups(patients), n_resamples=n_resamples, seed=seed)]
    ci = [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))] if draws else None
    return {"n": len(pairs), "patients": len(set(patients)),
            "auroc_difference": float(multilabel_score(targets, score_a) - multilabel_score(targets, score_b)),
            "auroc_difference_ci": ci, "resamples": len(draws), "unit": unit}


LOW_RECALL = 0.7  # a class recalled less often than this on test is worth acting on
STRONG_SHIFT = 0.7  # domain-classifier AUROC from which train and test look clearly different


def recommendations(facts: dict) -> list[dict]:
    """What to try next, each derived from a finding the report shows: ``{"finding", "try"}``."""
    out = []

    def add(finding, action):
        out.append({"finding": finding, "try": action})

    random_runs = [p["run"] for p in facts.get("provenance", []) if p.get("random_init")]
    if random_runs:
        add(f"{len(random_runs)} run(s) start from random weights",
            "extract again with --weights imagenet (or a chest X-ray encoder); random-init features only test "
            "the pipeline")
    for row in facts.get("task_d", []):
        low = [(name, value) for name, value in (("sensitivity", row.get("sensitivity")),
                                                 ("specificity", row.get("specificity")))
               if value is not None and value < LOW_RECALL]
        for name, value in low:
            add(f"{row['run']}: test {name} {value:.3f}",
                "class weighting (--class-weight balanced) or a threshold chosen on validation "
                "(--threshold youden, or --target-sensitivity) to trade the other class's recall for this one")
    for name, verdict in facts.get("overfitting", {}).items():
        if verdict.get("flag"):
            add(f"{name}: {verdict['reason']}",
                "stronger augmentation (--augment strong), early stopping (--early-stop), a lower learning rate, "
                "or the frozen backbone / cached features, which have far fewer weights to overfit")
    shift = facts.get("domain_shift")
    if shift and shift["auroc"] >= STRONG_SHIFT:
        add(f"train and test embeddings are told apart at AUROC {shift['auroc']:.3f}",
            "validation numbers will overstate test numbers; check acquisition differences (scanner, site, "
            "cropping) and report on a validation set drawn like the test set")
    for warning in facts.get("warnings", []):
        if warning["kind"] == "head on the grid's edge":
            add(f"{warning['run']}: {warning['text']}", "extend that hyperparameter's grid past its edge")
    pairs = facts.get("near_duplicates", {}).get("pairs_above", {})
    if facts.get("exact_duplicates") or any(pairs.values()):
        add("near or exact duplicate images across splits", "look at the pairs shown; drop leaked images from test")
    return out
