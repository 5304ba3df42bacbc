"""fit-head: cache -> heads -> selection on validation -> metrics, plots and head.pt.

The test split is read only after the head and its threshold are fixed; no
number computed from it feeds back into any choice. Multi-label sets train
every label at once on the targets of the chosen policy for uncertain and
unmentioned labels, choose the head by mean validation AUROC over labels and
one threshold per label on validation; ``labels`` (any label source, matched
to the cache's rows by path) replaces the cache's own labels.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.cache.h5 import FeatureCache
from featcache.data.labels import MULTILABEL, apply_policy, check_policy
from featcache.errors import UserError
from featcache.options import HEAD
from featcache.runtime.device import peak_host_mb
from featcache.eval.rundir import RunRecord
from featcache.heads import HEADS, HeadSettings, resolve_head_options
from featcache.eval.metrics import (
    auroc,
    choose_threshold,
    evaluate,
    evaluate_multilabel,
    label_thresholds,
    parse_threshold,
    positive_class_index,
)


def load_splits(cache: FeatureCache, labels: "JoinedLabels | None" = None
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """features, labels and patients per split; with ``labels`` joined, its labels, rows without one dropped.

    Train holds every view of its images (view-major: the plain rows, then each augmented view of the same
    images in the same order); val and test their plain rows only, as every choice and test figure is made
    on the images as they are.
    """
    present = cache.split_names()
    for needed in ("train", "val"):
        if needed not in present:
            raise UserError(
                f"{cache.path} has no {needed} split (splits: {', '.join(present)}); "
                "fit-head needs train and val, from DATA/train (val is carved from it) and optionally DATA/test"
            )
    data = {s: cache.arrays(s, views=s == "train") for s in ("train", "val", "test") if s in present}
    if labels is not None:
        for split, (X, _, patients) in data.items():
            rows = cache.rows(split, views=split == "train")
            keep = labels.keep[rows]
            data[split] = X[keep], labels.values[rows][keep], patients[keep]
        if "test" in data and not len(data["test"][1]):  # no test image has a label there
            del data["test"]
    return data


def fit_data(cache: FeatureCache, policy: tuple | None, labels: "JoinedLabels | None" = None,
             where=None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`load_splits` with multi-label targets made by ``policy`` ((uncertain, unmentioned); None for a
    single-label set), refused in one line where train or val cannot fit or choose a head."""
    data = load_splits(cache, labels)
    if policy is not None:
        data = {s: (X, apply_policy(y, *policy), p) for s, (X, y, p) in data.items()}
    check_two_values(data, where or cache.path, policy is not None)
    return data


def check_two_values(data: dict, where, multilabel: bool) -> None:
    """Refuse train or val splits a head cannot be fitted or chosen on (one class only), in one line."""
    for split in ("train", "val"):
        y = data[split][1]
        if multilabel:
            varied = [(np.nansum(c) > 0) and (np.nansum(1 - c) > 0) for c in y.T]
            if not any(varied):
                raise UserError(f"no label of the {split} split of {where} has both positives and negatives known "
                                "under this policy; a head cannot be fitted or chosen")
        elif len(np.unique(y)) < 2:
            raise UserError(f"the {split} split of {where} holds a single class; a head cannot be fitted or chosen")


class JoinedLabels:
    """Labels from a label source matched to a cache's rows by path (``fit-head --labels``)."""

    def __init__(self, cache: FeatureCache, source: str, options: dict):
        from featcache.data.labels import labels_for_paths
        from featcache.data.sources import read_manifest

        manifest = read_manifest(source, **options)
        self.task, self.names = manifest.task, list(manifest.classes)
        self.values, self.keep = labels_for_paths(manifest, cache.read("paths")["paths"])
        if not self.keep.any():
            raise UserError(f"no image of {cache.path} has a label in {source} (paths are matched as the cache "
                            f"stores them, e.g. {cache.read('paths')['paths'][0]!r}, against {manifest.paths[0]!r})"
                            if len(manifest) else f"{source} lists no image")
        self.facts = {"source": str(source), "format": options.get("format") or "folder", "task": self.task,
                      "matched": int(self.keep.sum()), "dropped": int((~self.keep).sum())}


