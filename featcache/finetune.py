"""finetune: every weight trains, or only a new head over a frozen backbone, in one AMP loop.

Both modes share the loop, the data (the manifest and its patient-grouped
validation split, decoded by the same backends as extract), the metrics code
and the outputs, so a fine-tuned run and a fixed-feature-extractor run
compare key for key. The frozen mode is the classic transfer-learning
tutorial's "fixed feature extractor": its backbone runs forward on every
image every epoch, which is the cost featcache's cache removes.

A multi-label set trains a sigmoid per label with binary cross-entropy
masked where a label is unknown under ``--uncertain`` / ``--unmentioned``,
as fit-head's heads do; the best epoch is the one with the best mean
validation AUROC over labels.

Mixed precision has one code path: ``featcache.runtime.amp.autocast`` and
``GradScaler(enabled=fp16)``, bf16 on CPU and GPU where supported, fp16 with
loss scaling on CUDA.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.runtime.amp import autocast
from featcache.errors import UserError
from featcache.eval.rundir import RunRecord
from featcache.options import FINETUNE
from featcache.runtime.device import memory_format, peak_gpu_mb, peak_host_mb, peak_memory_mb, place

DEFAULT_LR_FULL = 3e-4
DEFAULT_LR_FROZEN = 1e-3
WEIGHT_DECAY = 1e-4
DEFAULTS = {"epochs": 10, "batch_size": 32, "augment": "light"}
RECIPES = ("featcache", "tutorial")
# The PyTorch transfer-learning tutorial's "ConvNet as fixed feature extractor", as its authors wrote it:
# SGD on the new layer, StepLR per epoch, batch 4, RandomResizedCrop + flip, BatchNorm statistics updating
# in train mode, the epoch with the best validation accuracy kept.
TUTORIAL = {"epochs": 25, "batch_size": 4, "augment": "tutorial", "lr": 1e-3, "momentum": 0.9, "step_size": 7,
            "gamma": 0.1}


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run; a rerun resumes only when these are equal."""

    data: str
    manifest: str
    backbone: str
    weights: str
    epochs: int
    lr: float
    batch_size: int
    amp: str
    freeze_backbone: bool
    augment: str
    hflip: bool
    class_weight: str
    early_stop: int | None
    recipe: str
    max_images: int | None
    subsample_all: bool
    compile: bool
    seed: int
    threshold: str
    world: int
    uncertain: str = FINETUNE.uncertain
    unmentioned: str = FINETUNE.unmentioned


# Settings added after runs were already being saved, with the value those runs had.
SETTING_DEFAULTS = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}


def classifier_class():
    import torch
    import torch.nn as nn

    class Classifier(nn.Module):
        """A backbone's features into a new linear layer; the frozen mode runs the backbone without grad."""

        def __init__(self, extractor: nn.Module, feature_dim: int, n_classes: int, frozen: bool,
                     tutorial: bool = False):
            super().__init__()
            self.extractor = extractor
            # A frozen backbone gets a linear probe as MAE and DINO train one: a BatchNorm without
            # affine parameters standardizes the features first (random-init and some pretrained
            # features are far from unit scale, which a plain linear layer learns slowly).
            # The tutorial's recipe has a bare linear layer.
            layers = [nn.BatchNorm1d(feature_dim, affine=False)] if frozen and not tutorial else []
            self.head = nn.Sequential(*layers, nn.Linear(feature_dim, n_classes))
            self.n_classes = n_classes
            self.frozen = frozen
            self.tutorial = tutorial

        def forward(self, images):
            if self.frozen:
                with torch.no_grad():
                    features = self.extractor(images)
                return self.head(features.float())
            return self.head(self.extractor(images))

        def train(self, mode: bool = True):
            super().train(mode)
            # featcache's frozen mode freezes BatchNorm statistics too (a fixed feature extractor); the
            # tutorial calls model.train(), so its frozen backbone's running statistics still move.
            if self.frozen and not self.tutorial:
                self.extractor.eval()
            return self

    return Classifier


