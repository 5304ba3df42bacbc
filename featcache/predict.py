"""predict: a fitted run applied to new images, CSV out.

A fit-head run is its cache's backbone plus ``head.pt``; a finetune run is its
``best.pt`` (backbone and head together). Either way each image gets every
class's probability and the label at the run's own threshold, which is
written beside it with the rule that chose it; in a multi-label run, each
label's probability and its decision at that label's threshold.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import UserError
from featcache.eval.rundir import RunRecord
from featcache.data.manifest import IMAGE_EXTENSIONS, printable_path
from featcache.runtime.device import place


@dataclass(frozen=True)
class _Files:
    """The two fields a decode loader reads from a manifest."""

    root: str
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def default_output(run_dir: str | os.PathLike) -> Path:
    """A new CSV in the run folder (``predict-YYYYmmdd-HHMMSS.csv``), never one of the run's own files."""
    import datetime as _dt

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path(run_dir) / f"predict-{stamp}.csv", 1
    while path.exists():
        n += 1
        path = Path(run_dir) / f"predict-{stamp}-{n}.csv"
    return path


def check_output(run_dir: str | os.PathLike, out_csv: str | os.PathLike) -> None:
    out = Path(out_csv)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a CSV file name")
    if RunRecord(run_dir).is_run_file(out):  # predictions never go over one of the run's own files
        raise UserError(f"--out {out} is one of the run's own files; give another file name")


def load_run(run_dir: str | os.PathLike):
    """(head, config) of a fit-head run: its head (of the kind head.pt records) and what predict needs."""
    return RunRecord(run_dir).read_head()


def weights_for(config: dict, override: str | None) -> tuple[str, int]:
    """The ``--weights`` value and seed that rebuild the backbone the head was trained on."""
    from featcache.backbones.weights import WeightsRef

    seed = int(config.get("seed") or 0)
    if override:
        return override, seed
    source = config.get("weights_source")
    ref = WeightsRef.from_id(config["weights"], source=source)
    if ref.kind == "none":
        return "none", ref.seed
    if ref.kind == "pretrained":
        return "imagenet", seed
    if ref.path and Path(ref.path).is_file():
        return ref.path, seed
    raise UserError(f"the head was fitted on features of a weights file ({source or 'path not recorded'}) "
                    "that is not there now; pass it with --weights PATH")


def collect_images(inputs: list[str]) -> list[str]:
    """Image files named directly or found below the folders named, in order."""
    files: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                str(f) for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            files += found
        elif p.is_file():
            files.append(str(p))
        else:
            raise UserError(f"no such image or folder: {item}")
    if not files:
        raise UserError(f"no .jpeg/.jpg/.png images in {', '.join(inputs)}")
    return files


def _decode_backend(mode: str | None) -> str:
    """Decode new images the way the cache's images were decoded, so features match."""
    from featcache.decode.base import decoder_for_mode

    decoder = decoder_for_mode(mode)
    return decoder.name if decoder is not None and decoder.available()[0] else "torchvision"


def _finetuned_scorer(record: RunRecord, device: str):
    """(score(images) -> probs, spec, decode backend, config) of a finetune run's best.pt."""
    from featcache.backbones.registry import create_backbone, get_entry, load_tensors
    from featcache.finetune import classifier_class, load_torchvision_state_dict

    payload = load_tensors(record.best_path, "a featcache checkpoint")
    try:
        settings = json.loads(payload["config"])
        metrics = record.metrics
        if metrics is None:
            raise FileNotFoundError(f"No such file: {str(record.metrics_path)!r}")
    except Exception as exc:
        raise UserError(f"{record.folder} is not a finished featcache finetune run ({exc.__class__.__name__}: {exc})") \
            from None
    entry = get_entry(settings["backbone"])
    backbone = create_backbone(settings["backbone"], "none")  # every tensor is replaced by best.pt's below
    model = classifier_class()(backbone.model, backbone.feature_dim, len(settings["classes"]),
                                settings["freeze_backbone"], settings.get("recipe") == "tutorial")
    load_torchvision_state_dict(model, payload["model"], entry)
    model, layout = place(model, device)
    model.eval()
    config = {k: metrics.get(k) for k in ("classes", "positive_class", "threshold", "threshold_rule", "task",
                                          "thresholds")}
    multilabel = config["task"] == "multilabel"

    def score(images):
        logits = model(images.contiguous(memory_format=layout)).float()
        return (logits.sigmoid() if multilabel else logits.softmax(dim=1)).cpu().numpy()

    return score, backbone.spec, "torchvision", config