def selection_score(y: np.ndarray, probs: np.ndarray, positive: int | None) -> float:
    """Validation AUROC: of the positive class for two classes, macro one-vs-rest otherwise."""
    if positive is not None:
        value = auroc(y == positive, probs[:, positive])
        return -1.0 if value is None else value
    values = [auroc(y == k, probs[:, k]) for k in range(probs.shape[1])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else -1.0


def multilabel_score(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean validation AUROC over the labels that have both values known."""
    values = []
    for j in range(targets.shape[1]):
        known = ~np.isnan(targets[:, j])
        value = auroc(targets[known, j], probs[known, j])
        if value is not None:
            values.append(value)
    return float(np.mean(values)) if values else -1.0


def select(candidates: list[dict]) -> dict:
    """Highest validation AUROC; ties go to the more regularized head."""
    return max(candidates, key=lambda c: (round(c["val_auroc"], 12), c["rank"]))


# The numeric grid axes a chosen head is checked against: the sweep's and logistic's (lr, weight decay, C),
# knn's (k, temperature) and mlp's (width, weight decay, lr). An axis of fewer than three values has no
# inside to choose, so it is not checked (mlp's default axes have two each; three --lrs make lr checked).
GRID_AXES = ("lr", "weight_decay", "C", "k", "temperature", "width")
MIN_GRID_VALUES = 3


def grid_edges(metrics: dict) -> list[str]:
    """Hyperparameters of the head chosen on validation that sit at the smallest or largest value of their grid
    (read from metrics.json's ``selected`` and ``heads``): the best value may lie beyond the grid."""
    selected, heads = metrics.get("selected", {}), metrics.get("heads", [])
    texts = []
    for key in GRID_AXES:
        values = sorted({h[key] for h in heads if h.get(key) is not None})
        if len(values) >= MIN_GRID_VALUES and selected.get(key) in (values[0], values[-1]):
            side = "smallest" if selected[key] == values[0] else "largest"
            texts.append(f"selected {key} {selected[key]:g} is the {side} of the grid {values[0]:g}..{values[-1]:g}; "
                         "the best value may lie beyond it")
    return texts


def resolve_fit_device(device: str) -> str:
    """``--device`` for a head that trains in torch, torch imported outside the timed fit."""
    from featcache.runtime.device import resolve_device

    return resolve_device(device)


def fit_head(
    cache_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    heads: str = HEAD.heads,
    C: float | None = HEAD.C,
    class_weight: str | None = HEAD.class_weight,
    threshold: str | float = HEAD.threshold,
    target_sensitivity: float | None = HEAD.target_sensitivity,
    sampler: str = HEAD.sampler,
    epochs: int = HEAD.epochs,
    lrs=None,
    weight_decays=None,
    norms=None,
    device: str = HEAD.device,
    n_resamples: int = HEAD.n_resamples,
    seed: int = HEAD.seed,
    positive_class: str | None = HEAD.positive_class,
    uncertain: str = HEAD.uncertain,
    unmentioned: str = HEAD.unmentioned,
    labels: str | None = HEAD.labels,
    label_options: dict | None = None,
) -> dict:
    """Fit ``heads`` on ``cache_path``, choose on val, report val and test into ``out_dir``.

    ``heads`` names a kind of :data:`featcache.heads.HEADS`. ``class_weight``
    None means: ``none`` for logistic and mlp, both settings as a grid axis
    for the sweep and knn; ``lrs``, ``weight_decays`` and ``norms`` None mean
    the kind's own grid. ``uncertain`` and ``unmentioned`` are the multi-label
    policies; ``labels`` a label source (read with ``label_options``:
    ``format`` and its flags) whose labels replace the cache's. Returns the
    metrics written to ``metrics.json``.
    """
    kind = resolve_head_options(heads, class_weight, sampler)
    if C is not None and C <= 0:
        raise UserError(f"--C must be positive, got {C}")
    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    check_policy(uncertain, unmentioned)
    if labels is not None and kind.rereads_cache_labels:  # predict would apply it with the cache's labels
        raise UserError(f"--heads {kind.kind} reads its train labels back from the cache when applied, so it "
                        "cannot be fitted on --labels; use --heads "
                        f"{', '.join(k for k, c in HEADS.items() if not c.rereads_cache_labels)} with --labels")
    rule = parse_threshold(threshold, target_sensitivity)
    from featcache.runtime.outputs import output_folder

    output_folder(out_dir)  # before the fit, not after it
    cache = FeatureCache.open(cache_path)
    joined = JoinedLabels(cache, labels, label_options or {}) if labels is not None else None
    task, classes = (joined.task, joined.names) if joined else (cache.task, cache.label_names)
    multilabel = task == MULTILABEL
    _check_task_options(kind, multilabel, sampler, positive_class, uncertain, unmentioned)
    cache.verify()  # NaN, Inf or altered bytes end here, naming the dataset, not inside a solver
    K = len(classes)
    positive = positive_class_index(classes, positive_class) if K == 2 and not multilabel else None
    data = fit_data(cache, (uncertain, unmentioned) if multilabel else None, joined, where=labels)
    if kind.uses_device:
        device = resolve_fit_device(device)  # imports torch outside the timed fit
    settings = HeadSettings(C=C, class_weight=class_weight, sampler=sampler, epochs=epochs, lrs=lrs,
                            weight_decays=weight_decays, norms=norms, device=device, seed=seed,
                            cache=str(cache.path), policy=(uncertain, unmentioned) if multilabel else None)

    start = time.perf_counter()
    score = multilabel_score if multilabel else (lambda y, probs: selection_score(y, probs, positive))
    candidates = kind.candidates(data["train"][:2], data["val"][:2], K, score, settings)
    best = select(candidates)
    head = best["export"]()
    fit_seconds = time.perf_counter() - start

    probs = {split: head.predict_proba(data[split][0]) for split in ("val", "test") if split in data}
    metrics = run_metrics(
        classes, rule,
        selected={"head": heads, "name": best["name"], **best["params"]},
        heads=[{"name": c["name"], **c["params"], "val_auroc": c["val_auroc"]} for c in candidates],
        fit_seconds=fit_seconds,
        source={"cache": str(cache.path), "backbone": cache.attrs.get("backbone"),
                "weights": cache.attrs.get("weights"), "fingerprint": cache.attrs.get("fingerprint")},
        n_train=len(data["train"][1]) // cache.n_views,  # images; their augmented views are in train_views
        splits={split: (data[split][1], p, data[split][2]) for split, p in probs.items()},
        n_resamples=n_resamples, seed=seed, positive_class=positive_class,
        policy={"uncertain": uncertain, "unmentioned": unmentioned} if multilabel else None,
    )
    if joined is not None:
        metrics["labels"] = joined.facts
    if cache.n_views > 1:
        metrics["train_views"] = {"views_per_image": cache.n_views, "rows": len(data["train"][1]),
                                  "augment": cache.fingerprint_inputs["views"]["augment"]}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(out_dir)
    record.write_head(head, _head_config(metrics, cache))
    record.write_metrics(metrics)
    paths = cache.read("paths")["paths"]
    record.write_predictions(classes, {s: (_split_paths(cache, s, paths, joined), data[s][1], p, data[s][2])
                                       for s, p in probs.items()})
    extract_facts = json.loads(cache.attrs.get("extract", "{}"))
    run = {
        "complete": True,
        "kind": "fit-head",
        "strategy": f"cached features + {heads}",
        "backbone": metrics["backbone"],
        "weights": metrics["weights"],
        "data_root": cache.attrs.get("data_root"),
        # Absolute, and relative to the run folder: a copied project (run folders and caches moved
        # together) finds its cache from here.
        **record.cache_fields(cache.path),
        "extract_seconds": extract_facts.get("seconds"),
        "extract_images_per_second": extract_facts.get("images_per_second"),
        "fit_seconds": fit_seconds,
        "wall_seconds": (extract_facts.get("seconds") or 0.0) + fit_seconds,
        "images_per_second": extract_facts.get("images_per_second"),
        "peak_memory_mb": max(extract_facts.get("peak_memory_mb") or 0.0, peak_host_mb()),
        "peak_host_mb": max(extract_facts.get("peak_memory_mb") or 0.0, peak_host_mb()),
        "peak_gpu_mb": extract_facts.get("peak_gpu_mb"),
        "time_split": {"extract": extract_facts.get("seconds"), "fit": fit_seconds},
        "parameters": _parameters(cache, head),
        "checkpoint_bytes": record.head_path.stat().st_size,
        # Extraction's decode + forward per image (the head adds microseconds), at its batch size.
        "inference": ({"ms_per_image": 1000.0 / extract_facts["images_per_second"],
                       "batch_size": extract_facts.get("batch_size")}
                      if extract_facts.get("images_per_second") else {}),
        "featcache_version": __version__,
        "device": {"extract": (_json_attr(cache.attrs.get("decode")) or {}).get("device"),
                   "fit": device if kind.uses_device else "cpu"},
        "validation": _json_attr(cache.attrs.get("validation")),
        "layout": cache.attrs.get("layout"),
        # Images per split and class: train's plain rows come first, its augmented views after them.
        "counts": {s: _counts(y[: len(y) // (cache.n_views if s == "train" else 1)], classes)
                   for s, (_, y, _) in data.items()},
    }
    record.write_run(run)
    record.write_plots(metrics, {s: (data[s][1], p) for s, p in probs.items()})
    return metrics


def _check_task_options(kind, multilabel: bool, sampler: str, positive_class, uncertain: str,
                        unmentioned: str) -> None:
    """Refuse the flags that do not apply to this task, rather than ignore them."""
    from featcache.data.labels import check_task_flags

    if multilabel:
        if not kind.takes_multilabel:
            raise UserError(f"--heads {kind.kind} fits single-label sets only; for a multi-label set choose one "
                            f"of: {', '.join(k for k, c in HEADS.items() if c.takes_multilabel)}")
        if sampler != "shuffle":
            raise UserError("--sampler balanced draws by class; a multi-label set takes shuffle "
                            "(--class-weight balanced weights each label's positives instead)")
    check_task_flags(multilabel, positive_class, uncertain, unmentioned)


def _split_paths(cache: FeatureCache, split: str, paths: np.ndarray, joined: "JoinedLabels | None") -> np.ndarray:
    rows = cache.rows(split)
    return paths[rows] if joined is None else paths[rows][joined.keep[rows]]


def _counts(y: np.ndarray, classes) -> dict:
    """Images per class; per label, positives, negatives and those unknown under the policy."""
    if y.ndim == 1:
        return {c: int((y == k).sum()) for k, c in enumerate(classes)}
    return {c: {"positive": int((y[:, j] == 1).sum()), "negative": int((y[:, j] == 0).sum()),
                "unknown": int(np.isnan(y[:, j]).sum())} for j, c in enumerate(classes)}


def _parameters(cache: FeatureCache, head) -> dict:
    """Trainable (the head's) and total (backbone + head) parameters of a cached-feature run."""
    trainable = head.n_parameters()
    backbone = cache.attrs.get("backbone_parameters")  # recorded at extraction (caches since this version)
    return {"trainable": trainable, "total": None if backbone is None else int(backbone) + trainable}


def _json_attr(value):
    """An HDF5 attribute that holds JSON text, decoded (or the value as it is)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def run_metrics(classes, rule, *, selected: dict, heads: list[dict], fit_seconds: float, source: dict, n_train: int,
                splits: dict, n_resamples: int, seed: int, positive_class: str | None = None,
                policy: dict | None = None) -> dict:
    """The metrics.json of a run, fit-head or finetune alike (the same keys, the same code).

    ``splits`` maps val (required) and test (optional) to (labels, (N, K)
    probabilities, patients). The threshold is chosen on val by ``rule``.
    With ``policy`` (uncertain, unmentioned) the labels are (N, L) multi-label
    targets, NaN unknown: one threshold per label, per-label metrics.
    """
    if policy is not None:
        return _multilabel_metrics(classes, rule, policy, splits, n_resamples, seed, selected=selected,
                                   heads=heads, fit_seconds=fit_seconds, source=source, n_train=n_train)
    K = len(classes)
    positive = positive_class_index(classes, positive_class) if K == 2 else None
    y_val, val_probs, _ = splits["val"]
    thr = choose_threshold(y_val == positive, val_probs[:, positive], rule) if positive is not None else None
    metrics = {
        "classes": list(classes),
        "positive_class": classes[positive] if positive is not None else None,
        "threshold": thr,
        "threshold_rule": (rule if isinstance(rule, str) else "fixed") if positive is not None else "argmax",
        **_run_facts(selected, heads, fit_seconds, source, n_train),
    }
    for split, (y, p, patients) in splits.items():
        metrics[split] = evaluate(y, p, classes=classes, threshold=thr, positive=positive, patients=patients,
                                  n_resamples=n_resamples, seed=seed)
    return metrics


def _run_facts(selected: dict, heads: list[dict], fit_seconds: float, source: dict, n_train: int) -> dict:
    return {
        "selected": selected,
        "n_heads": len(heads),
        "heads": heads,
        "fit_seconds": fit_seconds,
        "cache": source.get("cache"),
        "backbone": source.get("backbone"),
        "weights": source.get("weights"),
        "fingerprint": source.get("fingerprint"),
        "n_train": int(n_train),
    }


def _multilabel_metrics(names, rule, policy: dict, splits: dict, n_resamples: int, seed: int, **facts) -> dict:
    """metrics.json of a multi-label run: each label's threshold chosen on val by ``rule``, then every split
    judged on the labels known under ``policy``."""
    y_val, val_probs, _ = splits["val"]
    thresholds = label_thresholds(y_val, val_probs, rule)
    metrics = {
        "task": MULTILABEL,
        "classes": list(names),
        "positive_class": None,
        "threshold": None,
        "thresholds": dict(zip(names, thresholds)),
        "threshold_rule": rule if isinstance(rule, str) else "fixed",
        "policy": policy,
        **_run_facts(**facts),
    }
    for split, (y, p, patients) in splits.items():
        metrics[split] = evaluate_multilabel(y, p, names=names, thresholds=thresholds, patients=patients,
                                             n_resamples=n_resamples, seed=seed)
    return metrics


def _head_config(metrics: dict, cache: FeatureCache) -> dict:
    """What predict needs beside the head: classes, threshold, and the backbone and preprocessing to rebuild."""
    config = {k: metrics[k] for k in ("classes", "positive_class", "threshold", "threshold_rule", "selected",
                                      "backbone", "weights", "fingerprint")}
    config.update({k: metrics[k] for k in ("task", "thresholds", "policy") if k in metrics})
    config.update(
        weights_source=cache.attrs.get("weights_source"),
        seed=cache.attrs.get("seed"),
        preprocess=json.loads(cache.attrs.get("preprocess", "{}")),
        decode=cache.fingerprint_inputs.get("decode"),
    )
    return config


def fit_heads(caches: list[str], out_dir: str | os.PathLike, **options) -> list[dict]:
    """Fit every cache into ``out_dir/<cache name>/`` and write ``comparison.json``."""
    from featcache.runtime.outputs import output_folder

    out_dir = output_folder(out_dir)
    names = run_names(caches)
    results = []
    for cache, name in zip(caches, names):
        metrics = fit_head(cache, out_dir / name, **options)
        results.append({"run": name, **comparison_row(metrics)})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def run_names(caches: list[str]) -> list[str]:
    """A short name per cache for tables and runs: its file stem, numbered where two stems are the same."""
    names = [Path(c).stem for c in caches]
    if len(set(names)) < len(names):  # caches with one file name from different folders
        names = [f"{i + 1}-{n}" for i, n in enumerate(names)]
    return names


def comparison_row(metrics: dict) -> dict:
    test = metrics.get("test", {})
    return {
        "backbone": metrics["backbone"],
        "weights": metrics["weights"],
        "head": metrics["selected"]["name"],
        "n_heads": metrics["n_heads"],
        "val_auroc": metrics["val"]["auroc"],
        "test_auroc": test.get("auroc"),
        "test_auroc_ci": test.get("ci", {}).get("auroc"),
        "test_sensitivity": test.get("sensitivity"),
        "test_specificity": test.get("specificity"),
        "fit_seconds": metrics["fit_seconds"],
    }