def torchvision_state_dict(model, entry) -> dict:
    """The backbone's torchvision keys, with the new head under the classifier's own name,
    so ``--weights best.pt`` works for extract (the head is ignored there) and for torchvision."""
    state = {k: v.detach().cpu() for k, v in model.extractor.body.state_dict().items()}
    prefix = entry.head_prefixes[0]
    state.update({prefix + k: v.detach().cpu() for k, v in model.head.state_dict().items()})
    return state


def finetune(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str = FINETUNE.backbone,
    weights: str = FINETUNE.weights,
    epochs: int | None = FINETUNE.epochs,
    lr: float | None = FINETUNE.lr,
    batch_size: int | None = FINETUNE.batch_size,
    amp: str = FINETUNE.amp,
    freeze_backbone: bool = FINETUNE.freeze_backbone,
    augment: str | None = FINETUNE.augment,
    hflip: bool = FINETUNE.hflip,
    class_weight: str = FINETUNE.class_weight,
    early_stop: int | None = FINETUNE.early_stop,
    recipe: str = FINETUNE.recipe,
    max_images: int | None = FINETUNE.max_images,
    subsample_all: bool = FINETUNE.subsample_all,
    compile: bool = FINETUNE.compile,
    seed: int = FINETUNE.seed,
    threshold: str | float = FINETUNE.threshold,
    device: str = FINETUNE.device,
    backend: str = FINETUNE.backend,
    workers: int | None = FINETUNE.workers,
    overwrite: bool = FINETUNE.overwrite,
    scan_options: dict | None = None,
    n_resamples: int = FINETUNE.n_resamples,
    progress: bool = FINETUNE.progress,
    positive_class: str | None = FINETUNE.positive_class,
    uncertain: str = FINETUNE.uncertain,
    unmentioned: str = FINETUNE.unmentioned,
    dist=None,
) -> dict:
    """Train, keep the best epoch by validation AUROC, report val and test into ``out``."""
    import torch

    from featcache.runtime import distributed
    from featcache.backbones.registry import create_backbone, get_entry
    from featcache.runtime.console import get_console, quiet_console
    from featcache.decode import resolve_backend
    from featcache.runtime.device import resolve_device
    from featcache.data.labels import MULTILABEL, apply_policy, check_policy, check_task_flags
    from featcache.data.sources import read_manifest
    from featcache.runtime.amp import resolve_amp
    from featcache.eval.metrics import parse_threshold

    entry = get_entry(backbone)
    if recipe not in RECIPES:
        raise UserError(f"--recipe takes {' or '.join(RECIPES)}, got {recipe!r}")
    tutorial = recipe == "tutorial"
    defaults = {**DEFAULTS, **(TUTORIAL if tutorial else {})}
    epochs = defaults["epochs"] if epochs is None else epochs
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    augment = defaults["augment"] if augment is None else augment
    freeze_backbone = freeze_backbone or tutorial  # the tutorial's recipe is a fixed feature extractor
    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if class_weight not in ("none", "balanced"):
        raise UserError(f"--class-weight takes none or balanced, got {class_weight!r}")
    if early_stop is not None and early_stop < 1:
        raise UserError(f"--early-stop must be at least 1 epoch, got {early_stop}")
    if lr is not None and lr <= 0:
        raise UserError(f"--lr must be positive, got {lr}")
    rule = parse_threshold(threshold)
    check_policy(uncertain, unmentioned)
    from featcache.decode.augment import augment_params

    aug = augment_params(augment, hflip)
    if dist is None:
        gpu = device != "cpu" and torch.cuda.is_available()
        dist = distributed.from_env("nccl" if gpu and torch.distributed.is_nccl_available() else "gloo")
    console = get_console() if dist.is_main else quiet_console()
    device = resolve_device(device)
    if device == "cuda" and dist.active:
        device = f"cuda:{dist.local_rank}"
    amp_dtype, use_scaler, amp_words = resolve_amp(amp, device)
    decode = resolve_backend(backend, device)  # DALI (augmenting on the GPU) on a GPU, PIL workers on a CPU

    manifest = read_manifest(data, **(scan_options or {})).limit(max_images, seed, subsample_all=subsample_all)
    multilabel = manifest.task == MULTILABEL
    check_task_flags(multilabel, positive_class, uncertain, unmentioned)
    # Multi-label: float targets under the policy, NaN where unknown; else class indices.
    targets = apply_policy(manifest.labels, uncertain, unmentioned) if multilabel else np.asarray(manifest.labels)
    if "train" not in manifest.splits or "val" not in manifest.splits:
        raise UserError(f"{data} has no train split to train and validate on")
    split_rows = {s: manifest.indices(s) for s in ("train", "val", "test")}
    from featcache.eval.metrics import positive_class_index

    # Checked before the run folder is touched: a misspelt class never clears a run it would replace.
    positive = positive_class_index(manifest.classes, positive_class) \
        if len(manifest.classes) == 2 and not multilabel else None
    bb = create_backbone(backbone, weights, seed=seed)
    lr = lr if lr is not None else (TUTORIAL["lr"] if tutorial else DEFAULT_LR_FROZEN if freeze_backbone
                                    else DEFAULT_LR_FULL)
    settings = Settings(str(manifest.root), manifest.digest(), backbone, bb.weights, epochs, lr, batch_size, amp,
                        freeze_backbone, augment, hflip, class_weight, early_stop, recipe, max_images, subsample_all,
                        compile, seed,
                        str(threshold), dist.world, uncertain, unmentioned)
    out = Path(out)
    run_dir = RunRecord(out)
    state = _prepare_run_dir(run_dir, settings, overwrite, dist, console)
    if state == "done":
        console.print(f"[green]{out} holds this finished run[/]; nothing to do")
        return run_dir.metrics

    classes = list(manifest.classes)
    training = build(bb, len(classes), labels_train=targets[split_rows["train"]],
                     freeze_backbone=freeze_backbone, tutorial=tutorial, lr=lr, epochs=epochs,
                     steps_per_epoch=math.ceil(len(split_rows["train"]) / (batch_size * dist.world)),
                     class_weight=class_weight, use_scaler=use_scaler, device=device, compile=compile, dist=dist,
                     seed=seed)
    model, train_model, optimizer, scheduler, scaler, criterion = (
        training.model, training.train_model, training.optimizer, training.scheduler, training.scaler,
        training.criterion)
    chosen_by = "val_accuracy" if tutorial else "val_auroc"
    history, best = [], {"auroc": -1.0, "epoch": -1}
    start_epoch = 0
    if state == "resume":
        ckpt = run_dir.read_last(map_location=device)
        training.load(ckpt)
        history, best, start_epoch = ckpt["history"], ckpt["best"], int(ckpt["epoch"]) + 1
        console.print(f"[bold]resuming[/] {out} after epoch {start_epoch} of {epochs} "
                      f"(best val AUROC so far {best['auroc']:.3f}, epoch {best['epoch'] + 1})")

    mode = "frozen backbone (only the new head learns)" if freeze_backbone else "full fine-tuning"
    console.print(f"[bold]{backbone}[/] ({bb.weights_note}), {mode}; {len(split_rows['train']):,} train / "
                  f"{len(split_rows['val']):,} val images; lr {lr:g}, batch {batch_size}, AMP {amp_words}, "
                  f"augment {augment}; {device}" + (f", {dist.world} processes" if dist.active else ""))
    from featcache.decode import default_workers

    workers = default_workers() if workers is None else workers
    wall_start = time.perf_counter()
    device_type = device.split(":")[0]
    from featcache.fit import multilabel_score, selection_score

    for epoch in range(start_epoch, epochs):
        if early_stop and history and (epoch - 1) - best["epoch"] >= early_stop:
            break  # a resumed run that had already stopped early
        t0 = time.perf_counter()
        train = _train_epoch(train_model, model, manifest, targets, split_rows["train"], bb.spec, decode.name, aug,
                             optimizer, None if tutorial else scheduler, scaler, criterion, epoch=epoch, seed=seed,
                             batch_size=batch_size, workers=workers, device=device, device_type=device_type,
                             amp_dtype=amp_dtype,
                             dist=dist, progress=progress and dist.is_main, epochs=epochs)
        train_seconds = time.perf_counter() - t0
        if tutorial:
            scheduler.step()
        dist.sync_buffers(model)
        val_probs, val_loss = predict_rows(model, manifest, split_rows["val"], bb.spec, decode.name, batch_size,
                                           workers, device, device_type, amp_dtype, criterion, targets=targets)
        y_val = targets[split_rows["val"]]
        val_auroc = multilabel_score(y_val, val_probs) if multilabel else selection_score(y_val, val_probs, positive)
        # Every rank saw 1/world of the training images in the same wall time: throughput is their sum.
        shares = dist.gather((train["images"], train_seconds))
        images, slowest = sum(n for n, _ in shares), max(s for _, s in shares)
        record = {
            "epoch": epoch + 1,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "val_loss": val_loss,
            "val_auroc": val_auroc,
            "val_accuracy": accuracy(y_val, val_probs),
            "images_per_second": float(images / slowest) if slowest else 0.0,
            "epoch_seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
            "peak_memory_mb": peak_memory_mb(device),
            "lr": optimizer.param_groups[0]["lr"],
            "skipped": train["failed"],
        }
        # Rank 0's record decides "improved" and "stop" for every rank, so no rank can stop an epoch
        # earlier than another (which would hang the next all-reduce) or keep other "best" weights.
        record = dist.broadcast(record)
        val_auroc = record["val_auroc"]
        history.append(record)
        improved = record[chosen_by] > best.get("score", best["auroc"])
        if improved:
            best = {"auroc": val_auroc, "score": record[chosen_by], "epoch": epoch}
        if dist.is_main:
            if improved:
                run_dir.write_best({"model": torchvision_state_dict(model, entry),
                                    "config": json.dumps({**asdict(settings), "classes": classes,
                                                          "epoch": epoch + 1})})
            run_dir.write_last({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                                "history": history, "best": best, "settings": json.dumps(asdict(settings))})
            run_dir.write_history(history)
        console.print(f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f}, acc "
                      f"{record['train_accuracy']:.3f} | val loss {val_loss:.4f}, AUROC {val_auroc:.3f}, acc "
                      f"{record['val_accuracy']:.3f} | {record['images_per_second']:.1f} img/s, "
                      f"{record['epoch_seconds']:.0f} s, peak {record['peak_memory_mb']:.0f} MB"
                      + (" [green]best[/]" if improved else ""))
        if early_stop and epoch - best["epoch"] >= early_stop:
            console.print(f"early stop: no better {chosen_by.replace('_', ' ')} for {early_stop} epochs")
            break
    dist.barrier()
    rank_facts = dist.gather({"epochs_run": len(history), "weights_sha256": _weights_digest(model)})
    metrics = None
    if dist.is_main:
        metrics = _finish(out, model, manifest, targets, split_rows, bb, entry, settings, classes, rule, history, best,
                          decode.name, batch_size, workers, device, device_type, amp_dtype, criterion,
                          n_resamples, seed, fit_seconds=sum(h["epoch_seconds"] for h in history),
                          wall=time.perf_counter() - wall_start, amp_words=amp_words, rank_facts=rank_facts,
                          positive_class=positive_class)
    dist.barrier()
    return metrics


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    """Argmax accuracy; multi-label: the share of known (image, label) entries right at 0.5."""
    if y.ndim == 1:
        return float(np.mean(probs.argmax(axis=1) == y))
    known = ~np.isnan(y)
    return float(np.mean((probs[known] >= 0.5) == (y[known] == 1))) if known.any() else 0.0


