"""Baselines featcache is measured against: the real thing, as people run it.

``tutorial``: the classic PyTorch transfer-learning tutorial's "ConvNet as
fixed feature extractor" (pytorch.org/tutorials/beginner/
transfer_learning_tutorial.html), as written there: every backbone parameter
frozen, a new final ``nn.Linear`` trained with SGD (lr 0.001, momentum 0.9)
on its parameters only, StepLR(step_size=7, gamma=0.1), 25 epochs, batch size
4, 4 DataLoader workers, train transforms RandomResizedCrop(224) +
RandomHorizontalFlip, val transforms Resize(256) + CenterCrop(224), the model
in train mode during the train phase (so the frozen backbone's BatchNorm
running statistics still move), a val phase every epoch, and the weights of
the best validation accuracy (a deepcopy of the state_dict) restored at the
end. It then scores the test split once, with a patient-bootstrap CI.

``naive``: the usual feature-extraction script: PIL + torchvision transforms,
a DataLoader with as many workers as featcache extract uses by default, the
model in eval mode under ``torch.inference_mode()``, batch 32, features
collected in a list.

Both run on featcache's device (a GPU when there is one), start from the same
tensors as featcache (the state_dict of featcache's ``create_backbone``:
ImageNet weights when they can be had, else its seeded random init), read the
same files (a featcache manifest: same split, same ``--max-images`` subset,
train only unless ``--subsample-all``), and print one JSON line recording
every setting and figure.

    python -m featcache.baselines tutorial DATA [--epochs 25] [--max-images N [--subsample-all]]
    python -m featcache.baselines naive DATA [--max-images N [--subsample-all]]

(``bench/tutorial_baseline.py`` runs the same from a checkout.)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# The tutorial's recipe, as written there (only epochs, batch size and workers are flags).
TUTORIAL = {"batch_size": 4, "lr": 0.001, "momentum": 0.9, "step_size": 7, "gamma": 0.1, "epochs": 25,
            "workers": 4}
TRAIN_TRANSFORMS = ["RandomResizedCrop(224)", "RandomHorizontalFlip()", "ToTensor()", "Normalize(ImageNet)"]
VAL_TRANSFORMS = ["Resize(256)", "CenterCrop(224)", "ToTensor()", "Normalize(ImageNet)"]


class Files(Dataset):
    def __init__(self, root, paths, labels, transform):
        self.root, self.paths, self.labels, self.transform = root, paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = Image.open(os.path.join(self.root, self.paths[i])).convert("RGB")
        return self.transform(image), self.labels[i]


def split(manifest, name):
    rows = manifest.indices(name)
    return [manifest.paths[r] for r in rows], [manifest.labels[r] for r in rows]


def state_digest(state: dict) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and values (the same tensors give the same digest)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def featcache_backbone(name: str, weights: str, seed: int):
    """featcache's ``create_backbone`` (its ImageNet or seeded tensors); ``imagenet`` that cannot be had
    (offline) falls back to ``none`` with the same seed. Returns (backbone, why it fell back or None)."""
    from featcache.backbones.registry import create_backbone
    from featcache.errors import UserError

    try:
        return create_backbone(name, weights, seed=seed), None
    except UserError as exc:
        if weights != "imagenet":
            raise
        return create_backbone(name, "none", seed=seed), str(exc)


def torchvision_model(bb, n_classes: int | None):
    """The torchvision model of ``bb`` holding featcache's backbone tensors; its ImageNet classifier
    replaced by a new ``nn.Linear(in, n_classes)`` (``None``: by ``nn.Identity``, for features).
    Returns (model, name of the new layer)."""
    from featcache.backbones.registry import get_entry

    entry = get_entry(bb.name)
    builder, _ = entry.load()
    model = builder(weights=None)
    result = model.load_state_dict(bb.model.body.state_dict(), strict=False)
    stray = [k for k in result.missing_keys if not k.startswith(entry.head_prefixes)] + result.unexpected_keys
    if stray:
        raise RuntimeError(f"featcache's {bb.name} state_dict does not fit torchvision's: {stray[:5]}")
    head = entry.head_prefixes[0].rstrip(".")
    parent_name, _, child = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, n_classes) if n_classes else nn.Identity())
    return model, head


def backbone_state(model, head: str) -> dict:
    """A copy (training updates BatchNorm buffers in place) of every tensor but the new layer's."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(head + ".")}


