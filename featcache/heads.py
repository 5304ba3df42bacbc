"""Heads trained on cached features; every choice is made on validation only.

Two ways to fit:

- ``logistic``: scikit-learn's L2 logistic regression on standardized
  features, C chosen from a small grid;
- ``sweep``: many linear heads trained at once in torch (DINOv2's linear
  evaluation, on a cache): one weight tensor of shape (groups, D, heads, C),
  each minibatch step one batched product for every head, over a grid of
  learning rate x weight decay x class weighting x feature normalization.

Either way the chosen head is exported as a :class:`LinearHead` (normalize,
then one affine map and a softmax), which is what ``head.pt`` stores and
``featcache predict`` applies.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from featcache.errors import UserError

DEFAULT_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
CLASS_WEIGHTS = ("none", "balanced")
NORMALIZATIONS = ("standard", "l2")
HEAD_KINDS = ("logistic", "sweep")
SAMPLERS = ("shuffle", "balanced")
DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3)
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_EPOCHS = 20
DEFAULT_BATCH_SIZE = 256
MOMENTUM = 0.9
# A feature that never varies on train (a dead ReLU channel) keeps scale 1.
MIN_SCALE = 1e-6


def class_weight_vector(y: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights: ones, or ``N / (K * count)`` as scikit-learn's 'balanced'."""
    if mode == "none":
        return np.ones(n_classes)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return len(y) / (n_classes * np.maximum(counts, 1.0))


def _l2_rows(X):
    norms = np.linalg.norm(X, axis=1, keepdims=True) if isinstance(X, np.ndarray) else X.norm(dim=1, keepdim=True)
    return X / (norms + 1e-12)


class FeatureNorm:
    """``standard``: z-score with train statistics; ``l2``: unit-length rows, then z-score."""

    def __init__(self, kind: str = "standard"):
        self.kind = kind

    def fit(self, X: np.ndarray) -> "FeatureNorm":
        X = self._pre(np.asarray(X, dtype=np.float64))
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.where(std > MIN_SCALE, std, 1.0)
        return self

    def _pre(self, X):
        return _l2_rows(X) if self.kind == "l2" else X

    def transform(self, X):
        """numpy in, numpy out; a torch tensor in, a tensor out (on its device)."""
        if isinstance(X, np.ndarray):
            return ((self._pre(X) - self.mean_) / self.scale_).astype(np.float32)
        import torch

        mean = torch.as_tensor(self.mean_, dtype=X.dtype, device=X.device)
        scale = torch.as_tensor(self.scale_, dtype=X.dtype, device=X.device)
        return (self._pre(X) - mean) / scale


