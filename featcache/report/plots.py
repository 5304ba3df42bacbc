"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit_square(plt, fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, legend: str) -> None:
    """Finish a plot whose axes are both probabilities, save it and free it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=8)
    ax.legend(loc=legend, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion_matrix(matrix, classes, path: Path, *, title: str) -> None:
    """Counts with row percentages; rows are the true class."""
    plt = _pyplot()
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=120)
    ax.imshow(cm, cmap="Blues")
    totals = cm.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            dark = cm[i, j] > cm.max() / 2
            ax.text(j, i, f"{cm[i, j]}\n{100 * cm[i, j] / totals[i, 0]:.1f}%", ha="center", va="center",
                    color="white" if dark else "black", fontsize=10)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _one_vs_rest(curves: dict, positive: int | None, classes) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, is_positive, score) per curve: each split for two classes, each class of the last split else."""
    if positive is not None:
        return [(split, np.asarray(y) == positive, np.asarray(p)[:, positive]) for split, (y, p) in curves.items()]
    split = list(curves)[-1]
    y, p = curves[split]
    return [(f"{split}: {name}", np.asarray(y) == k, np.asarray(p)[:, k]) for k, name in enumerate(classes)]


def plot_roc(curves: dict, positive: int | None, path: Path, *, title: str, threshold: float | None = None,
             classes=None) -> None:
    """ROC curves; ``curves`` maps split -> (y_true, (N, K) probabilities).

    Two classes: one curve per split, with the operating point of
    ``threshold`` marked. More classes: one-vs-rest curves of the last split.
    """
    from featcache.eval.metrics import auroc, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    for label, is_pos, scores in _one_vs_rest(curves, positive, classes):
        fpr, tpr, _ = roc_curve(is_pos, scores)
        area = auroc(is_pos, scores)
        (line,) = ax.plot(fpr, tpr, lw=1.6, label=f"{label} (AUROC {area:.3f})" if area is not None else label)
        if threshold is not None and positive is not None:
            sens = np.mean(scores[is_pos] >= threshold) if is_pos.any() else 0.0
            fall_out = np.mean(scores[~is_pos] >= threshold) if (~is_pos).any() else 0.0
            ax.plot([fall_out], [sens], "o", color=line.get_color(), ms=6, mec="black", mew=0.6)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    if threshold is not None and positive is not None:
        ax.plot([], [], "o", color="white", mec="black", mew=0.6, label=f"threshold {threshold:.3f}")
    _unit_square(plt, fig, ax, path, xlabel="1 - specificity (false positive rate)",
                 ylabel="sensitivity (true positive rate)", title=title, legend="lower right")


def plot_roc_grid(targets, probs, names, thresholds, path: Path, *, title: str) -> None:
    """One small ROC per label (multi-label runs), on the rows where the label is known, each label's
    operating point marked."""
    from featcache.eval.metrics import auroc, roc_curve

    plt = _pyplot()
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows + 0.4), dpi=110, squeeze=False)
    targets, probs = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    for j, ax in enumerate(axes.flat):
        if j >= len(names):
            ax.axis("off")
            continue
        known = ~np.isnan(targets[:, j])
        y, s = targets[known, j].astype(bool), probs[known, j]
        area = auroc(y, s)
        if area is not None:
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, lw=1.3)
            ax.plot([np.mean(s[~y] >= thresholds[j])], [np.mean(s[y] >= thresholds[j])], "o", ms=4, mec="black",
                    mew=0.5)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.6, color="grey")
        ax.set_title(f"{names[j]}\n" + (f"AUROC {area:.3f}" if area is not None else "one class only"),
                     fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pr(curves: dict, positive: int | None, path: Path, *, title: str, classes=None) -> None:
    """Precision-recall curves, with each curve's prevalence as its no-skill line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    for label, is_pos, scores in _one_vs_rest(curves, positive, classes):
        order = np.argsort(-scores, kind="mergesort")
        hits = is_pos[order]
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1)
        recall = tp / max(int(is_pos.sum()), 1)
        (line,) = ax.plot(np.r_[0.0, recall], np.r_[1.0, precision], lw=1.6, label=label)
        ax.axhline(is_pos.mean(), ls=":", lw=0.8, color=line.get_color())
    _unit_square(plt, fig, ax, path, xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title,
                 legend="lower left")


def plot_reliability(tables: dict, path: Path, *, title: str, binary: bool) -> None:
    """Reliability diagram from :func:`featcache.eval.metrics.calibration` bins, one line per split."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
    for split, bins in tables.items():
        if bins:
            ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], "o-", lw=1.4, ms=4,
                    label=f"{split} ({sum(b['n'] for b in bins)} images)")
    _unit_square(plt, fig, ax, path,
                 xlabel="predicted probability of the positive class" if binary else "top-class confidence",
                 ylabel="observed positive rate" if binary else "accuracy", title=title, legend="upper left")


