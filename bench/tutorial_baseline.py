"""Baselines featcache is measured against, written the way people usually write them.

``tutorial``: the classic PyTorch transfer-learning tutorial's "ConvNet as
fixed feature extractor": a torchvision model with every parameter frozen, a
new final layer trained with SGD (momentum 0.9, lr 0.001, step decay), the
model in train mode, PIL + torchvision transforms (random resized crop and
horizontal flip for training), and the whole network run forward on every
image in every epoch.

``naive``: the usual feature-extraction script: PIL + torchvision transforms,
a DataLoader, the model in eval mode under ``torch.no_grad()``, features
collected in a list.

Both read the same files featcache reads (a featcache manifest, so the same
split and subset), and print one JSON line with their figures.

    python bench/tutorial_baseline.py tutorial DATA --epochs 2 [--max-images N]
    python bench/tutorial_baseline.py naive DATA [--max-images N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


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


def tutorial(manifest, epochs: int, batch_size: int, workers: int) -> dict:
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    eval_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                  transforms.Normalize(MEAN, STD)])
    sets = {"train": Files(manifest.root, *split(manifest, "train"), train_tf),
            "val": Files(manifest.root, *split(manifest, "val"), eval_tf)}
    loaders = {k: DataLoader(v, batch_size=batch_size, shuffle=k == "train", num_workers=workers)
               for k, v in sets.items()}
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for p in model.parameters():
        p.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, len(manifest.classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    loss = criterion(model(inputs), labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                seen += len(labels)
        scheduler.step()
    seconds = time.perf_counter() - start
    test = Files(manifest.root, *split(manifest, "test"), eval_tf)
    model.eval()
    probs, ys = [], []
    with torch.no_grad():
        for inputs, labels in DataLoader(test, batch_size=batch_size, num_workers=workers):
            probs.append(model(inputs).softmax(1).numpy())
            ys.append(labels.numpy())
    from featcache.metrics import auroc, positive_class_index

    positive = positive_class_index(manifest.classes)
    score = auroc(np.concatenate(ys) == positive, np.concatenate(probs)[:, positive])
    return {"approach": "tutorial", "train_seconds": seconds, "images_per_second": seen / seconds,
            "test_auroc": score}


def naive(manifest, batch_size: int, workers: int) -> dict:
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    data = Files(manifest.root, list(manifest.paths), list(manifest.labels), tf)
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.eval()
    features, start = [], time.perf_counter()
    with torch.no_grad():
        for inputs, _ in DataLoader(data, batch_size=batch_size, num_workers=workers):
            features.append(model(inputs).numpy())
    seconds = time.perf_counter() - start
    return {"approach": "naive", "seconds": seconds, "images_per_second": len(data) / seconds,
            "rows": int(sum(len(f) for f in features))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("approach", choices=("tutorial", "naive"))
    parser.add_argument("data")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from featcache.manifest import scan

    manifest = scan(args.data, seed=args.seed).stratified_subset(args.max_images, args.seed)
    if args.approach == "tutorial":
        result = tutorial(manifest, args.epochs, args.batch_size, args.workers)
    else:
        result = naive(manifest, args.batch_size, args.workers)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
