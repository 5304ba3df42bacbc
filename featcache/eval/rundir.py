"""One run folder: the only code that knows its file names.

fit-head and finetune write a run folder through :class:`RunRecord`; report,
predict and bench read it through the same class. The files:

- ``metrics.json``: validation and test metrics, fit-head and finetune alike;
- ``run.json``: how the run was made and what it cost (``complete`` once finished);
- ``history.json``: finetune's record of every epoch;
- ``predictions.csv``: one row per val/test image, each class's probability;
- ``head.pt``: a fit-head run's head (plain tensors, its kind) and the config predict needs;
- ``best.pt``, ``last.pt``: finetune's best epoch (torchvision keys) and where a rerun resumes;
- the plots: ``confusion_matrix.png``, ``roc.png``, ``pr.png``, ``reliability.png``
  and finetune's ``learning_curve.png``; a multi-label run's ``roc_grid.png``.

JSON is written with indent 2 and a trailing newline; checkpoints are
written atomically (a crash leaves the previous one whole).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from featcache.errors import UserError

METRICS = "metrics.json"
RUN = "run.json"
HISTORY = "history.json"
PREDICTIONS = "predictions.csv"
HEAD = "head.pt"
BEST = "best.pt"
LAST = "last.pt"
# The run's records; predict never writes its CSV over one of them.
RUN_FILES = (PREDICTIONS, METRICS, RUN, HISTORY, HEAD, BEST, LAST)
# What a fresh finetune start removes: the files that say how far a run got.
PROGRESS_FILES = (LAST, BEST, HISTORY, RUN, METRICS)
PLOTS = {"confusion_matrix": "confusion_matrix.png", "roc": "roc.png", "pr": "pr.png",
         "reliability": "reliability.png", "learning_curve": "learning_curve.png", "roc_grid": "roc_grid.png"}


def write_predictions(path: Path, classes, splits: dict) -> None:
    """One CSV row per image: split, path, patient, true class (or each label's target), each class's
    probability.

    ``splits`` maps a split to (paths, labels, (N, K) probabilities, patients); the patient
    column lets two runs be compared by a paired patient bootstrap.
    """
    import csv

    import numpy as np

    multilabel = any(np.ndim(labels) == 2 for _, labels, _, _ in splits.values())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        truth = [f"y_{c}" for c in classes] if multilabel else ["label"]
        writer.writerow(["split", "path", "patient", *truth, *(f"p_{c}" for c in classes)])
        for split, (paths, labels, probs, patients) in splits.items():
            for p, pt, y, row in zip(paths, patients, labels, probs):
                # Multi-label: each label's target under the fit's policy, blank where unknown.
                known = ["" if np.isnan(v) else str(int(v)) for v in y] if multilabel else [classes[int(y)]]
                writer.writerow([split, p, pt, *known, *(f"{v:.6f}" for v in row)])


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunRecord:
    """A run folder's files: their paths, lazy reads and the writes of the commands that make runs.

    Reads are cached; a write through the record updates what it reads back.
    Absent files read as ``metrics`` None, ``run`` {} and ``history`` [].
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._cache: dict = {}

    def __repr__(self) -> str:
        return f"RunRecord({str(self.folder)!r})"

    @property
    def name(self) -> str:
        return self.folder.name

    # -- paths
    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS

    @property
    def run_path(self) -> Path:
        return self.folder / RUN

    @property
    def history_path(self) -> Path:
        return self.folder / HISTORY

    @property
    def head_path(self) -> Path:
        return self.folder / HEAD

    @property
    def best_path(self) -> Path:
        return self.folder / BEST

    @property
    def last_path(self) -> Path:
        return self.folder / LAST

    @property
    def predictions_path(self) -> Path | None:
        """predictions.csv where the run has one, else None."""
        path = self.folder / PREDICTIONS
        return path if path.is_file() else None

    def plot_path(self, name: str) -> Path:
        """Where the plot ``name`` (a key of :data:`PLOTS`) goes."""
        return self.folder / PLOTS[name]

    def files(self) -> list[Path]:
        """The run's records present now (of :data:`RUN_FILES`)."""
        return [self.folder / name for name in RUN_FILES if (self.folder / name).is_file()]

    def is_run_file(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` names one of a run's records in this folder (present or not)."""
        path = Path(path)
        return path.name in RUN_FILES and path.resolve().parent == self.folder.resolve()

    # -- reads
    def _json(self, key: str, path: Path, absent):
        if key not in self._cache:
            self._cache[key] = json.loads(path.read_text()) if path.is_file() else absent
        return self._cache[key]

    @property
    def metrics(self) -> dict | None:
        return self._json("metrics", self.metrics_path, None)

    @property
    def run(self) -> dict:
        return self._json("run", self.run_path, {})

    @property
    def history(self) -> list:
        return self._json("history", self.history_path, [])

    @property
    def kind(self) -> str:
        """"fit-head" or "finetune": by the checkpoint the folder holds, else as run.json records,
        else finetune where there is a history."""
        if self.head_path.is_file():
            return "fit-head"
        if self.best_path.is_file():
            return "finetune"
        return self.run.get("kind") or ("finetune" if self.history else "fit-head")

    @property
    def is_complete(self) -> bool:
        return bool(self.run.get("complete"))

    @property
    def cache(self) -> Path | None:
        """A fit-head run's cache: where run.json says, else at the same place relative to the run
        folder (a copied project), else None."""
        run = self.run
        for candidate in (run.get("cache"), run.get("cache_relative") and self.folder / run["cache_relative"]):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None

    def cache_fields(self, cache: str | os.PathLike) -> dict:
        """run.json's record of the cache: absolute, and relative to the folder, so that a copied
        project (run folders and caches moved together) finds it (see :attr:`cache`)."""
        cache = Path(cache).resolve()
        return {"cache": str(cache), "cache_relative": os.path.relpath(cache, self.folder.resolve())}

    # -- writes
    def write_metrics(self, metrics: dict) -> None:
        _write_json(self.metrics_path, metrics)
        self._cache.pop("metrics", None)

    def write_run(self, run: dict) -> None:
        _write_json(self.run_path, run)
        self._cache.pop("run", None)

    def write_history(self, history: list) -> None:
        _write_json(self.history_path, history)
        self._cache.pop("history", None)

    def write_predictions(self, classes, splits: dict) -> None:
        """predictions.csv; ``splits`` as :func:`write_predictions` takes them."""
        write_predictions(self.folder / PREDICTIONS, classes, splits)

    def write_plots(self, metrics: dict, curves: dict) -> None:
        """confusion_matrix.png, roc.png, pr.png and reliability.png; ``curves`` maps a split to
        (labels, (N, K) probabilities). A multi-label run: roc_grid.png, one ROC per label."""
        from featcache.report.plots import plot_confusion_matrix, plot_pr, plot_reliability, plot_roc, plot_roc_grid

        if metrics.get("task") == "multilabel":
            shown = "test" if "test" in curves else "val"
            plot_roc_grid(*curves[shown], metrics["classes"], list(metrics["thresholds"].values()),
                          self.plot_path("roc_grid"), title=f"{metrics['backbone']} + {metrics['selected']['name']}, "
                                                            f"{shown}")
            return
        classes, positive_name = metrics["classes"], metrics["positive_class"]
        positive = classes.index(positive_name) if positive_name else None
        shown = "test" if "test" in metrics else "val"
        title = f"{metrics['backbone']} + {metrics['selected']['name']}"
        thr = metrics["threshold"]
        decision = f"threshold {thr:.3f}" if thr is not None else "argmax"
        plot_confusion_matrix(metrics[shown]["confusion_matrix"], classes, self.plot_path("confusion_matrix"),
                              title=f"{metrics['backbone']}, {shown} ({decision})")
        plot_roc(curves, positive, self.plot_path("roc"), title=title, threshold=thr, classes=classes)
        plot_pr(curves, positive, self.plot_path("pr"), title=title, classes=classes)
        plot_reliability({s: metrics[s]["reliability"] for s in curves}, self.plot_path("reliability"),
                         title=title, binary=positive is not None)

    def write_learning_curve(self, history: list[dict], *, title: str) -> None:
        from featcache.report.plots import plot_learning_curves

        plot_learning_curves(history, self.plot_path("learning_curve"), title=title)

    # -- head.pt (fit-head)
    def write_head(self, head, config: dict) -> None:
        """head.pt: the head's state (its kind in it), and ``config`` as JSON text."""
        import torch

        torch.save({"kind": head.kind, "head": head.state_dict(), "config": json.dumps(config)}, self.head_path)

    def read_head(self):
        """(head, config) of a fit-head run; head.pt is read with ``weights_only=True``.

        A head.pt written before heads recorded their kind loads as the kind its config selected.
        """
        from featcache.backbones.registry import load_tensors
        from featcache.heads import load_head

        path = self.head_path
        if not path.is_file():
            raise UserError(f"no {HEAD} in {self.folder}: give a folder written by featcache fit-head (or finetune)")
        payload = load_tensors(path, "a featcache head")
        try:
            config = json.loads(payload["config"])
            kind = payload.get("kind") or (config.get("selected") or {}).get("head")
            return load_head(self._located(payload["head"]), kind), config
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path} is not a featcache head ({exc.__class__.__name__}: {str(exc)[:200]})") from None

    def _located(self, state: dict) -> dict:
        """A head that reads train rows from its cache (knn) finds it, in a copied project, where
        :attr:`cache` does: at the same place relative to the run folder. The head still checks it."""
        cache = state.get("train_cache")
        if isinstance(cache, str) and not Path(cache).is_file() and self.cache is not None:
            return {**state, "train_cache": str(self.cache)}
        return state

    # -- best.pt and last.pt (finetune)
    def write_best(self, checkpoint: dict) -> None:
        _atomic_torch_save(checkpoint, self.best_path)

    def write_last(self, checkpoint: dict) -> None:
        _atomic_torch_save(checkpoint, self.last_path)

    def read_best(self, map_location="cpu") -> dict:
        import torch

        return torch.load(self.best_path, map_location=map_location, weights_only=True)

    def read_last(self, map_location="cpu") -> dict:
        import torch

        return torch.load(self.last_path, map_location=map_location, weights_only=True)

    def clear_progress(self) -> None:
        """Remove the checkpoints, history, run.json and metrics.json: a run starts over."""
        for name in PROGRESS_FILES:
            (self.folder / name).unlink(missing_ok=True)
        self._cache.clear()


def load_run(folder: str | os.PathLike) -> RunRecord:
    """The record of a finished run folder (one with metrics.json); anything else is a user error."""
    record = RunRecord(folder)
    if not record.metrics_path.is_file():
        raise UserError(f"{record.folder} is not a run folder (no {METRICS}); give folders written by fit-head or "
                        "finetune")
    return record
