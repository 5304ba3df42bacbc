"""``--heads mlp``: one-hidden-layer probes trained at once as a sweep, each stopped early on validation.

Every head is standardize -> linear (D x width) -> ReLU -> dropout -> linear
(width x K) -> softmax, trained with AdamW (decoupled weight decay on the
weights, not the biases) over a grid of hidden width x weight decay x
learning rate. As in the linear sweep, the heads train together: the heads
of one width share one weight tensor of shape (heads, D, width), so a
minibatch step is one batched product per width for all of them, on the
same minibatches. After every epoch each head is scored on validation; a
head's weights at its best epoch are kept, and training stops once the best
score of all heads has not risen for :data:`PATIENCE` epochs (or after
``--epochs``). The
chosen head is exported as an :class:`MlpHead`, what head.pt stores.

Multi-label targets ((N, L), NaN unknown under the fit's policy) train a
sigmoid per label with binary cross-entropy over the known entries only,
each label's positives weighted as the linear sweep weighs them
(:func:`~featcache.heads.base.positive_weight_vector`); heads are scored
and stopped on the mean validation AUROC over labels.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from featcache.heads.base import (
    FeatureNorm,
    Head,
    HeadSettings,
    class_weight_vector,
    positive_weight_vector,
    probabilities,
    register,
)
from featcache.options import HEAD

DEFAULT_WIDTHS = (256, 1024)
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-2)
# On the Kermany resnet18 cache heads at lr 1e-4 were still improving on validation at epoch 20 (the
# default --epochs); at 3e-3 they peaked at epochs 13-19, at 1e-3 at 22-26 (of 30).
DEFAULT_LRS = (1e-3, 3e-3)
DROPOUT = 0.5
PATIENCE = 5
BATCH_SIZE = 256
BETAS = (0.9, 0.999)
EPS = 1e-8


def mlp_grid(widths=DEFAULT_WIDTHS, weight_decays=DEFAULT_WEIGHT_DECAYS, lrs=DEFAULT_LRS) -> list[dict]:
    """Every (width, weight decay, lr), grouped by width (the sweep's outer axis)."""
    return [{"width": w, "weight_decay": wd, "lr": lr} for w, wd, lr in itertools.product(widths, weight_decays, lrs)]


def config_name(config: dict) -> str:
    return f"mlp_w_{config['width']}_wd_{config['weight_decay']:g}_lr_{config['lr']:g}"


def _softmax_loss(logits, target, weight):
    """Per-head weighted softmax cross-entropy, summed over heads (each head's gradient is its own).
    ``target`` (B, K) one-hot rows, ``weight`` (B,) each row's class weight."""
    per_row = -(logits.log_softmax(dim=-1) * target).sum(dim=-1)  # (H, B)
    return ((per_row * weight).sum(dim=1) / weight.sum()).sum()


def _masked_bce(logits, target, weight):
    """Per-head binary cross-entropy of every label, each label's weighted mean over the rows where it is
    known, averaged over labels and summed over heads. ``weight`` (B, L) is 0 where a label is unknown, else
    1, or a positive's weight."""
    import torch.nn.functional as F

    per_entry = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")  # (H, B, L)
    per_label = (per_entry * weight).sum(dim=1) / weight.sum(dim=0).clamp_min(1e-12)  # (H, L)
    return per_label.mean(dim=1).sum()


def training_targets(y, K: int, class_weight: str, device):
    """(targets, weights, loss) of one fit: one-hot rows and class weights per row for class indices; for
    (N, L) multi-label targets (NaN unknown), 0/1 targets and per-entry weights (0 unknown, positives by
    ``class_weight``) for the masked binary cross-entropy."""
    import torch

    if np.ndim(y) == 1:
        yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
        weight = torch.as_tensor(class_weight_vector(np.asarray(y), K, class_weight), dtype=torch.float32,
                                 device=device)[yt]
        return torch.eye(K, device=device)[yt], weight, _softmax_loss
    y = np.asarray(y, dtype=np.float32)
    known = ~np.isnan(y)
    target = np.where(known, y, 0.0)
    weight = known * (1.0 + target * (positive_weight_vector(y, class_weight) - 1.0))
    return (torch.as_tensor(target, dtype=torch.float32, device=device),
            torch.as_tensor(weight, dtype=torch.float32, device=device), _masked_bce)


class WidthGroup:
    """The heads of one hidden width: (H, D, W), (H, 1, W), (H, W, K), (H, 1, K) tensors and their Adam moments."""

    def __init__(self, configs: list[dict], D: int, K: int, gen, device):
        import torch

        self.configs = configs
        H, W = len(configs), configs[0]["width"]
        # nn.Linear's initialisation, one draw per width: heads differ by their settings alone.
        b1, b2 = 1 / math.sqrt(D), 1 / math.sqrt(W)
        init = [torch.rand(shape, generator=gen).mul_(2 * bound).sub_(bound)
                for shape, bound in (((D, W), b1), ((1, W), b1), ((W, K), b2), ((1, K), b2))]
        self.params = [p.to(device).expand(H, *p.shape).clone().requires_grad_(True) for p in init]
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.lr = torch.tensor([c["lr"] for c in configs], device=device).view(H, 1, 1)
        self.decay = torch.tensor([c["weight_decay"] for c in configs], device=device).view(H, 1, 1)
        self.best = [p.detach().clone() for p in self.params]
        self.best_score = np.full(H, -np.inf)
        self.best_epoch = np.zeros(H, dtype=int)

    def logits(self, x, dropout_mask=None):
        W1, b1, W2, b2 = self.params
        hidden = (x @ W1 + b1).relu_()  # (B, D) @ (H, D, W) -> (H, B, W)
        if dropout_mask is not None:
            hidden = hidden * dropout_mask
        return hidden @ W2 + b2  # (H, B, K)

    def step(self, grads, t: int) -> None:
        import torch

        with torch.no_grad():
            for i, (p, g, (m, v)) in enumerate(zip(self.params, grads, self.moments)):
                m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
                v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
                if i in (0, 2):  # weights decay, biases do not (AdamW)
                    p.mul_(1 - self.lr * self.decay)
                update = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt_().add_(EPS))
                p.sub_(self.lr * update)

    def keep_improved(self, scores: np.ndarray, epoch: int) -> None:
        import torch

        better = scores > self.best_score
        if better.any():
            mask = torch.as_tensor(better, device=self.best[0].device)
            for best, p in zip(self.best, self.params):
                best[mask] = p.detach()[mask]
            self.best_score[better] = scores[better]
            self.best_epoch[better] = epoch


