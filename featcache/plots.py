"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def plot_roc(curves: dict, positive: int, path: Path, *, title: str, threshold: float | None = None) -> None:
    """One ROC curve per split; ``curves`` maps split -> (y_true, positive-class scores).

    With ``threshold``, each curve's operating point is marked.
    """
    from featcache.metrics import auroc, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    for split, (y, scores) in curves.items():
        is_pos = np.asarray(y) == positive
        fpr, tpr, _ = roc_curve(is_pos, scores)
        area = auroc(is_pos, scores)
        label = f"{split} (AUROC {area:.3f})" if area is not None else split
        (line,) = ax.plot(fpr, tpr, label=label, lw=1.6)
        if threshold is not None:
            scores = np.asarray(scores)
            sens = np.mean(scores[is_pos] >= threshold) if is_pos.any() else 0.0
            fall_out = np.mean(scores[~is_pos] >= threshold) if (~is_pos).any() else 0.0
            ax.plot([fall_out], [sens], "o", color=line.get_color(), ms=6, mec="black", mew=0.6)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    if threshold is not None:
        ax.plot([], [], "o", color="white", mec="black", mew=0.6, label=f"threshold {threshold:.3f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