def masked_bce(pos_weight):
    """Binary cross-entropy over the known entries of (B, L) targets (NaN unknown), positives of each label
    weighted by ``pos_weight`` (L,): the multi-label loss, as fit-head's sweep trains it."""
    import torch.nn.functional as F

    def loss(logits, targets):
        import torch

        known = ~torch.isnan(targets)
        t = torch.nan_to_num(targets, nan=0.0)
        weights = known * (1.0 + t * (pos_weight - 1.0))
        per_entry = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        return (per_entry * weights).sum() / weights.sum().clamp_min(1e-12)

    return loss


@dataclass
class Training:
    """What one fine-tuning run trains with. ``train_model`` is ``model`` as stepped (compiled, DDP-wrapped);
    ``model`` is what is saved and evaluated. ``per_batch_schedule``: the scheduler steps every batch (cosine)
    rather than once an epoch (the tutorial's StepLR)."""

    model: object
    train_model: object
    optimizer: object
    scheduler: object
    scaler: object
    criterion: object
    per_batch_schedule: bool

    def load(self, ckpt: dict) -> None:
        """Resume from a ``last.pt``: weights, optimizer, schedule and loss-scaler state."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])


def build(bb, n_classes: int, *, labels_train, freeze_backbone: bool, tutorial: bool, lr: float, epochs: int,
          steps_per_epoch: int, class_weight: str, use_scaler: bool, device: str, compile: bool, dist,
          seed: int) -> Training:
    """The classifier on ``bb`` and everything that trains it, for featcache's recipe or the tutorial's."""
    import torch

    torch.manual_seed(seed)
    extractor = bb.model.requires_grad_(not freeze_backbone)
    model, _ = place(classifier_class()(extractor, bb.feature_dim, n_classes, freeze_backbone, tutorial), device)
    params = [p for p in model.parameters() if p.requires_grad]
    if tutorial:  # SGD with momentum, lr divided by 10 every 7 epochs (stepped once per epoch)
        optimizer = torch.optim.SGD(params, lr=lr, momentum=TUTORIAL["momentum"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=TUTORIAL["step_size"],
                                                    gamma=TUTORIAL["gamma"])
    else:  # AdamW with a cosine decay stepped every batch
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=use_scaler)
    weight = None
    if labels_train.ndim == 2:
        from featcache.heads.base import positive_weight_vector

        criterion = masked_bce(torch.tensor(positive_weight_vector(labels_train, class_weight), dtype=torch.float32,
                                            device=device))
    else:
        if class_weight == "balanced":
            counts = np.bincount(labels_train, minlength=n_classes).clip(min=1)
            weight = torch.tensor(len(labels_train) / (n_classes * counts), dtype=torch.float32, device=device)
        criterion = torch.nn.CrossEntropyLoss(weight=weight)
    train_model = torch.compile(model) if compile else model
    if dist.active:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    return Training(model, train_model, optimizer, scheduler, scaler, criterion, per_batch_schedule=not tutorial)


def load_torchvision_state_dict(model, state: dict, entry) -> None:
    """The inverse of :func:`torchvision_state_dict`: ``best.pt``'s keys back into a Classifier."""
    prefix = entry.head_prefixes[0]
    model.head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    model.extractor.body.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)})


