"""Heads at cache speed: the batched sweep against one-by-one scikit-learn fits, in one run.

Times, on one cache:
  1. featcache's default sweep: 64 linear heads (lr x weight decay x class
     weight x normalization) trained together, one batched product per step;
  2. one logistic head (scikit-learn, the selected C of ``--heads logistic``);
  3. the same 64 configurations fitted one by one with scikit-learn's
     SGDClassifier (log loss, L2 penalty alpha = weight decay, eta0 = lr,
     the same epochs), the nearest scikit-learn form of an lr x wd grid.

    python bench/heads_sweep.py [CACHE.h5] [--json OUT]

Without CACHE.h5 it extracts resnet18 (--weights none) features of the
shared chest X-ray set into runs/bench/ first (about two minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray_224"
DEFAULT_CACHE = REPO / "runs" / "bench" / "resnet18-none.h5"


def ensure_cache(path: Path) -> Path:
    if not path.exists():
        from featcache.extract import extract

        extract(DEFAULT_DATA, path, backbone="resnet18", weights="none", progress=sys.stdout.isatty())
    return path


def timed(fn, repeats: int = 3):
    """(best seconds, last result) over ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", nargs="?", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from rich.table import Table
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier

    from featcache.cache import FeatureCache
    from featcache.console import get_console
    from featcache.fit import selection_score
    from featcache.heads import (DEFAULT_EPOCHS, FeatureNorm, LinearHeadSweep, LogisticHead, class_weight_vector,
                                 sweep_grid)

    console = get_console()
    cache = FeatureCache.open(ensure_cache(Path(args.cache) if args.cache else DEFAULT_CACHE))
    X, y, _ = cache.arrays("train")
    Xv, yv, _ = cache.arrays("val")
    K = len(cache.classes)
    positive = 1 if K == 2 else None
    grid = sweep_grid()
    console.print(f"{cache.path}: {X.shape[0]} x {X.shape[1]} train rows, {len(yv)} val rows; "
                  f"{torch.get_num_threads()} torch threads")

    sweep_s, sweep = timed(lambda: LinearHeadSweep(grid).fit(X, y, K))
    sweep_best = max(selection_score(yv, p, positive) for p in sweep.predict_proba(Xv))
    logistic_s, logistic = timed(lambda: LogisticHead(C=0.1).fit(X, y))
    logistic_auroc = selection_score(yv, logistic.predict_proba(Xv), positive)

    norms = {kind: FeatureNorm(kind).fit(X) for kind in ("standard", "l2")}
    inputs = {kind: (n.transform(X), n.transform(Xv)) for kind, n in norms.items()}
    start = time.perf_counter()
    sk_best = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for config in grid:
            Xt, Xvt = inputs[config.norm]
            weights = dict(enumerate(class_weight_vector(y, K, config.class_weight)))
            model = SGDClassifier(loss="log_loss", penalty="l2", alpha=config.weight_decay, learning_rate="invscaling",
                                  eta0=config.lr, max_iter=DEFAULT_EPOCHS, tol=None, class_weight=weights,
                                  random_state=0).fit(Xt, y)
            sk_best = max(sk_best, selection_score(yv, model.predict_proba(Xvt), positive))
    sklearn_s = time.perf_counter() - start

    table = Table(title=f"{len(grid)} linear heads on {cache.attrs.get('backbone')} features", title_justify="left")
    for col in ("method", "heads", "seconds", "per head (s)", "best val AUROC", "vs sweep"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = [
        ("sweep, batched (torch)", len(grid), sweep_s, sweep_best),
        ("logistic, C=0.1 (sklearn)", 1, logistic_s, logistic_auroc),
        ("grid one by one (sklearn SGD)", len(grid), sklearn_s, sk_best),
    ]
    for name, n, seconds, auc in rows:
        table.add_row(name, str(n), f"{seconds:.2f}", f"{seconds / n:.3f}", f"{auc:.4f}", f"{seconds / sweep_s:.1f}x")
    console.print(table)
    console.print(f"sweep is [bold]{sklearn_s / sweep_s:.1f}x[/] faster than fitting its grid one by one")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": X.shape[0], "dim": X.shape[1], "heads": len(grid),
            "sweep_seconds": sweep_s, "sweep_best_val_auroc": sweep_best,
            "logistic_seconds": logistic_s, "logistic_val_auroc": logistic_auroc,
            "sklearn_one_by_one_seconds": sklearn_s, "sklearn_best_val_auroc": sk_best,
            "ratio_sklearn_to_sweep": sklearn_s / sweep_s,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
