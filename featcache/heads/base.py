"""The head contract, the pieces every head kind shares, and the registry of kinds.

A head kind is a :class:`Head` subclass registered with :func:`register`.
Its ``kind`` is its ``--heads`` name and what ``head.pt`` records; its
``candidates`` fits the heads fit-head chooses among on validation; its
``from_state_dict`` loads a saved head for ``featcache predict``.
:data:`HEADS` maps each name to its class: the CLI's ``--heads`` choices and
help, fit-head and predict all read it, so a new kind is one module in
featcache/heads/ that registers its class (imported by the package's
``__init__``).

Shared here: :class:`FeatureNorm` (normalization with train statistics),
:class:`LinearHead` (normalize, one affine map, softmax: what the linear
kinds export and store; a sigmoid per label for multi-label sets),
:func:`class_weight_vector` and :func:`positive_weight_vector`.

Multi-label targets are (N, L) floats, 1.0 / 0.0 / NaN where the label is
unknown under the fit's policy (:func:`featcache.data.labels.apply_policy`);
a kind that trains on them says so with ``takes_multilabel = True``.

This module imports no head kind; the kinds import it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, TypedDict

import numpy as np

from featcache.errors import UserError

CLASS_WEIGHTS = ("none", "balanced")
NORMALIZATIONS = ("standard", "l2")
SAMPLERS = ("shuffle", "balanced")
# A feature that never varies on train (a dead ReLU channel) keeps scale 1.
MIN_SCALE = 1e-6
FIT_BLOCK_ROWS = 8192


def class_weight_vector(y: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights: ones, or ``N / (K * count)`` as scikit-learn's 'balanced'."""
    if mode == "none":
        return np.ones(n_classes)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return len(y) / (n_classes * np.maximum(counts, 1.0))


def positive_weight_vector(targets: np.ndarray, mode: str) -> np.ndarray:
    """Per-label weights of positive targets: ones, or ``negatives / positives`` among the known ones
    (torch's ``pos_weight``), so each label's positives weigh as much as its negatives."""
    targets = np.asarray(targets, dtype=np.float64)
    if mode == "none":
        return np.ones(targets.shape[1])
    positives = np.nansum(targets, axis=0)
    negatives = np.sum(targets == 0.0, axis=0)
    return np.where(positives > 0, negatives / np.maximum(positives, 1.0), 1.0)


def _l2_rows(X):
    norms = np.linalg.norm(X, axis=1, keepdims=True) if isinstance(X, np.ndarray) else X.norm(dim=1, keepdim=True)
    return X / (norms + 1e-12)


class FeatureNorm:
    """``standard``: z-score with train statistics; ``l2``: unit-length rows, then z-score."""

    def __init__(self, kind: str = "standard"):
        self.kind = kind

    def fit(self, X: np.ndarray) -> "FeatureNorm":
        """Mean and standard deviation per feature, in float64 over blocks of rows (two passes, so no
        cancellation): a float64 copy of a 100,000-row matrix would need twice its memory again."""
        X = np.asarray(X)
        n = max(len(X), 1)
        total = np.zeros(X.shape[1])
        for block in self._blocks(X):
            total += block.sum(axis=0)
        self.mean_ = total / n
        squares = np.zeros(X.shape[1])
        for block in self._blocks(X):
            squares += np.square(block - self.mean_).sum(axis=0)
        std = np.sqrt(squares / n)
        self.scale_ = np.where(std > MIN_SCALE, std, 1.0)
        return self

    def _blocks(self, X: np.ndarray):
        for lo in range(0, len(X), FIT_BLOCK_ROWS):
            yield self._pre(X[lo : lo + FIT_BLOCK_ROWS].astype(np.float64))

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


class Candidate(TypedDict):
    """One head a kind fitted for fit-head to choose among (on validation only)."""

    name: str  # unique within one fit, e.g. "logistic_C_0.1_cw_none"
    params: dict  # its settings, as metrics.json lists them under "heads" and "selected"
    val_auroc: float  # the validation score fit-head chooses by
    rank: tuple  # larger sorts as more regularized; breaks ties in val_auroc
    export: Callable[[], "Head"]  # the fitted head as head.pt stores it, built for the chosen one only


@dataclass(frozen=True)
class HeadSettings:
    """What fit-head passes a kind's ``candidates``: the flags that shape heads (their defaults are
    :class:`featcache.options.HeadOptions`'s); each kind reads the ones it uses, None meaning its own."""

    C: float | None = None
    class_weight: str | None = None
    sampler: str = "shuffle"
    epochs: int | None = None
    lrs: tuple | None = None
    weight_decays: tuple | None = None
    norms: tuple | None = None
    device: str = "cpu"
    seed: int = 0
    cache: str | None = None  # the cache train comes from, for kinds that keep train rows by reference (knn)
    policy: tuple | None = None  # multi-label sets: (uncertain, unmentioned), for kinds that reread labels (knn)


