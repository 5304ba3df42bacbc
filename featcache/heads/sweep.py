"""``--heads sweep``: many linear heads trained at once in torch; the choice is made on validation only.

DINOv2's linear evaluation, on a cache: one weight tensor of shape (groups,
D, heads, C), each minibatch step one batched product for every head, over a
grid of learning rate x weight decay x class weighting x feature
normalization. Multi-label targets train every label at once, (groups, D,
heads, labels), with binary cross-entropy masked where a label is unknown.
The chosen head is exported as a :class:`SweepHead`, a linear map
(normalize, then one affine map and a softmax, or a sigmoid per label),
which is what ``head.pt`` stores and ``featcache predict`` applies. Also here: how many
torch threads a fit uses, from its size and the cores free now.
"""

from __future__ import annotations

import itertools
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from featcache.heads.base import (
    CLASS_WEIGHTS,
    NORMALIZATIONS,
    FeatureNorm,
    Head,
    HeadSettings,
    LinearHead,
    class_weight_vector,
    positive_weight_vector,
    probabilities,
    register,
)
from featcache.options import HEAD
from featcache.runtime.device import cpu_cores

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3)
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_EPOCHS = HEAD.epochs
DEFAULT_BATCH_SIZE = 256
MOMENTUM = 0.9
# Multiply-adds of one sweep step that each torch thread needs before a split
# pays for the thread handoffs of the step's ~20 small ops. Measured on two
# free cores: a second thread speeds a step up 1.8x at 34 M (the default grid
# on 512-d features), 1.6x at 2 M (on 32-d), 1.4x at 0.26 M (one head on
# 256-d), but only 1.1x at 0.07 M (one head on 64-d).
MIN_MACS_PER_THREAD = 1 << 17
# Readings of the run queue; the smallest is kept, so a thread that wakes for an
# instant is not taken for a busy core.
LOAD_SAMPLES = 3


@dataclass(frozen=True)
class HeadConfig:
    lr: float
    weight_decay: float
    class_weight: str
    norm: str

    @property
    def name(self) -> str:
        return f"lr_{self.lr:g}_wd_{self.weight_decay:g}_cw_{self.class_weight}_norm_{self.norm}"


def sweep_grid(lrs=DEFAULT_LRS, weight_decays=DEFAULT_WEIGHT_DECAYS, class_weights=CLASS_WEIGHTS,
               norms=NORMALIZATIONS) -> list[HeadConfig]:
    """The full product, grouped by normalization (the sweep's outer axis)."""
    return [HeadConfig(lr, wd, cw, norm) for norm, lr, wd, cw in itertools.product(norms, lrs, weight_decays,
                                                                                   class_weights)]


def _running_now() -> int | None:
    """Runnable threads of other processes: Linux's run queue length less this process's running threads."""
    try:
        with open("/proc/loadavg") as f:
            total = int(f.read().split()[3].split("/")[0])  # "0.52 0.58 0.59 3/190 4242": 3 runnable now
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    # The state follows the parenthesised name, which may itself hold spaces.
                    own += f.read().rpartition(")")[2].split()[0] == "R"
            except OSError:  # the thread ended while we looked
                continue
        return max(0, total - own)
    except (OSError, IndexError, ValueError):
        return None


def busy_cores() -> int:
    """Cores other processes keep busy now (0 where the run queue cannot be read).

    A load average lags by a minute; a neighbour that started seconds ago is
    what turns a two-thread fit from 0.6 s into 7 s, so the run queue is read
    as it is now.
    """
    readings = [r for r in (_running_now() for _ in range(LOAD_SAMPLES)) if r is not None]
    return min(readings) if readings else 0