def tutorial(manifest, *, backbone: str, weights: str, epochs: int, batch_size: int, workers: int, device: str,
             seed: int, n_resamples: int) -> dict:
    from featcache.eval.metrics import evaluate, positive_class_index

    torch.manual_seed(seed)  # as the tutorial seeds torch, random and numpy
    random.seed(seed)
    np.random.seed(seed)
    data_transforms = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
        "val": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(MEAN, STD)]),
    }
    image_datasets = {x: Files(manifest.root, *split(manifest, x), data_transforms[x]) for x in ("train", "val")}
    dataloaders = {x: DataLoader(image_datasets[x], batch_size=batch_size, shuffle=x == "train", num_workers=workers)
                   for x in ("train", "val")}
    dataset_sizes = {x: len(image_datasets[x]) for x in ("train", "val")}

    bb, fallback = featcache_backbone(backbone, weights, seed)
    model, head = torchvision_model(bb, len(manifest.classes))  # the new layer: torch's default init, seeded
    initial = backbone_state(model, head)
    initial_digest = state_digest(initial)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(head + ".")  # freeze everything but the new final layer
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.get_submodule(head).parameters(), lr=TUTORIAL["lr"],
                                momentum=TUTORIAL["momentum"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=TUTORIAL["step_size"], gamma=TUTORIAL["gamma"])

    # train_model(), as in the tutorial
    since = time.perf_counter()
    best_model_wts = copy.deepcopy(model.state_dict())
    best_acc, best_epoch, seen, history = 0.0, None, 0, []
    for epoch in range(epochs):
        record = {"epoch": epoch}
        for phase in ("train", "val"):
            if phase == "train":
                model.train()  # BatchNorm in train mode: the frozen backbone's running stats still update
            else:
                model.eval()
            running_loss, running_corrects = 0.0, 0
            for inputs, labels in dataloaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
                running_corrects += int(torch.sum(preds == labels.data))
                seen += inputs.size(0)
            if phase == "train":
                scheduler.step()
            record[f"{phase}_loss"] = running_loss / dataset_sizes[phase]
            record[f"{phase}_accuracy"] = running_corrects / dataset_sizes[phase]
            if phase == "val" and record["val_accuracy"] > best_acc:
                best_acc, best_epoch = record["val_accuracy"], epoch
                best_model_wts = copy.deepcopy(model.state_dict())
        history.append(record)
    train_seconds = time.perf_counter() - since
    model.load_state_dict(best_model_wts)

    restored = backbone_state(model, head)
    changed = sorted(k for k in initial if not torch.equal(initial[k], restored[k].cpu()))
    test = Files(manifest.root, *split(manifest, "test"), data_transforms["val"])
    model.eval()
    probs, ys = [], []
    with torch.no_grad():
        for inputs, labels in DataLoader(test, batch_size=batch_size, num_workers=workers):
            probs.append(model(inputs.to(device)).softmax(1).cpu().numpy())
            ys.append(labels.numpy())
    y, p = np.concatenate(ys), np.concatenate(probs).astype(np.float64)
    binary = len(manifest.classes) == 2
    positive = positive_class_index(manifest.classes) if binary else None
    patients = [manifest.patients[r] for r in manifest.indices("test")]
    metrics = evaluate(y, p, classes=list(manifest.classes), threshold=0.5 if binary else None, positive=positive,
                       patients=patients, n_resamples=n_resamples, seed=seed)
    return {
        "approach": "tutorial",
        "recipe": "PyTorch transfer-learning tutorial, ConvNet as fixed feature extractor",
        "backbone": backbone, "weights": bb.weights, "weights_asked": weights, "weights_fallback": fallback,
        "initial_backbone_sha256": initial_digest,
        "new_layer": head, "trained_parameters": [f"{head}.weight", f"{head}.bias"],
        "optimizer": "SGD", "lr": TUTORIAL["lr"], "momentum": TUTORIAL["momentum"],
        "scheduler": "StepLR", "step_size": TUTORIAL["step_size"], "gamma": TUTORIAL["gamma"],
        "epochs": epochs, "batch_size": batch_size, "workers": workers, "device": device,
        "train_transforms": TRAIN_TRANSFORMS, "val_transforms": VAL_TRANSFORMS,
        "batchnorm": "train mode in the train phase (running statistics update), eval mode in val",
        "backbone_changed_by_training": {
            "tensors": len(changed),
            "only_batchnorm_statistics": all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                             for k in changed)},
        "best_epoch": best_epoch, "best_val_accuracy": best_acc, "restored": "best val accuracy (deepcopy of state_dict)",
        "history": history,
        "train_seconds": train_seconds, "images_per_second": seen / train_seconds,
        "n": {s: int(len(manifest.indices(s))) for s in manifest.split_names},
        "test_auroc": metrics.get("auroc"), "test_auroc_ci": metrics.get("ci", {}).get("auroc"),
        "test_accuracy": metrics.get("accuracy"), "bootstrap": n_resamples,
    }