def plot_learning_curves(history: list[dict], path: Path, *, title: str) -> None:
    """Loss (train, val) and validation AUROC / accuracy per epoch; a widening loss gap means overfitting."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.6), dpi=120)
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    left.legend(fontsize=8)
    right.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    right.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    right.plot(epochs, [h["val_auroc"] for h in history], "s-", label="val AUROC")
    best = max(history, key=lambda h: h["val_auroc"])
    right.axvline(best["epoch"], ls=":", color="grey", lw=0.8)
    right.set_xlabel("epoch")
    right.set_ylim(0, 1.01)
    right.legend(fontsize=8, loc="lower right")
    for ax in (left, right):
        ax.set_xticks(epochs)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_auroc_vs_time(rows: list[dict], path: Path) -> None:
    """Test AUROC against wall seconds (log scale), labelled by run, coloured by strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    strategies = sorted({r["strategy"] for r in rows})
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(strategies)}
    for s in strategies:
        pts = [r for r in rows if r["strategy"] == s and r["wall_seconds"] and r["test_auroc"] is not None]
        ax.scatter([r["wall_seconds"] for r in pts], [r["test_auroc"] for r in pts], s=40, color=colors[s], label=s)
        for r in pts:
            ax.annotate(r["run"], (r["wall_seconds"], r["test_auroc"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s, log scale)")
    ax.set_ylabel("test AUROC")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _thumb(root: str, rel: str, size: int = 160):
    from PIL import Image

    try:
        with Image.open(Path(root) / rel) as im:
            im = im.convert("L")
            im.thumbnail((size, size))
            return np.asarray(im)
    except Exception:
        return np.zeros((size, size), dtype=np.uint8)


def plot_error_thumbnails(root: str, errors: dict, path: Path) -> None:
    """One row per true class: its most confident wrong predictions, with the predicted class."""
    plt = _pyplot()
    rows = [(cls, items) for cls, items in errors.items() if items]
    cols = max(len(items) for _, items in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.2 * len(rows)), dpi=110, squeeze=False)
    for i, (cls, items) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(items):
                item = items[j]
                ax.imshow(_thumb(root, item["path"]), cmap="gray")
                ax.set_title(f"true {cls}\n-> {item['predicted']} {item['confidence']:.2f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pair_thumbnails(root: str, pairs: list[dict], path: Path) -> None:
    """Image pairs side by side (one pair per column), with their similarity."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.9 * len(pairs), 4.2), dpi=110, squeeze=False)
    for j, pair in enumerate(pairs):
        for i, key in enumerate(("a", "b")):
            ax = axes[i][j]
            ax.axis("off")
            ax.imshow(_thumb(root, pair[key]), cmap="gray")
            ax.set_title((f"{pair['splits']} {pair['cosine']:.3f}\n" if i == 0 else "") + Path(pair[key]).name,
                         fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_leaderboard(rows: list[dict], path: Path) -> None:
    """Test AUROC with its 95 % CI against extraction cost (seconds per 1,000 images, log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in rows:
        rate, auc = r.get("extract_images_per_second"), r.get("test_auroc")
        if not rate or auc is None:
            continue
        x = 1000.0 / rate
        ci = r.get("test_auroc_ci")
        yerr = [[auc - ci[0]], [ci[1] - auc]] if ci else None
        ax.errorbar([x], [auc], yerr=yerr, fmt="o", capsize=3)
        ax.annotate(f"#{r['rank']} {r['backbone']}", (x, auc), fontsize=7, xytext=(4, 3), textcoords="offset points")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100 ...
    ax.xaxis.set_major_formatter(ScalarFormatter())  # plain seconds, not 2x10^1
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("extraction cost (s per 1,000 images, log scale)")
    ax.set_ylabel("test AUROC (95% CI)")
    ax.set_title("ranked by validation AUROC; test shown, not used to rank", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curve(summary: list[dict], path: Path, *, mode: str = "fraction", multilabel: bool = False) -> None:
    """Test AUROC (mean over repeats, shaded ± one sd, bars the mean 95 % CI) against training images (log
    scale), a line per cache; for multi-label caches the mean AUROC over labels (macro)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in dict.fromkeys(r["cache"] for r in summary):
        rows = [r for r in summary if r["cache"] == name and r["test_auroc"] is not None]
        if not rows:
            continue
        x = np.array([r["train_images"] for r in rows])
        y = np.array([r["test_auroc"] for r in rows])
        sd = np.array([r["test_auroc_sd"] for r in rows])
        line = ax.plot(x, y, "o-", label=name)[0]
        ax.fill_between(x, y - sd, y + sd, alpha=0.2)
        ci = [(i, r["test_auroc_ci"]) for i, r in enumerate(rows) if r.get("test_auroc_ci")]
        if ci:
            at = [i for i, _ in ci]
            ax.errorbar(x[at], y[at], yerr=[[y[i] - c[0] for i, c in ci], [c[1] - y[i] for i, c in ci]], fmt="none",
                        capsize=3, color=line.get_color(), alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training images (log scale)")
    what = "test mean AUROC over labels" if multilabel else "test AUROC"
    ax.set_ylabel(f"{what} (mean ± sd over repeats; bars: 95% CI)", fontsize=8)
    per = "positives per label" if multilabel else "images per class"
    ax.set_title(f"label efficiency ({'fractions of train' if mode == 'fraction' else per}); "
                 "heads chosen on validation", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
