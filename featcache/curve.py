"""curve: label-efficiency curves from a cache (test AUROC against the number of training images).

Each point is one subset of the training patients (a fraction of each
class's images, whole patients, or ``shots`` images per class from distinct
patients where possible), seeded by its repeat, so the subsets of one repeat
are nested as the fraction grows. The head sweep is fitted on the subset and
chosen on the whole validation split; the test split is read only after the
choice, for the test AUROC and its patient-bootstrap CI. Every point is
written to ``curve.json`` as it finishes, so a rerun skips the finished ones.

Multi-label caches (the targets made by ``--uncertain``/``--unmentioned``)
take subsets stratified over every label's positives (iterative
stratification over patients, each fraction carved from the next larger one
so they stay nested), choose each point's head by mean validation AUROC over
labels and report the mean test AUROC (macro) with its CI. A shot there is a
positive image: ``shots`` N takes at least N positives of every label
(rarest label first; an image counts for every label it is positive for, so
common labels may get more) and at least one negative of each.

A cache with augmented views (``extract --aug-views K``) draws its subsets from
the train images as they are and trains each point on every view of the
images it drew, as fit-head trains on every view of all of them; its
``train_images`` counts images, ``train_rows`` the rows with their views.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from featcache.cache.h5 import FeatureCache
from featcache.data.labels import MULTILABEL, POSITIVE, check_policy, check_task_flags
from featcache.data.splits import iterative_stratification
from featcache.errors import UserError
from featcache.eval.metrics import FALLBACK_THRESHOLD, evaluate, evaluate_multilabel, positive_class_index
from featcache.fit import fit_data, multilabel_score, resolve_fit_device, run_names, select, selection_score
from featcache.heads import HeadSettings, resolve_head_options
from featcache.options import HEAD

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
DEFAULT_REPEATS = 5
DEFAULT_RESAMPLES = 200  # a point's CI: small, as there are dozens of points
COLUMNS = ("cache", "mode", "value", "repeat", "train_images", "train_patients", "head", "val_auroc", "test_auroc",
           "test_auroc_low", "test_auroc_high")


def fraction_subset(patients: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows of whole training patients, about ``fraction`` of each class's images, at least one image of each class.

    A patient counts towards its most frequent label. Patients are taken in
    one seeded order per class, so a larger fraction with the same seed takes
    every patient a smaller one took.
    """
    per_patient: dict = defaultdict(Counter)
    for patient, label in zip(patients, labels):
        per_patient[patient][int(label)] += 1
    by_class: dict = defaultdict(list)
    for patient in sorted(per_patient):
        label = min(per_patient[patient].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        by_class[label].append(patient)
    rng = np.random.default_rng(seed)
    chosen: set = set()
    for label in sorted(by_class):
        members = by_class[label]
        order = [members[i] for i in rng.permutation(len(members))]
        target = max(1, round(fraction * sum(sum(per_patient[p].values()) for p in members)))
        taken = 0
        for patient in order:
            if taken >= target:
                break
            chosen.add(patient)
            taken += sum(per_patient[patient].values())
    for label in sorted({int(v) for v in labels}):  # a class that is no patient's commonest still gets one
        if not any(per_patient[p][label] for p in chosen):
            holders = sorted(p for p in per_patient if per_patient[p][label])
            chosen.add(holders[rng.integers(len(holders))])
    return np.isin(patients, list(chosen))


def _patients_first(rows: np.ndarray, patients: np.ndarray) -> list:
    """``rows`` reordered: the first row of each patient, in order, then the others."""
    seen: set = set()
    first, rest = [], []
    for r in rows:
        (rest if patients[r] in seen else first).append(r)
        seen.add(patients[r])
    return first + rest


def shot_subset(patients: np.ndarray, labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` images of each class (all it has when fewer), one per patient until its patients run out."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep[_patients_first(rows[rng.permutation(len(rows))], patients)[:shots]] = True
    return keep


def _cover_every_label(keep: np.ndarray, within: np.ndarray, patients: np.ndarray, targets: np.ndarray,
                       rng) -> np.ndarray:
    """``keep`` plus, for each label value (positive, negative) ``within`` holds but ``keep`` lacks, a seeded
    patient of ``within`` who has it: every label the subset can be fitted on stays fittable."""
    keep = keep.copy()
    for j in range(targets.shape[1]):
        for value in (1.0, 0.0):
            if (targets[keep, j] == value).any():
                continue
            holders = np.unique(patients[within & (targets[:, j] == value)])
            if len(holders):
                keep |= patients == holders[rng.integers(len(holders))]
    return keep


def label_fraction_subsets(patients: np.ndarray, targets: np.ndarray, fractions, seed: int) -> dict:
    """Multi-label: fraction -> rows of whole patients, about that fraction of all images and of every
    label's positives (iterative stratification), each fraction carved from the next larger one (nested)."""
    rng = np.random.default_rng(seed)
    keep, share, out = np.ones(len(patients), dtype=bool), 1.0, {}
    for fraction in sorted(fractions, reverse=True):
        if fraction < share:
            rows = np.flatnonzero(keep)
            chosen = iterative_stratification(patients[rows], targets[rows] == POSITIVE, fraction=fraction / share,
                                              seed=int(rng.integers(2**31)))
            keep = _cover_every_label(keep & np.isin(patients.astype(str), list(chosen)), keep, patients, targets,
                                      rng)
            share = fraction
        out[fraction] = keep
    return out


def label_shot_subset(patients: np.ndarray, targets: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Multi-label: at least ``shots`` positive images of every label (all it has when fewer), rarest label
    first, distinct patients first; an image taken for one label counts for every label it is positive for.
    Then at least one negative of each label."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(targets), dtype=bool)
    positives = targets == 1.0
    for j in np.argsort(positives.sum(axis=0), kind="stable"):
        missing = shots - int(positives[keep, j].sum())
        rows = np.flatnonzero(positives[:, j] & ~keep)
        if missing > 0:
            keep[_patients_first(rows[rng.permutation(len(rows))], patients)[:missing]] = True
    everything = np.ones(len(targets), dtype=bool)
    return _cover_every_label(keep, everything, np.arange(len(targets)), targets, rng)


def subsets(mode: str, patients: np.ndarray, y: np.ndarray, values: list, seed: int) -> dict:
    """value -> the train rows of each point of one repeat, for either task."""
    if y.ndim == 2:
        if mode == "shots":
            return {v: label_shot_subset(patients, y, v, seed) for v in values}
        return label_fraction_subsets(patients, y, values, seed)
    pick = shot_subset if mode == "shots" else fraction_subset
    return {v: pick(patients, y, v, seed) for v in values}


def fit_point(data: dict, keep: np.ndarray, *, kind, classes, positive: int | None, settings: HeadSettings,
              n_resamples: int, seed: int, views: int = 1) -> dict:
    """Fit ``kind`` on the ``keep`` rows of train, choose on the whole of val, then judge test.

    ``views``: rows per train image in ``keep`` (each image's plain row and its augmented views).
    Multi-label: chosen by mean validation AUROC; the test AUROC is the mean over labels (macro)."""
    X, y, patients = data["train"]
    multilabel = y.ndim == 2
    score = multilabel_score if multilabel else (lambda yv, probs: selection_score(yv, probs, positive))
    candidates = kind.candidates((X[keep], y[keep]), data["val"][:2], len(classes), score, settings)
    best = select(candidates)
    per_class = ({c: int((y[keep, j] == 1).sum()) // views for j, c in enumerate(classes)} if multilabel else
                 {c: int((y[keep] == k).sum()) // views for k, c in enumerate(classes)})
    point = {"train_images": int(keep.sum()) // views, "train_rows": int(keep.sum()),
             "train_patients": int(len(np.unique(patients[keep]))),
             "train_per_class": per_class, "head": best["name"], "val_auroc": best["val_auroc"],
             "test_auroc": None, "test_auroc_ci": None}
    if "test" in data:  # read only now: nothing from it steers the choice above
        Xt, yt, pt = data["test"]
        probs = best["export"]().predict_proba(Xt)
        if multilabel:  # AUROC needs no threshold: each label's is the fallback, unused
            metrics = evaluate_multilabel(yt, probs, names=classes, thresholds=[FALLBACK_THRESHOLD] * len(classes),
                                          patients=pt, n_resamples=n_resamples, seed=seed)
        else:
            metrics = evaluate(yt, probs, classes=classes, positive=positive,
                               threshold=0.5 if positive is not None else None, patients=pt,
                               n_resamples=n_resamples, seed=seed)
        point["test_auroc"] = metrics.get("auroc")
        point["test_auroc_ci"] = metrics.get("ci", {}).get("auroc")
    return point


def _open(path, policy: tuple, positive_class: str | None) -> tuple[FeatureCache, dict, list]:
    cache = FeatureCache.open(path)
    multilabel = cache.task == MULTILABEL
    check_task_flags(multilabel, positive_class, *policy)
    cache.verify()
    return cache, fit_data(cache, policy if multilabel else None), list(cache.label_names)


def _save(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # a run killed mid-write leaves the last whole file


def curve(caches: list[str], out, *, fractions=None, shots=None, repeats: int = DEFAULT_REPEATS,
          heads: str = "sweep", epochs: int = HEAD.epochs, device: str = HEAD.device,
          n_resamples: int = DEFAULT_RESAMPLES, seed: int = HEAD.seed, positive_class: str | None = None,
          uncertain: str = HEAD.uncertain, unmentioned: str = HEAD.unmentioned, overwrite: bool = False,
          progress=None) -> dict:
    """Every point of every cache into ``out/curve.json`` (resumed), then curve.csv and curve.png.

    ``fractions`` of each class's training images (whole patients), or
    ``shots`` images per class (per label: positives, for multi-label caches,
    whose targets ``uncertain`` and ``unmentioned`` make); repeat r draws its
    subsets with seed ``seed + r``. Returns what curve.json holds.
    """
    from featcache.runtime.outputs import output_folder

    if fractions is not None and shots is not None:
        raise UserError("give --fractions or --per-class-shots, not both")
    if shots is not None:
        mode, values = "shots", sorted({int(s) for s in shots})
        if values[0] < 1:
            raise UserError(f"--per-class-shots must be at least 1, got {values[0]}")
    else:
        mode, values = "fraction", sorted({float(f) for f in (fractions or DEFAULT_FRACTIONS)})
        if values[0] <= 0 or values[-1] > 1:
            raise UserError(f"--fractions must lie in (0, 1], got {values[0] if values[0] <= 0 else values[-1]:g}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if not caches:
        raise UserError("CACHE is required: one or more caches written by featcache extract")
    kind = resolve_head_options(heads, None, "shuffle")
    check_policy(uncertain, unmentioned)
    out = output_folder(out)
    opened = []
    try:
        for c in caches:  # every refusal before the first fit
            opened.append(_open(c, (uncertain, unmentioned), positive_class))
        tasks = {cache.task == MULTILABEL for cache, _, _ in opened}
        if len(tasks) > 1:
            raise UserError("curve compares caches of one task: give multi-label and single-label caches "
                            "to separate curves")
        policy = {"uncertain": uncertain, "unmentioned": unmentioned} if tasks == {True} else None
        return _run(opened, run_names(caches), out, kind, mode, values, repeats=repeats, heads=heads,
                    epochs=epochs, device=device, n_resamples=n_resamples, seed=seed, positive_class=positive_class,
                    policy=policy, overwrite=overwrite, progress=progress)
    finally:
        for cache, _, _ in opened:
            cache.close()


def _run(opened: list, names: list[str], out: Path, kind, mode: str, values: list, *, repeats: int, heads: str,
         epochs: int, device: str, n_resamples: int, seed: int, positive_class: str | None, policy: dict | None,
         overwrite: bool, progress) -> dict:
    settings_record = {
        "mode": mode, "values": values, "repeats": repeats, "heads": heads, "epochs": epochs, "seed": seed,
        "bootstrap": n_resamples, "positive_class": positive_class,
        "caches": [{"name": n, "fingerprint": c.attrs.get("fingerprint")} for n, (c, _, _) in zip(names, opened)],
        **({"task": MULTILABEL, "policy": policy} if policy else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.json"
    record = {"settings": settings_record, "points": []}
    if path.exists() and not overwrite:
        previous = json.loads(path.read_text())
        if previous.get("settings") != settings_record:
            raise UserError(f"{path} was made with other settings (caches, points, repeats, heads, seed or "
                            "label policy); "
                            "give another --out or --overwrite to replace it")
        record = previous
    done = {(p["cache"], p["value"], p["repeat"]) for p in record["points"]}
    if kind.uses_device:
        device = resolve_fit_device(device)
    for name, (cache, data, classes) in zip(names, opened):
        positive = positive_class_index(classes, positive_class) if len(classes) == 2 else None
        settings = HeadSettings(epochs=epochs, device=device, seed=seed, cache=str(cache.path),
                                policy=(policy["uncertain"], policy["unmentioned"]) if policy else None)
        views = cache.n_views
        images = len(data["train"][1]) // views  # the plain rows come first, then each view of the same images
        y, patients = data["train"][1][:images], data["train"][2][:images]
        for repeat in range(repeats):
            keeps = subsets(mode, patients, y, values, seed + repeat)
            for value in values:
                if (name, value, repeat) in done:
                    continue
                chosen = keeps[value]
                point = {"cache": name, "backbone": cache.attrs.get("backbone"), "mode": mode, "value": value,
                         "repeat": repeat,
                         **fit_point(data, np.tile(chosen, views), kind=kind, classes=classes, positive=positive,
                                     settings=settings, n_resamples=n_resamples, seed=seed, views=views)}
                record["points"].append(point)
                _save(path, record)
                if progress is not None:
                    progress(point)
    record["summary"] = summarize(record["points"])
    _save(path, record)
    write_csv(record["points"], out / "curve.csv")
    from featcache.report.plots import plot_curve

    plot_curve(record["summary"], out / "curve.png", mode=mode, multilabel=policy is not None)
    return record


def summarize(points: list[dict]) -> list[dict]:
    """Per cache and value: mean images and patients, val AUROC mean, test AUROC mean and sd over repeats, and
    the mean of the repeats' test CI bounds, and their span (lowest low, highest high: an interval that holds
    every repeat's)."""
    groups: dict = defaultdict(list)
    for p in points:
        groups[(p["cache"], p["value"])].append(p)
    rows = []
    for (name, value), ps in groups.items():
        test = [p["test_auroc"] for p in ps if p["test_auroc"] is not None]
        cis = [p["test_auroc_ci"] for p in ps if p.get("test_auroc_ci")]
        rows.append({"cache": name, "mode": ps[0]["mode"], "value": value, "repeats": len(ps),
                     "train_images": float(np.mean([p["train_images"] for p in ps])),
                     "train_patients": float(np.mean([p["train_patients"] for p in ps])),
                     "val_auroc": float(np.mean([p["val_auroc"] for p in ps])),
                     "test_auroc": float(np.mean(test)) if test else None,
                     "test_auroc_sd": float(np.std(test, ddof=1)) if len(test) > 1 else (0.0 if test else None),
                     "test_auroc_ci": [float(v) for v in np.mean(cis, axis=0)] if cis else None,
                     "test_auroc_ci_span": [min(c[0] for c in cis), max(c[1] for c in cis)] if cis else None})
    return sorted(rows, key=lambda r: (r["cache"], r["value"]))


def write_csv(points: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for p in points:
            ci = p["test_auroc_ci"] or [None, None]
            row = {**p, "test_auroc_low": ci[0], "test_auroc_high": ci[1]}
            writer.writerow([f"{row[c]:.4f}" if isinstance(row[c], float) and c != "value" else row[c]
                             for c in COLUMNS])


def table(summary: list[dict], multilabel: bool = False):
    """The curve as a rich table, one row per cache and point (multi-label: mean AUROCs over labels)."""
    from rich import box
    from rich.table import Table

    t = Table(title="label efficiency: heads chosen on the whole validation split, test never used to choose",
              box=box.SIMPLE_HEAD, title_justify="left")
    mode = summary[0]["mode"] if summary else "fraction"
    mean = "mean " if multilabel else ""
    for col in ("cache", "fraction" if mode == "fraction" else "positives" if multilabel else "per class", "images",
                "patients", f"val {mean}AUROC", f"test {mean}AUROC ± sd"):
        t.add_column(col, justify="left" if col == "cache" else "right", no_wrap=True)
    for r in summary:
        test = "-" if r["test_auroc"] is None else f"{r['test_auroc']:.3f} ± {r['test_auroc_sd']:.3f}"
        t.add_row(r["cache"], f"{r['value']:g}", f"{r['train_images']:.0f}", f"{r['train_patients']:.0f}",
                  f"{r['val_auroc']:.3f}", test)
    return t