def naive(manifest, *, backbone: str, weights: str, batch_size: int, workers: int, device: str, seed: int) -> dict:
    bb, fallback = featcache_backbone(backbone, weights, seed)
    tf = transforms.Compose([transforms.Resize(bb.spec.resize), transforms.CenterCrop(bb.spec.crop),
                             transforms.ToTensor(), transforms.Normalize(list(bb.spec.mean), list(bb.spec.std))])
    data = Files(manifest.root, list(manifest.paths), list(manifest.labels), tf)
    model, _ = torchvision_model(bb, None)
    model = model.to(device).eval()
    features, start = [], time.perf_counter()
    with torch.inference_mode():
        for inputs, _ in DataLoader(data, batch_size=batch_size, num_workers=workers):
            features.append(model(inputs.to(device)).cpu().numpy())
    seconds = time.perf_counter() - start
    return {"approach": "naive", "backbone": backbone, "weights": bb.weights, "weights_fallback": fallback,
            "device": device, "workers": workers, "batch_size": batch_size, "grad": "torch.inference_mode",
            "seconds": seconds, "images_per_second": len(data) / seconds,
            "rows": int(sum(len(f) for f in features))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("approach", choices=("tutorial", "naive"))
    parser.add_argument("data")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="imagenet", choices=("imagenet", "none"),
                        help="featcache's create_backbone weights; imagenet falls back to none when it cannot "
                             "be had (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=TUTORIAL["epochs"], help="tutorial (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default: tutorial {TUTORIAL['batch_size']}, naive 32")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"DataLoader workers (default: tutorial {TUTORIAL['workers']}, naive featcache "
                             "extract's default)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda, as featcache (default %(default)s)")
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help="a stratified subset of N train images, val and test whole (as featcache)")
    parser.add_argument("--subsample-all", action="store_true", help="--max-images subsamples every split")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient-bootstrap resamples for the test CI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from featcache.decode import default_workers
    from featcache.runtime.device import resolve_device
    from featcache.data.manifest import scan

    manifest = scan(args.data, split_seed=args.split_seed).limit(args.max_images, args.seed,
                                                                 subsample_all=args.subsample_all)
    device = resolve_device(args.device)
    common = dict(backbone=args.backbone, weights=args.weights, device=device, seed=args.seed)
    if args.approach == "tutorial":
        result = tutorial(manifest, epochs=args.epochs, batch_size=args.batch_size or TUTORIAL["batch_size"],
                          workers=TUTORIAL["workers"] if args.workers is None else args.workers,
                          n_resamples=args.bootstrap, **common)
    else:
        result = naive(manifest, batch_size=args.batch_size or 32,
                       workers=default_workers() if args.workers is None else args.workers, **common)
    result.update(max_images=args.max_images, subsample_all=args.subsample_all,
                  subsampled=[] if args.max_images is None else (manifest.split_names if args.subsample_all
                                                                 else ["train"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