@dataclass
class MlpSweep:
    """Train every config of :func:`mlp_grid` at once; each group's ``best`` holds its heads at their best
    validation epoch."""

    configs: list[dict]
    epochs: int = HEAD.epochs
    patience: int = PATIENCE
    dropout: float = DROPOUT
    batch_size: int = BATCH_SIZE
    class_weight: str = "none"
    seed: int = 0
    device: str = "cpu"

    def fit(self, train, val, n_classes: int, score=None) -> "MlpSweep":
        """Train on ``train`` (X, y); after each epoch score every head on ``val`` (X, y) with
        ``score(y, probs)``. Without ``val``, every head trains for all its epochs and keeps the last."""
        import torch

        from featcache.heads.sweep import busy_cores, choose_threads, kept_torch_threads
        from featcache.runtime.device import cpu_cores

        X, y = train
        with kept_torch_threads() as limit:
            if torch.device(self.device).type == "cpu":
                macs = 3 * min(self.batch_size, len(X)) * np.shape(X)[1] * sum(c["width"] for c in self.configs)
                torch.set_num_threads(choose_threads(macs, cpu_cores(), busy_cores(), limit))
            return self._train(X, y, val, n_classes, score)

    def _train(self, X, y, val, K: int, score) -> "MlpSweep":
        import torch

        dev = torch.device(self.device)
        self.norm_ = FeatureNorm("standard").fit(X)
        Xt = torch.as_tensor(self.norm_.transform(np.asarray(X, dtype=np.float32)), device=dev)
        self.multilabel_ = np.ndim(y) == 2
        target, weight, loss_of = training_targets(y, K, self.class_weight, dev)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        widths = list(dict.fromkeys(c["width"] for c in self.configs))
        self.groups_ = [WidthGroup([c for c in self.configs if c["width"] == w], Xt.shape[1], K, gen, dev)
                        for w in widths]
        N, t, waited = len(Xt), 0, 0
        self.epochs_run_ = 0
        for epoch in range(1, self.epochs + 1):
            order = torch.randperm(N, generator=gen).to(dev)
            for start in range(0, N, self.batch_size):
                idx = order[start : start + self.batch_size]
                t += 1
                for group in self.groups_:
                    H, W = len(group.configs), group.configs[0]["width"]
                    keep = (torch.rand(H, len(idx), W, generator=gen) >= self.dropout).to(dev)
                    mask = keep.float() / (1 - self.dropout)
                    loss = loss_of(group.logits(Xt[idx], dropout_mask=mask), target[idx], weight[idx])
                    group.step(torch.autograd.grad(loss, group.params), t)
            self.epochs_run_ = epoch
            if val is None:
                continue
            waited = 0 if self._score(val, score, epoch) else waited + 1
            if waited >= self.patience:
                break
        if val is None:
            for group in self.groups_:
                group.keep_improved(np.full(len(group.configs), np.inf), self.epochs_run_)
        return self

    def _score(self, val, score, epoch: int) -> bool:
        """Score every head on ``val`` and keep those that improved; whether the best score of all rose.

        Stopping waits for the best head, not for every head: of eight heads
        one crept up nearly every epoch on the Kermany cache, long after the
        head fit-head would choose had stopped improving."""
        import torch

        Xv = torch.as_tensor(self.norm_.transform(np.asarray(val[0], dtype=np.float32)),
                             device=self.groups_[0].params[0].device)
        before = max(float(g.best_score.max()) for g in self.groups_)
        with torch.no_grad():
            for group in self.groups_:
                logits = group.logits(Xv)
                probs = (logits.sigmoid() if self.multilabel_ else logits.softmax(dim=-1)).cpu().numpy()
                scores = np.array([score(val[1], p) for p in probs])
                group.keep_improved(scores, epoch)
        return max(float(g.best_score.max()) for g in self.groups_) > before

    def results(self):
        """(config, best validation score, best epoch, export()) of every head, in grid order."""
        for group in self.groups_:
            for h, config in enumerate(group.configs):
                yield config, float(group.best_score[h]), int(group.best_epoch[h]), \
                    (lambda g=group, h=h: self.export(g, h))

    def export(self, group: WidthGroup, h: int) -> "MlpHead":
        head = MlpHead(group.configs[h], epochs=self.epochs, class_weight=self.class_weight, seed=self.seed,
                       device=self.device)
        W1, b1, W2, b2 = (p[h].cpu().numpy().copy() for p in group.best)
        return head.set_weights(self.norm_, W1, b1[0], W2, b2[0], multilabel=self.multilabel_)


