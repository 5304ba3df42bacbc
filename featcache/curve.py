"""curve: label-efficiency curves from a cache (test AUROC against the number of training images).

Each point is one subset of the training patients (a fraction of each
class's images, whole patients, or ``shots`` images per class from distinct
patients where possible), seeded by its repeat, so the subsets of one repeat
are nested as the fraction grows. The head sweep is fitted on the subset and
chosen on the whole validation split; the test split is read only after the
choice, for the test AUROC and its patient-bootstrap CI. Every point is
written to ``curve.json`` as it finishes, so a rerun skips the finished ones.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from featcache.cache.h5 import FeatureCache
from featcache.data.labels import MULTILABEL
from featcache.errors import UserError
from featcache.eval.metrics import evaluate, positive_class_index
from featcache.fit import check_two_values, load_splits, resolve_fit_device, run_names, select, selection_score
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


def shot_subset(patients: np.ndarray, labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` images of each class (all it has when fewer), one per patient until its patients run out."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = rows[rng.permutation(len(rows))]
        seen: set = set()
        first, rest = [], []
        for r in rows:
            (rest if patients[r] in seen else first).append(r)
            seen.add(patients[r])
        keep[(first + rest)[:shots]] = True
    return keep


def fit_point(data: dict, keep: np.ndarray, *, kind, classes, positive: int | None, settings: HeadSettings,
              n_resamples: int, seed: int) -> dict:
    """Fit ``kind`` on the ``keep`` rows of train, choose on the whole of val, then judge test."""
    X, y, patients = data["train"]
    K = len(classes)
    candidates = kind.candidates((X[keep], y[keep]), data["val"][:2], K,
                                 lambda yv, probs: selection_score(yv, probs, positive), settings)
    best = select(candidates)
    point = {"train_images": int(keep.sum()), "train_patients": int(len(np.unique(patients[keep]))),
             "train_per_class": {c: int((y[keep] == k).sum()) for k, c in enumerate(classes)},
             "head": best["name"], "val_auroc": best["val_auroc"], "test_auroc": None, "test_auroc_ci": None}
    if "test" in data:  # read only now: nothing from it steers the choice above
        Xt, yt, pt = data["test"]
        metrics = evaluate(yt, best["export"]().predict_proba(Xt), classes=classes, positive=positive,
                           threshold=0.5 if positive is not None else None, patients=pt,
                           n_resamples=n_resamples, seed=seed)
        point["test_auroc"] = metrics.get("auroc")
        point["test_auroc_ci"] = metrics.get("ci", {}).get("auroc")
    return point


def _open(path) -> tuple[FeatureCache, dict, list]:
    cache = FeatureCache.open(path)
    if cache.task == MULTILABEL:
        raise UserError(f"{cache.path} is multi-label; curve takes single-label caches for now")
    cache.verify()
    data = load_splits(cache)
    check_two_values(data, cache.path, False)
    return cache, data, list(cache.label_names)


def _save(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # a run killed mid-write leaves the last whole file


def curve(caches: list[str], out, *, fractions=None, shots=None, repeats: int = DEFAULT_REPEATS,
          heads: str = "sweep", epochs: int = HEAD.epochs, device: str = HEAD.device,
          n_resamples: int = DEFAULT_RESAMPLES, seed: int = HEAD.seed, positive_class: str | None = None,
          overwrite: bool = False, progress=None) -> dict:
    """Every point of every cache into ``out/curve.json`` (resumed), then curve.csv and curve.png.

    ``fractions`` of each class's training images (whole patients), or
    ``shots`` images per class; repeat r draws its subsets with seed
    ``seed + r``. Returns what curve.json holds.
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
    out = output_folder(out)
    opened = []
    try:
        for c in caches:  # every refusal before the first fit
            opened.append(_open(c))
        return _run(opened, run_names(caches), out, kind, mode, values, repeats=repeats, heads=heads,
                    epochs=epochs, device=device, n_resamples=n_resamples, seed=seed, positive_class=positive_class,
                    overwrite=overwrite, progress=progress)
    finally:
        for cache, _, _ in opened:
            cache.close()


def _run(opened: list, names: list[str], out: Path, kind, mode: str, values: list, *, repeats: int, heads: str,
         epochs: int, device: str, n_resamples: int, seed: int, positive_class: str | None, overwrite: bool,
         progress) -> dict:
    settings_record = {
        "mode": mode, "values": values, "repeats": repeats, "heads": heads, "epochs": epochs, "seed": seed,
        "bootstrap": n_resamples, "positive_class": positive_class,
        "caches": [{"name": n, "fingerprint": c.attrs.get("fingerprint")} for n, (c, _, _) in zip(names, opened)],
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.json"
    record = {"settings": settings_record, "points": []}
    if path.exists() and not overwrite:
        previous = json.loads(path.read_text())
        if previous.get("settings") != settings_record:
            raise UserError(f"{path} was made with other settings (caches, points, repeats, heads or seed); "
                            "give another --out or --overwrite to replace it")
        record = previous
    done = {(p["cache"], p["value"], p["repeat"]) for p in record["points"]}
    if kind.uses_device:
        device = resolve_fit_device(device)
    for name, (cache, data, classes) in zip(names, opened):
        positive = positive_class_index(classes, positive_class) if len(classes) == 2 else None
        settings = HeadSettings(epochs=epochs, device=device, seed=seed, cache=str(cache.path))
        _, y, patients = data["train"]
        for repeat in range(repeats):
            for value in values:
                if (name, value, repeat) in done:
                    continue
                keep = (shot_subset(patients, y, value, seed + repeat) if mode == "shots"
                        else fraction_subset(patients, y, value, seed + repeat))
                point = {"cache": name, "backbone": cache.attrs.get("backbone"), "mode": mode, "value": value,
                         "repeat": repeat, **fit_point(data, keep, kind=kind, classes=classes, positive=positive,
                                                       settings=settings, n_resamples=n_resamples, seed=seed)}
                record["points"].append(point)
                _save(path, record)
                if progress is not None:
                    progress(point)
    record["summary"] = summarize(record["points"])
    _save(path, record)
    write_csv(record["points"], out / "curve.csv")
    from featcache.report.plots import plot_curve

    plot_curve(record["summary"], out / "curve.png", mode=mode)
    return record


def summarize(points: list[dict]) -> list[dict]:
    """Per cache and value: mean images and patients, val AUROC mean, test AUROC mean and sd over repeats, and
    the span of the repeats' test CIs (lowest low, highest high: an interval that holds every repeat's)."""
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


def table(summary: list[dict]):
    """The curve as a rich table, one row per cache and point."""
    from rich import box
    from rich.table import Table

    t = Table(title="label efficiency: heads chosen on the whole validation split, test never used to choose",
              box=box.SIMPLE_HEAD, title_justify="left")
    mode = summary[0]["mode"] if summary else "fraction"
    for col in ("cache", "fraction" if mode == "fraction" else "per class", "images", "patients", "val AUROC",
                "test AUROC ± sd"):
        t.add_column(col, justify="left" if col == "cache" else "right", no_wrap=True)
    for r in summary:
        test = "-" if r["test_auroc"] is None else f"{r['test_auroc']:.3f} ± {r['test_auroc_sd']:.3f}"
        t.add_row(r["cache"], f"{r['value']:g}", f"{r['train_images']:.0f}", f"{r['train_patients']:.0f}",
                  f"{r['val_auroc']:.3f}", test)
    return t