def _weights_digest(model) -> str:
    """SHA-256 of every parameter and buffer, in state_dict order (equal across DDP ranks in sync)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _prepare_run_dir(record: RunRecord, settings: Settings, overwrite: bool, dist, console) -> str:
    """"fresh", "resume" or "done", with the folder ready; a different run there is refused."""
    out = record.folder

    def choose() -> str:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder")
        decision = "fresh"
        if record.last_path.exists() and not overwrite:
            try:
                saved = json.loads(record.read_last(map_location="cpu")["settings"])
            except Exception:
                saved = None
            current = json.loads(json.dumps(asdict(settings)))
            if saved is None:
                raise UserError(f"{record.last_path} cannot be read; pass --overwrite to start over")
            # A run saved before a setting existed ran with its default.
            saved = {**SETTING_DEFAULTS, **saved}
            if saved != current:
                diffs = [k for k in saved if saved[k] != current.get(k)]
                raise UserError(f"{out} holds a run with other settings ({', '.join(diffs)}); "
                                "pass --overwrite to replace it or choose another --out")
            decision = "done" if record.is_complete else "resume"
        if decision == "fresh" or overwrite:
            record.clear_progress()
            out.mkdir(parents=True, exist_ok=True)
            decision = "fresh"
        return decision

    decision = dist.decide(choose)
    return decision


def train_step(model, images, labels, optimizer, scaler, criterion, *, device_type: str, amp_dtype):
    """One optimisation step: forward under autocast (``amp_dtype`` None: fp32), loss in fp32, backward
    through the GradScaler (a pass-through unless fp16), optimizer step. Returns (loss, logits).
    Fine-tuning and ``featcache bench``'s train-step figure both run this."""
    with autocast(device_type, amp_dtype):
        logits = model(images)
    loss = criterion(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def _train_epoch(train_model, model, manifest, targets, rows, spec, backend, aug, optimizer, scheduler, scaler,
                 criterion, *,
                 epoch, seed, batch_size, workers, device, device_type, amp_dtype, dist, progress, epochs) -> dict:
    import torch

    from featcache.decode import make_loader
    from featcache.runtime.progress import image_progress

    # The same shuffle and augmentations after a resume: every epoch's randomness comes from its own seed.
    epoch_seed = seed * 100_003 + epoch
    generator = torch.Generator().manual_seed(epoch_seed)
    torch.manual_seed(epoch_seed)
    order = np.asarray(rows)[torch.randperm(len(rows), generator=generator).numpy()]
    if dist.active:  # equal shares (the first rows repeat to fill), as DistributedSampler pads
        share = math.ceil(len(order) / dist.world)
        order = np.resize(order, share * dist.world)[dist.rank :: dist.world]
    loader = make_loader(manifest, spec, backend=backend, batch_size=batch_size, workers=workers, rows=order,
                         pin_memory=device_type == "cuda", device=device, augment=aug, seed=epoch_seed)
    labels_of = targets
    model.train()
    layout = memory_format(model, device)
    total_loss, correct, seen, entries_seen, failed = 0.0, 0, 0, 0, 0
    with image_progress(len(order), f"epoch {epoch + 1}/{epochs}", enabled=progress) as advance:
        for batch in loader:
            failed += len(batch.failed)
            if not len(batch.indices):
                advance(len(batch.failed))
                continue
            images = batch.images.to(device, non_blocking=True).contiguous(memory_format=layout)
            labels = torch.as_tensor(labels_of[batch.indices], device=device)
            loss, logits = train_step(train_model, images, labels, optimizer, scaler, criterion,
                                      device_type=device_type, amp_dtype=amp_dtype)
            if scheduler is not None:  # per-batch schedules; the tutorial's StepLR moves per epoch
                scheduler.step()
            n = len(labels)
            total_loss += float(loss.detach()) * n
            right, entries = _hits(logits.detach(), labels)
            correct += right
            entries_seen += entries
            seen += n
            advance(n + len(batch.failed))
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(entries_seen, 1), "images": seen,
            "failed": failed}