def _head_scorer(run_dir, weights, device):
    """(score(images) -> probs, spec, decode backend, config) of a fit-head run: its backbone, then head.pt."""
    from featcache.backbones.registry import create_backbone

    head, config = load_run(run_dir)
    name, seed = weights_for(config, weights)
    backbone = create_backbone(config["backbone"], name, seed=seed)
    if backbone.weights != config["weights"]:
        raise UserError(f"--weights gives {backbone.weights}, but the head was fitted on {config['weights']}")
    if config.get("preprocess") and json.loads(json.dumps(backbone.spec.to_dict())) != config["preprocess"]:
        raise UserError("the backbone's preprocessing differs from the one the head was fitted with")
    model, layout = place(backbone.model, device)

    def score(images):
        return head.predict_proba(model(images.contiguous(memory_format=layout)).float().cpu().numpy())

    return score, backbone.spec, _decode_backend(config.get("decode")), config


def predict(run_dir: str | os.PathLike, inputs: list[str], *, out_csv: str | os.PathLike | None = None,
            weights: str | None = None, batch_size: int = 32, device: str = "auto",
            workers: int | None = 0) -> list[dict]:
    """Scores, a label, and the threshold and rule behind it for each image; also written to ``out_csv``."""
    import torch

    from featcache.decode import make_loader
    from featcache.runtime.device import resolve_device

    run_dir = Path(run_dir)
    if out_csv:
        check_output(run_dir, out_csv)
    device = resolve_device(device)
    record = RunRecord(run_dir)
    if record.kind == "finetune":
        if weights:
            raise UserError(f"--weights applies to fit-head runs; a finetune run's {record.best_path.name} holds "
                            "its backbone")
        score, spec, backend, config = _finetuned_scorer(record, device)
    else:
        score, spec, backend, config = _head_scorer(run_dir, weights, device)
    files = collect_images(inputs)
    decide, fields = _decision(config)
    rows: dict[int, dict] = {}
    loader = make_loader(_Files("", tuple(os.path.abspath(f) for f in files)), spec,
                         backend=backend, batch_size=batch_size, workers=workers, device=device)
    with torch.inference_mode():
        for batch in loader:
            for i, reason in batch.failed:
                rows[i] = {"path": printable_path(files[i]), "prediction": "", "error": reason}
            if len(batch.indices):
                probs = score(batch.images.to(device))
                for i, p in zip(batch.indices.tolist(), probs):
                    rows[i] = {"path": printable_path(files[i]), **decide(p), "error": ""}
    result = [rows[i] for i in range(len(files))]
    if out_csv:
        _write_csv(Path(out_csv), result, fields)
    return result


def _decision(config: dict):
    """(decide(probabilities) -> CSV fields, the CSV's columns) at the run's own threshold(s).

    A multi-label run gives each label's probability and its decision at that label's threshold
    (``pred_LABEL``, 1 or 0), and ``prediction`` lists the labels found, joined by ``|``.
    """
    classes, threshold = config["classes"], config["threshold"]
    probabilities = [f"p_{c}" for c in classes]
    if config.get("task") == "multilabel":
        thresholds = [config["thresholds"][c] for c in classes]
        decisions = [f"pred_{c}" for c in classes]

        def decide(p):
            found = [bool(v >= t) for v, t in zip(p, thresholds)]
            return {**{f"p_{c}": float(v) for c, v in zip(classes, p)},
                    **{f"pred_{c}": int(f) for c, f in zip(classes, found)},
                    "prediction": "|".join(c for c, f in zip(classes, found) if f),
                    "threshold_rule": config["threshold_rule"]}

        return decide, ["path", *probabilities, *decisions, "prediction", "threshold_rule", "error"]
    positive = classes.index(config["positive_class"]) if config.get("positive_class") else None
    rule = config.get("threshold_rule") or ("argmax" if positive is None else "fixed")
    shown = {"threshold": "" if threshold is None else f"{threshold:.6f}", "threshold_rule": rule}

    def decide(p):
        label = (classes[positive] if p[positive] >= threshold else classes[1 - positive]) \
            if positive is not None else classes[int(np.argmax(p))]
        return {**{f"p_{c}": float(v) for c, v in zip(classes, p)}, "prediction": label, **shown}

    return decide, ["path", *probabilities, "prediction", "threshold", "threshold_rule", "error"]


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
