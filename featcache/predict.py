"""predict: a fitted run (backbone + head) applied to new images, CSV out."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import UserError
from featcache.manifest import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class _Files:
    """The two fields a decode loader reads from a manifest."""

    root: str
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def load_run(run_dir: str | os.PathLike):
    """(LinearHead, config) of a fit-head run; ``head.pt`` is read with ``weights_only=True``."""
    import torch

    from featcache.heads import LinearHead

    path = Path(run_dir) / "head.pt"
    if not path.is_file():
        raise UserError(f"no head.pt in {run_dir}: give a folder written by featcache fit-head")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return LinearHead.from_state_dict(payload["head"]), json.loads(payload["config"])
    except Exception as exc:
        raise UserError(f"{path} is not a featcache head ({exc.__class__.__name__}: {exc})") from None


def weights_for(config: dict, override: str | None) -> tuple[str, int]:
    """The ``--weights`` value and seed that rebuild the backbone the head was trained on."""
    seed = int(config.get("seed") or 0)
    if override:
        return override, seed
    wid = config["weights"]
    if wid.startswith("none:seed="):
        return "none", int(wid.split("=", 1)[1])
    if wid.startswith("torchvision:"):
        return "imagenet", seed
    source = config.get("weights_source")
    if source and Path(source).is_file():
        return source, seed
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
    if mode and mode.startswith("dali"):
        from featcache.decode.dali import dali_available

        return "dali" if dali_available()[0] else "torchvision"
    return mode if mode in ("torchvision", "pil") else "torchvision"


def predict(run_dir: str | os.PathLike, inputs: list[str], *, out_csv: str | os.PathLike | None = None,
            weights: str | None = None, batch_size: int = 32, device: str = "auto",
            workers: int | None = 0) -> list[dict]:
    """Scores and a label for each image; rows are also written to ``out_csv``."""
    import torch

    from featcache.backbones import create_backbone
    from featcache.decode import make_loader
    from featcache.extract import resolve_device

    head, config = load_run(run_dir)
    files = collect_images(inputs)
    device = resolve_device(device)
    name, seed = weights_for(config, weights)
    backbone = create_backbone(config["backbone"], name, seed=seed)
    if backbone.weights != config["weights"]:
        raise UserError(f"--weights gives {backbone.weights}, but the head was fitted on {config['weights']}")
    if config.get("preprocess") and json.loads(json.dumps(backbone.spec.to_dict())) != config["preprocess"]:
        raise UserError("the backbone's preprocessing differs from the one the head was fitted with")
    model = backbone.model.to(device, memory_format=torch.channels_last)
    classes, threshold = config["classes"], config["threshold"]
    positive = classes.index(config["positive_class"]) if config.get("positive_class") else None

    rows: dict[int, dict] = {}
    backend = _decode_backend(config.get("decode"))
    loader = make_loader(_Files("", tuple(os.path.abspath(f) for f in files)), backbone.spec,
                         backend=backend, batch_size=batch_size, workers=workers, device=device)
    with torch.inference_mode():
        for batch in loader:
            for i, reason in batch.failed:
                rows[i] = {"path": files[i], "prediction": "", "error": reason}
            if len(batch.indices):
                x = batch.images.to(device).contiguous(memory_format=torch.channels_last)
                probs = head.predict_proba(model(x).float().cpu().numpy())
                for i, p in zip(batch.indices.tolist(), probs):
                    label = (classes[positive] if p[positive] >= threshold else classes[1 - positive]) \
                        if positive is not None else classes[int(np.argmax(p))]
                    rows[i] = {"path": files[i], **{f"p_{c}": float(v) for c, v in zip(classes, p)},
                               "prediction": label, "error": ""}
    result = [rows[i] for i in range(len(files))]
    if out_csv:
        _write_csv(Path(out_csv), result, classes)
    return result


def _write_csv(path: Path, rows: list[dict], classes: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["path", *(f"p_{c}" for c in classes), "prediction", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