class Head(ABC):
    """What a head kind is: the class names the kind, an instance is one head of it.

    ``state_dict`` holds plain tensors and strings (``kind`` among them), so
    head.pt loads with ``torch.load(..., weights_only=True)``, and
    ``from_state_dict`` of the same class gives back a head that predicts as
    the saved one did.
    """

    kind: ClassVar[str] = ""  # the --heads name; head.pt records it
    help: ClassVar[str] = ""  # its words in --heads help
    uses_device: ClassVar[bool] = False  # trains on --device (else on the CPU)
    takes_multilabel: ClassVar[bool] = False  # also trains on (N, L) multi-label targets
    # reads its train labels back from the cache when loaded, so it cannot be fitted on labels joined from
    # another source (fit-head --labels)
    rereads_cache_labels: ClassVar[bool] = False

    @abstractmethod
    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> "Head":
        """Train on (X, y), labels in ``range(n_classes)``, or (N, n_classes) multi-label targets."""

    @abstractmethod
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities (each label's own, for multi-label targets)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Plain tensors and strings, ``kind`` included."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: dict) -> "Head":
        """The head saved by :meth:`state_dict`."""

    @abstractmethod
    def n_parameters(self) -> int:
        """Trainable parameters (run.json reports them)."""

    @classmethod
    @abstractmethod
    def candidates(cls, train: tuple, val: tuple, n_classes: int, score: Callable, settings: HeadSettings
                   ) -> list[Candidate]:
        """Fit this kind's heads on ``train`` (X, y) and score each on ``val`` (X, y) with ``score(y, probs)``.

        Nothing but train and val is given: the test split never steers a choice.
        """


class LinearHead:
    """Normalize, one affine map, softmax (or a sigmoid per label): the fitted form of the linear kinds,
    whatever trained it.

    A linear kind subclasses it with :class:`Head` (``class K(LinearHead, Head)``)
    and adds how to fit; the map, its state dict and its loading are shared.
    Used alone it is the map without a kind, as a head.pt of unknown kind loads.
    """

    kind: ClassVar[str] = "linear"

    def __init__(self, norm: FeatureNorm | None = None, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None, multilabel: bool = False):
        self.norm = norm
        self.weight = weight  # (D, K)
        self.bias = bias  # (K,)
        self.multilabel = multilabel  # a sigmoid per column instead of a softmax over them

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.norm.transform(np.asarray(X, dtype=np.float32)) @ self.weight + self.bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return probabilities(self.logits(X).astype(np.float64), self.multilabel)

    def n_parameters(self) -> int:
        return int(self.weight.size + self.bias.size)

    def state_dict(self) -> dict:
        """Plain tensors and strings, loadable with ``torch.load(..., weights_only=True)``."""
        import torch

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

        state = {"kind": self.kind, "norm": self.norm.kind, "mean": t(self.norm.mean_),
                 "scale": t(self.norm.scale_), "weight": t(self.weight), "bias": t(self.bias)}
        return {**state, "task": "multilabel"} if self.multilabel else state

    @classmethod
    def from_state_dict(cls, state: dict):
        """The map alone, as ``cls``: a loaded head predicts; how it was trained is in head.pt's config."""
        norm = FeatureNorm(state["norm"])
        norm.mean_ = state["mean"].double().numpy()
        norm.scale_ = state["scale"].double().numpy()
        head = cls.__new__(cls)
        LinearHead.__init__(head, norm, state["weight"].numpy(), state["bias"].numpy(),
                            multilabel=state.get("task") == "multilabel")
        return head


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow warnings for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def probabilities(z: np.ndarray, multilabel: bool) -> np.ndarray:
    """Logits (..., K) to probabilities: a sigmoid per column for multi-label heads, else a softmax over the
    last axis (shifted by its maximum, so no exp overflows)."""
    if multilabel:
        return sigmoid(z)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


HEADS: dict[str, type[Head]] = {}


def register(cls: type[Head]) -> type[Head]:
    """Class decorator: ``cls`` becomes the ``--heads`` choice ``cls.kind``."""
    if not (isinstance(cls, type) and issubclass(cls, Head)) or not cls.kind:
        raise TypeError(f"{cls!r} is not a Head subclass with a kind")
    known = HEADS.get(cls.kind)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"head kind {cls.kind!r} is registered twice: {known.__module__}, {cls.__module__}")
    HEADS[cls.kind] = cls
    return cls


def resolve_head_options(heads: str, class_weight: str | None, sampler: str) -> type[Head]:
    """The kind named ``heads``, once the flags every kind shares are checked."""
    if heads not in HEADS:
        raise UserError(f"unknown head {heads!r}; choose one of: {', '.join(HEADS)}")
    if class_weight is not None and class_weight not in CLASS_WEIGHTS:
        raise UserError(f"--class-weight takes {' or '.join(CLASS_WEIGHTS)}, got {class_weight!r}")
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler takes {' or '.join(SAMPLERS)}, got {sampler!r}")
    return HEADS[heads]


def load_head(state: dict, kind: str | None = None):
    """A saved head back: as the kind its state records, else as ``kind`` (head.pt files written
    before kinds were recorded name theirs in their config), else as a bare :class:`LinearHead`."""
    kind = state.get("kind") or kind
    if kind is None or kind == LinearHead.kind:
        return LinearHead.from_state_dict(state)
    if kind not in HEADS:
        raise UserError(f"the head is of kind {kind!r}, which this featcache does not know "
                        f"(it knows: {', '.join(HEADS)})")
    return HEADS[kind].from_state_dict(state)