def _hits(logits, labels) -> tuple[int, int]:
    """Right decisions and decisions made: argmax per image, or at 0.5 per known (image, label) entry."""
    import torch

    if labels.ndim == 1:
        return int((logits.argmax(dim=1) == labels).sum()), len(labels)
    known = ~torch.isnan(labels)
    return int(((logits >= 0) == (labels == 1))[known].sum()), int(known.sum())


def predict_rows(model, manifest, rows, spec, backend, batch_size, workers, device, device_type, amp_dtype,
                 criterion=None, targets=None):
    """(N, K) probabilities of ``rows`` (undecodable ones get uniform scores) and the mean loss against
    ``targets`` (default: the manifest's labels). A multi-label model gives each label's sigmoid."""
    import torch

    from featcache.decode import make_loader

    model.eval()
    K = model.n_classes
    labels = np.asarray(manifest.labels) if targets is None else targets
    multilabel = labels.ndim == 2
    probs = np.full((len(rows), K), 0.5 if multilabel else 1.0 / K)
    position = {int(r): i for i, r in enumerate(rows)}
    loss_sum, n = 0.0, 0
    layout = memory_format(model, device)
    with torch.inference_mode():
        for batch in make_loader(manifest, spec, backend=backend, batch_size=batch_size, workers=workers,
                                 rows=rows, device=device):
            if not len(batch.indices):
                continue
            x = batch.images.to(device).contiguous(memory_format=layout)
            with autocast(device_type, amp_dtype):
                logits = model(x).float()
            if criterion is not None:
                y = torch.as_tensor(labels[batch.indices], device=device)
                loss_sum += float(criterion(logits, y)) * len(y)
                n += len(y)
            scores = logits.sigmoid() if multilabel else logits.softmax(dim=1)
            for row, p in zip(batch.indices.tolist(), scores.cpu().numpy()):
                probs[position[row]] = p
    return probs, loss_sum / max(n, 1)