@register
class MlpHead(Head):
    """Standardize, one hidden ReLU layer, a linear map and a softmax (a sigmoid per label for multi-label
    targets): one head of an :class:`MlpSweep` (dropout acts in training only)."""

    kind = "mlp"
    help = "one-hidden-layer probes with dropout, width x weight decay x lr trained at once, early stop on val"
    uses_device = True
    takes_multilabel = True
    multilabel = False

    def __init__(self, config: dict | None = None, **training):
        """``config``: width, weight_decay and lr (default: the grid's narrowest, least decayed, slower);
        ``training``: :class:`MlpSweep`'s other settings (epochs, class_weight, seed, device, ...)."""
        self.config = config or {"width": DEFAULT_WIDTHS[0], "weight_decay": DEFAULT_WEIGHT_DECAYS[0],
                                 "lr": DEFAULT_LRS[0]}
        self.training = training

    def set_weights(self, norm: FeatureNorm, w1, b1, w2, b2, multilabel: bool = False) -> "MlpHead":
        self.norm, self.w1, self.b1, self.w2, self.b2, self.multilabel = norm, w1, b1, w2, b2, multilabel
        return self

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> "MlpHead":
        """This one head, trained for all its epochs (no validation: ``candidates`` stops early on it)."""
        sweep = MlpSweep([self.config], **self.training).fit((X, y), None, n_classes)
        fitted = sweep.export(sweep.groups_[0], 0)
        return self.set_weights(fitted.norm, fitted.w1, fitted.b1, fitted.w2, fitted.b2, fitted.multilabel)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        x = self.norm.transform(np.asarray(X, dtype=np.float32))
        return probabilities((np.maximum(x @ self.w1 + self.b1, 0) @ self.w2 + self.b2).astype(np.float64),
                             self.multilabel)

    def n_parameters(self) -> int:
        return int(sum(a.size for a in (self.w1, self.b1, self.w2, self.b2)))

    def state_dict(self) -> dict:
        import torch

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

        state = {"kind": self.kind, "norm": self.norm.kind, "mean": t(self.norm.mean_), "scale": t(self.norm.scale_),
                 "w1": t(self.w1), "b1": t(self.b1), "w2": t(self.w2), "b2": t(self.b2)}
        return {**state, "task": "multilabel"} if self.multilabel else state

    @classmethod
    def from_state_dict(cls, state: dict) -> "MlpHead":
        norm = FeatureNorm(state["norm"])
        norm.mean_ = state["mean"].double().numpy()
        norm.scale_ = state["scale"].double().numpy()
        w1, b1, w2, b2 = (state[k].numpy() for k in ("w1", "b1", "w2", "b2"))
        return cls({"width": w1.shape[1]}).set_weights(norm, w1, b1, w2, b2,
                                                       multilabel=state.get("task") == "multilabel")

    @classmethod
    def candidates(cls, train, val, n_classes, score, settings: HeadSettings):
        grid = mlp_grid(DEFAULT_WIDTHS,
                        DEFAULT_WEIGHT_DECAYS if settings.weight_decays is None else settings.weight_decays,
                        DEFAULT_LRS if settings.lrs is None else settings.lrs)
        class_weight = settings.class_weight or "none"
        epochs = settings.epochs or HEAD.epochs
        sweep = MlpSweep(grid, epochs=epochs, class_weight=class_weight, seed=settings.seed,
                         device=settings.device).fit(train, val, n_classes, score)
        out = []
        for config, val_score, epoch, export in sweep.results():
            out.append({
                "name": config_name(config),
                "params": {**config, "epoch": epoch, "epochs_run": sweep.epochs_run_, "dropout": DROPOUT,
                           "class_weight": class_weight},
                "val_auroc": val_score,
                # Narrower, more decayed, slower-learning and earlier-stopped heads are the more regularized.
                "rank": (-config["width"], config["weight_decay"], -config["lr"], -epoch),
                "export": export,
            })
        return out