def choose_threads(macs_per_step: int, cores: int, busy: int, limit: int | None = None) -> int:
    """Torch threads for a fit: no more than its work can use, the free cores, or ``limit``.

    A thread that shares its core with a busy process is descheduled for whole
    time slices, and every parallel op waits for it at its barrier: with one
    core taken, two threads were 6-20x slower than one. ``limit`` is the
    caller's own torch thread count (OMP_NUM_THREADS, set_num_threads), never
    exceeded.
    """
    free = max(1, cores - busy)
    useful = max(1, macs_per_step // MIN_MACS_PER_THREAD)
    return int(min(free, useful, limit or free))


@contextmanager
def kept_torch_threads():
    """Whatever thread count the block sets, the caller gets its own back (error or not)."""
    import torch

    previous = torch.get_num_threads()
    try:
        yield previous
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


class LinearHeadSweep:
    """Train every head of ``configs`` at once with minibatch SGD (Nesterov, cosine decay).

    Heads that share a normalization share its input; all groups have the same
    number of heads (the grid is a full product), so every step is one batched
    matrix product ``(G, B, D) @ (G, D, H*K)`` and its transpose for the
    gradient. The L2 penalty (``weight_decay``) applies to weights, not biases.
    """

    def __init__(self, configs: list[HeadConfig], *, epochs: int = DEFAULT_EPOCHS,
                 batch_size: int = DEFAULT_BATCH_SIZE, sampler: str = "shuffle", seed: int = 0,
                 device: str = "cpu"):
        self.configs = configs
        self.epochs = epochs
        self.batch_size = batch_size
        self.sampler = sampler
        self.seed = seed
        self.device = device

    def _groups(self) -> list[str]:
        norms = list(dict.fromkeys(c.norm for c in self.configs))
        sizes = {n: sum(c.norm == n for c in self.configs) for n in norms}
        if len(set(sizes.values())) != 1:
            raise ValueError("every normalization needs the same number of heads")
        return norms

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> "LinearHeadSweep":
        """Train every head; on CPU with torch threads chosen for this problem and the free cores.

        The count is chosen again before each epoch, so a neighbour that starts
        mid-fit costs one epoch at most; ``threads_`` lists the choices. The
        caller's own count is restored afterwards.
        """
        import torch

        self.threads_ = []
        if torch.device(self.device).type != "cpu":
            return self._train(X, y, n_classes)
        batch = min(self.batch_size, len(X))
        macs_per_step = 2 * len(self.configs) * batch * np.shape(X)[1] * n_classes  # forward and gradient
        cores = cpu_cores()
        with kept_torch_threads() as limit:
            # A fit too small to split (one head, say) needs no look at the load.
            splittable = choose_threads(macs_per_step, cores, 0, limit) > 1

            def pick_threads():
                n = choose_threads(macs_per_step, cores, busy_cores() if splittable else 0, limit)
                if n != torch.get_num_threads():
                    torch.set_num_threads(n)
                self.threads_.append(n)

            return self._train(X, y, n_classes, before_epoch=pick_threads)

    def _train(self, X: np.ndarray, y: np.ndarray, n_classes: int, before_epoch=None) -> "LinearHeadSweep":
        """The training loop, laid out (G, ..., K, H): heads last, so the softmax over K runs along rows of H.

        A softmax over a last axis of 2 classes is ~25x slower on CPU than
        over the same values with the heads as the contiguous axis; it was the
        costliest op of a step. The result is stored as (G, D, H, K).
        Multi-label targets ((N, K) floats, NaN unknown) train a sigmoid per
        label with binary cross-entropy over the known entries only.
        """
        import torch

        norms = self._groups()
        self.norms_ = [FeatureNorm(kind).fit(X) for kind in norms]
        self.multilabel_ = np.ndim(y) == 2
        G, K = len(norms), n_classes
        per_group = [[c for c in self.configs if c.norm == kind] for kind in norms]
        H = len(per_group[0])
        dev = torch.device(self.device)
        Xt = torch.as_tensor(np.asarray(X, dtype=np.float32), device=dev)
        N, D = Xt.shape
        lr = self._per_head([[c.lr for c in g] for g in per_group], dev)
        wd = self._per_head([[c.weight_decay for c in g] for g in per_group], dev)
        if self.multilabel_:
            inputs, loss_grad = self._bce(Xt, y, per_group, dev)
        else:
            inputs, loss_grad = self._cross_entropy(Xt, y, K, per_group, dev)
        W = torch.zeros(G, D, K, H, device=dev)
        b = torch.zeros(G, 1, K, H, device=dev)
        mom_W, mom_b = torch.zeros_like(W), torch.zeros_like(b)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        steps_per_epoch = math.ceil(N / self.batch_size)
        total, step = self.epochs * steps_per_epoch, 0
        sample_p = None
        if self.sampler == "balanced":
            yc = torch.as_tensor(np.asarray(y, dtype=np.int64))
            counts = torch.bincount(yc, minlength=K).clamp_min(1).float()
            sample_p = (1.0 / counts)[yc]
        for _ in range(self.epochs):
            if before_epoch is not None:
                before_epoch()
            order = (torch.multinomial(sample_p, N, replacement=True, generator=gen) if sample_p is not None
                     else torch.randperm(N, generator=gen)).to(dev)
            for start in range(0, N, self.batch_size):
                idx = order[start : start + self.batch_size]
                xb = inputs(idx)  # (G, B, D)
                B = len(idx)
                logits = torch.baddbmm(b.view(G, 1, K * H), xb, W.view(G, D, K * H)).view(G, B, K, H)
                grad = loss_grad(logits, idx)
                g_W = (xb.transpose(1, 2) @ grad.view(G, B, K * H)).view(G, D, K, H).addcmul_(wd, W)
                g_b = grad.sum(dim=1, keepdim=True)
                step_lr = lr * (0.5 * (1.0 + math.cos(math.pi * step / total)))
                step += 1
                mom_W.mul_(MOMENTUM).add_(g_W)
                mom_b.mul_(MOMENTUM).add_(g_b)
                # Nesterov: step along the gradient plus the momentum's look-ahead.
                W.addcmul_(step_lr, g_W.add_(mom_W, alpha=MOMENTUM), value=-1.0)
                b.addcmul_(step_lr, g_b.add_(mom_b, alpha=MOMENTUM), value=-1.0)
        self.order_ = [c for g in per_group for c in g]
        self.W_ = W.transpose(2, 3).contiguous().cpu().numpy()  # (G, D, H, K)
        self.b_ = b.transpose(2, 3).contiguous().cpu().numpy()  # (G, 1, H, K)
        return self

    @staticmethod
    def _per_head(values, dev):
        """(G, 1, 1, H) for broadcasting over (G, D, K, H)."""
        import torch

        t = torch.tensor(values, dtype=torch.float32, device=dev)
        return t.view(t.shape[0], 1, 1, t.shape[1])

    def _cross_entropy(self, Xt, y, K, per_group, dev):
        """(inputs(idx), loss_grad(logits, idx)) of softmax cross-entropy, each row weighted by its class."""
        import torch

        yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=dev)
        # Each group's normalized rows, once: a step then gathers one (G, B, D) batch.
        Xn = torch.stack([norm.transform(Xt) for norm in self.norms_])
        cw = torch.tensor(np.stack([[class_weight_vector(np.asarray(y), K, c.class_weight) for c in g]
                                    for g in per_group]), dtype=torch.float32, device=dev)  # (G, H, K)
        row_weight = cw[:, :, yt].transpose(1, 2).contiguous()  # (G, N, H): each row's loss weight per head
        target = torch.eye(K, device=dev)[yt]  # (N, K)

        def loss_grad(logits, idx):
            B = len(idx)
            grad = logits.softmax(dim=2).sub_(target[idx].view(1, B, K, 1))
            weights = row_weight[:, idx].unsqueeze(2)  # (G, B, 1, H)
            return grad.mul_(weights / weights.sum(dim=1, keepdim=True))

        return (lambda idx: Xn[:, idx]), loss_grad

    def _bce(self, Xt, y, per_group, dev):
        """(inputs(idx), loss_grad(logits, idx)) of binary cross-entropy per label over its known targets.

        Each label's loss is the weighted mean over the batch rows where it is
        known, positives weighted by :func:`positive_weight_vector` under
        ``balanced``. Rows are normalized per batch: multi-label sets are the
        large ones, where a normalized copy per group would double the memory.
        """
        import torch

        targets = np.asarray(y, dtype=np.float32)
        known = torch.as_tensor(~np.isnan(targets), dtype=torch.float32, device=dev)  # (N, L)
        target = torch.as_tensor(np.nan_to_num(targets, nan=0.0), device=dev)  # (N, L)
        pos_weight = torch.tensor(np.stack([[positive_weight_vector(targets, c.class_weight) for c in g]
                                            for g in per_group]), dtype=torch.float32, device=dev)  # (G, H, L)
        extra = (pos_weight - 1.0).transpose(1, 2).unsqueeze(1)  # (G, 1, L, H): a positive's weight above 1

        def inputs(idx):
            xb = Xt[idx]
            return torch.stack([norm.transform(xb) for norm in self.norms_])

        def loss_grad(logits, idx):
            t, m = target[idx].unsqueeze(-1), known[idx].unsqueeze(-1)  # (B, L, 1)
            weights = m * (1.0 + t * extra)  # (G, B, L, H)
            return logits.sigmoid_().sub_(t).mul_(weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12))

        return inputs, loss_grad

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(heads, N, K) probabilities, heads in ``self.order_``."""
        out = []
        for g, norm in enumerate(self.norms_):
            z = np.einsum("nd,dhk->hnk", norm.transform(np.asarray(X, dtype=np.float32)), self.W_[g])
            out.append(probabilities(z + self.b_[g][0][:, None, :], self.multilabel_))
        return np.concatenate(out)

    def export(self, config: HeadConfig) -> "SweepHead":
        """The head of ``config`` alone: its normalization and its slice of the weights."""
        i = self.order_.index(config)
        H = self.W_.shape[2]
        g, h = divmod(i, H)
        head = SweepHead(config, epochs=self.epochs, batch_size=self.batch_size, sampler=self.sampler,
                         seed=self.seed, device=self.device)
        head.norm, head.weight, head.bias = self.norms_[g], self.W_[g][:, h, :].copy(), self.b_[g][0, h, :].copy()
        head.multilabel = self.multilabel_
        return head


def config_dict(config: HeadConfig) -> dict:
    return {"name": config.name, **asdict(config)}


def regularization_order(config: HeadConfig) -> tuple:
    """Larger sorts as more regularized: weight decay first, then a smaller learning rate."""
    return (config.weight_decay, -config.lr)


@register
class SweepHead(LinearHead, Head):
    """One linear head trained by minibatch SGD with one :class:`HeadConfig`, as each head of a sweep is.

    ``fit`` trains ``config`` alone; ``candidates`` trains fit-head's whole grid
    at once (:class:`LinearHeadSweep`) and exports each head as a SweepHead.
    """

    kind = "sweep"
    help = "dozens of linear heads trained at once (lr x weight decay x class weight x normalization)"
    uses_device = True
    takes_multilabel = True
    config = None  # a head loaded from head.pt: its config is in head.pt's own config

    def __init__(self, config: HeadConfig | None = None, *, epochs: int = DEFAULT_EPOCHS,
                 batch_size: int = DEFAULT_BATCH_SIZE, sampler: str = "shuffle", seed: int = 0, device: str = "cpu"):
        super().__init__()
        self.config = config
        self.epochs = epochs
        self.batch_size = batch_size
        self.sampler = sampler
        self.seed = seed
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> "SweepHead":
        if self.config is None:
            raise ValueError("a SweepHead trains one HeadConfig; give one (candidates trains a grid)")
        trained = LinearHeadSweep([self.config], epochs=self.epochs, batch_size=self.batch_size,
                                  sampler=self.sampler, seed=self.seed, device=self.device).fit(X, y, n_classes)
        fitted = trained.export(self.config)
        self.norm, self.weight, self.bias, self.multilabel = fitted.norm, fitted.weight, fitted.bias, fitted.multilabel
        return self

    @classmethod
    def candidates(cls, train, val, n_classes, score, settings: HeadSettings):
        X, y = train
        Xv, yv = val
        epochs = DEFAULT_EPOCHS if settings.epochs is None else settings.epochs
        grid = sweep_grid(DEFAULT_LRS if settings.lrs is None else settings.lrs,
                          DEFAULT_WEIGHT_DECAYS if settings.weight_decays is None else settings.weight_decays,
                          CLASS_WEIGHTS if settings.class_weight is None else (settings.class_weight,),
                          NORMALIZATIONS if settings.norms is None else settings.norms)
        sweep = LinearHeadSweep(grid, epochs=epochs, sampler=settings.sampler, seed=settings.seed,
                                device=settings.device).fit(X, y, n_classes)
        val_probs = sweep.predict_proba(Xv)
        out = []
        for config, probs in zip(sweep.order_, val_probs):
            params = config_dict(config)
            name = params.pop("name")
            out.append({
                "name": name,
                "params": {**params, "epochs": epochs, "sampler": settings.sampler},
                "val_auroc": score(yv, probs),
                "rank": regularization_order(config),
                "export": (lambda c=config: sweep.export(c)),
            })
        return out