def _finish(out, model, manifest, targets, split_rows, bb, entry, settings, classes, rule, history, best, backend,
            batch_size, workers, device, device_type, amp_dtype, criterion, n_resamples, seed, *, fit_seconds,
            wall, amp_words, rank_facts, positive_class=None) -> dict:
    """Best epoch's weights -> val and test metrics, plots, learning curve, run.json."""
    from featcache.fit import run_metrics

    record = RunRecord(out)
    best_ckpt = record.read_best(map_location=device)
    state = best_ckpt["model"]
    load_torchvision_state_dict(model, state, entry)
    labels = targets
    patients = np.asarray(manifest.patients, dtype=object)
    splits, inference = {}, {}
    for split in ("val", "test"):
        rows = split_rows[split]
        if len(rows):
            t0 = time.perf_counter()
            probs, _ = predict_rows(model, manifest, rows, bb.spec, backend, batch_size, workers, device, device_type,
                                    amp_dtype, targets=targets)
            inference = {"ms_per_image": 1000 * (time.perf_counter() - t0) / len(rows), "batch_size": batch_size,
                         "split": split}  # decode + forward, as a user's predict pays it; the last split wins
            splits[split] = (labels[rows], probs, patients[rows])
    mode = "frozen" if settings.freeze_backbone else "full"
    tutorial = settings.recipe == "tutorial"
    name = f"finetune_{mode}_lr_{settings.lr:g}_aug_{settings.augment}" + ("_recipe_tutorial" if tutorial else "")
    selected = {"head": "finetune", "name": name, "mode": mode, "recipe": settings.recipe,
                "epoch": best["epoch"] + 1, "epoch_chosen_by": "val_accuracy" if tutorial else "val_auroc",
                "lr": settings.lr, "augment": settings.augment, "class_weight": settings.class_weight,
                "amp": amp_words}
    metrics = run_metrics(
        classes, rule, selected=selected,
        heads=[{"name": name, "mode": mode, "lr": settings.lr, "val_auroc": best["auroc"]}],
        fit_seconds=fit_seconds,
        source={"cache": None, "backbone": bb.name, "weights": bb.weights, "fingerprint": None},
        n_train=len(split_rows["train"]), splits=splits, n_resamples=n_resamples, seed=seed,
        positive_class=positive_class,
        policy={"uncertain": settings.uncertain, "unmentioned": settings.unmentioned} if targets.ndim == 2 else None,
    )
    record.write_metrics(metrics)
    paths = np.asarray(manifest.paths, dtype=object)
    record.write_predictions(classes, {s: (paths[split_rows[s]], y, p, pt) for s, (y, p, pt) in splits.items()})
    record.write_plots(metrics, {s: (y, p) for s, (y, p, _) in splits.items()})
    record.write_learning_curve(history, title=f"{bb.name}, {mode} fine-tuning")
    run = {
        "complete": True,
        "kind": "finetune",
        "strategy": ("finetune-tutorial-recipe" if tutorial else
                     "finetune-frozen" if settings.freeze_backbone else "finetune-full"),
        "backbone": bb.name,
        "weights": bb.weights,
        "data_root": settings.data,
        "settings": asdict(settings),
        "epochs_run": len(history),
        "best_epoch": best["epoch"] + 1,
        "wall_seconds": wall,
        "train_images_per_second": float(np.mean([h["images_per_second"] for h in history])),
        "images_per_second": float(np.mean([h["images_per_second"] for h in history])),
        "peak_memory_mb": max(h["peak_memory_mb"] for h in history),
        "peak_host_mb": peak_host_mb(),
        "peak_gpu_mb": peak_gpu_mb(device),
        "time_split": {"train": float(sum(h.get("train_seconds", 0.0) for h in history)),
                       "validate": float(sum(h["epoch_seconds"] - h.get("train_seconds", 0.0) for h in history))},
        "parameters": {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "total": sum(p.numel() for p in model.parameters())},
        "checkpoint_bytes": record.best_path.stat().st_size,
        "inference": inference,
        "amp": amp_words,
        # One entry per process: the epochs each ran and a digest of its final weights (DDP keeps them equal).
        "ranks": rank_facts,
        "featcache_version": __version__,
        "device": device,
        "validation": manifest.validation,
        "layout": manifest.layout,
        "counts": {s: dict(zip(classes, n)) for s, n in manifest.counts().items()},
    }
    record.write_run(run)
    return metrics