@dataclass
class LinearHead:
    """What a fitted head is, whatever trained it: normalize, affine map, softmax."""

    norm: FeatureNorm
    weight: np.ndarray  # (D, K)
    bias: np.ndarray  # (K,)

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.norm.transform(np.asarray(X, dtype=np.float32)) @ self.weight + self.bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.logits(X).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def state_dict(self) -> dict:
        """Plain tensors and strings, loadable with ``torch.load(..., weights_only=True)``."""
        import torch

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

        return {"norm": self.norm.kind, "mean": t(self.norm.mean_), "scale": t(self.norm.scale_),
                "weight": t(self.weight), "bias": t(self.bias)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LinearHead":
        norm = FeatureNorm(state["norm"])
        norm.mean_ = state["mean"].double().numpy()
        norm.scale_ = state["scale"].double().numpy()
        return cls(norm, state["weight"].numpy(), state["bias"].numpy())


class LogisticHead:
    """Standardize with train statistics, then scikit-learn's L2 logistic regression."""

    def __init__(self, C: float = 1.0, class_weight: str = "none", max_iter: int = 200):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LogisticHead":
        from sklearn.linear_model import LogisticRegression

        self.norm_ = FeatureNorm("standard").fit(X)
        self.model_ = LogisticRegression(
            C=self.C,
            class_weight="balanced" if self.class_weight == "balanced" else None,
            max_iter=self.max_iter,
            # Newton steps with a D x D Cholesky: a handful of iterations on
            # cache-sized problems (D <= 4096), and tighter optima than lbfgs.
            solver="newton-cholesky",
        ).fit(self.norm_.transform(X), y)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(self.norm_.transform(X))

    def export(self, n_classes: int) -> LinearHead:
        coef, intercept = self.model_.coef_, self.model_.intercept_
        if coef.shape[0] == 1:  # binary: softmax([0, z]) is sigmoid(z)
            weight = np.stack([np.zeros(coef.shape[1]), coef[0]], axis=1)
            bias = np.array([0.0, intercept[0]])
        else:
            weight, bias = coef.T, intercept
        full_w = np.zeros((coef.shape[1], n_classes))
        full_b = np.full(n_classes, -1e9)  # a class absent from train is never predicted
        full_w[:, self.model_.classes_] = weight
        full_b[self.model_.classes_] = bias
        return LinearHead(self.norm_, full_w.astype(np.float32), full_b.astype(np.float32))


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
        import torch

        norms = self._groups()
        self.norms_ = [FeatureNorm(kind).fit(X) for kind in norms]
        G, K = len(norms), n_classes
        per_group = [[c for c in self.configs if c.norm == kind] for kind in norms]
        H = len(per_group[0])
        dev = torch.device(self.device)
        Xt = torch.as_tensor(np.asarray(X, dtype=np.float32), device=dev)
        yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=dev)
        N, D = Xt.shape

        def per_head(values):  # (G, 1, H, 1) for broadcasting over (G, D, H, K)
            return torch.tensor(values, dtype=torch.float32, device=dev).view(G, 1, H, 1)

        lr = per_head([[c.lr for c in g] for g in per_group])
        wd = per_head([[c.weight_decay for c in g] for g in per_group])
        cw = torch.tensor(np.stack([[class_weight_vector(np.asarray(y), K, c.class_weight) for c in g]
                                    for g in per_group]), dtype=torch.float32, device=dev)  # (G, H, K)
        W = torch.zeros(G, D, H, K, device=dev)
        b = torch.zeros(G, 1, H, K, device=dev)
        mom_W, mom_b = torch.zeros_like(W), torch.zeros_like(b)
        onehot = torch.eye(K, device=dev)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        steps_per_epoch = math.ceil(N / self.batch_size)
        total, step = self.epochs * steps_per_epoch, 0
        sample_p = None
        if self.sampler == "balanced":
            counts = torch.bincount(yt.cpu(), minlength=K).clamp_min(1).float()
            sample_p = (1.0 / counts)[yt.cpu()]
        for _ in range(self.epochs):
            order = (torch.multinomial(sample_p, N, replacement=True, generator=gen) if sample_p is not None
                     else torch.randperm(N, generator=gen)).to(dev)
            for start in range(0, N, self.batch_size):
                idx = order[start : start + self.batch_size]
                xb = torch.stack([norm.transform(Xt[idx]) for norm in self.norms_])  # (G, B, D)
                yb = yt[idx]
                B = len(idx)
                logits = (xb @ W.view(G, D, H * K)).view(G, B, H, K) + b
                grad = logits.softmax(-1) - onehot[yb].view(1, B, 1, K)
                weights = cw[:, :, yb].permute(0, 2, 1).unsqueeze(-1)  # (G, B, H, 1)
                grad *= weights / weights.sum(dim=1, keepdim=True)
                g_W = (xb.transpose(1, 2) @ grad.view(G, B, H * K)).view(G, D, H, K) + wd * W
                g_b = grad.sum(dim=1, keepdim=True)
                step_lr = lr * (0.5 * (1.0 + math.cos(math.pi * step / total)))
                step += 1
                mom_W.mul_(MOMENTUM).add_(g_W)
                mom_b.mul_(MOMENTUM).add_(g_b)
                W.sub_(step_lr * (g_W + MOMENTUM * mom_W))
                b.sub_(step_lr * (g_b + MOMENTUM * mom_b))
        self.order_ = [c for g in per_group for c in g]
        self.W_, self.b_ = W.cpu().numpy(), b.cpu().numpy()
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(heads, N, K) probabilities, heads in ``self.order_``."""
        out = []
        for g, norm in enumerate(self.norms_):
            z = np.einsum("nd,dhk->hnk", norm.transform(np.asarray(X, dtype=np.float32)), self.W_[g])
            z = z + self.b_[g][0][:, None, :]
            z = z - z.max(axis=-1, keepdims=True)
            e = np.exp(z)
            out.append(e / e.sum(axis=-1, keepdims=True))
        return np.concatenate(out)

    def export(self, config: HeadConfig) -> LinearHead:
        i = self.order_.index(config)
        H = self.W_.shape[2]
        g, h = divmod(i, H)
        return LinearHead(self.norms_[g], self.W_[g][:, h, :].copy(), self.b_[g][0, h, :].copy())


def config_dict(config: HeadConfig) -> dict:
    return {"name": config.name, **asdict(config)}


def regularization_order(config: HeadConfig) -> tuple:
    """Larger sorts as more regularized: weight decay first, then a smaller learning rate."""
    return (config.weight_decay, -config.lr)


def resolve_head_options(heads: str, class_weight: str | None, sampler: str) -> None:
    if heads not in HEAD_KINDS:
        raise UserError(f"unknown head {heads!r}; choose one of: {', '.join(HEAD_KINDS)}")
    if class_weight is not None and class_weight not in CLASS_WEIGHTS:
        raise UserError(f"--class-weight takes {' or '.join(CLASS_WEIGHTS)}, got {class_weight!r}")
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler takes {' or '.join(SAMPLERS)}, got {sampler!r}")
