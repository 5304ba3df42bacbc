"""``--heads knn``: cosine k-nearest-neighbour votes over the train rows, k and temperature chosen on validation.

Rows are L2-normalised, so the inner product is the cosine. A query's votes
are DINO's temperature-weighted ones: neighbour j adds ``exp(sim_j / T)`` to
its class, and the probabilities are the votes divided by their sum. The
class-balanced variant multiplies the votes of class c by ``N / (K * n_c)``
(scikit-learn's 'balanced' weights of the train counts) before that
division, so a class with half the train rows counts twice per neighbour.

The search is exact: queries go in blocks whose similarities to every train
row, at most :data:`BLOCK_BYTES` of float32, are reduced to their top k at
once, so no (queries x train) or (train x train) matrix is ever held.
Neighbours are searched once, at the largest k of the grid; every smaller k
and every temperature is derived from those (a cumulative sum along the
neighbours), so the whole grid costs one search.

Multi-label targets ((N, L), NaN where a label is unknown under the fit's
policy) are averaged per label: a query's probability of label j is the
temperature-weighted mean of its neighbours' targets for j over the
neighbours where j is known (0.5 when none of them knows it). Class weighting
does not apply there: scaling a label's positive votes is a monotone map of
its probability, so it changes no AUROC and no threshold chosen on
validation.

The fitted head keeps its train rows **by reference**: head.pt records the
cache's path, fingerprint and feature checksum (and, for multi-label sets,
the policy that made the targets), and loading it reads the train rows back
from that cache (every view of them, for a cache extracted with
``--aug-views``), refusing one that moved or changed.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from featcache.data.labels import apply_policy
from featcache.errors import UserError
from featcache.heads.base import CLASS_WEIGHTS, Head, HeadSettings, class_weight_vector, register

K_GRID = (1, 2, 5, 10, 20, 50, 100, 200)
# DINO's k-NN evaluation uses T = 0.07; cosines of random-init features sit close together, so the grid
# also reaches down to 0.01, where one neighbour's small lead in similarity still weighs.
TEMPERATURES = (0.01, 0.02, 0.05, 0.07, 0.1, 0.2, 0.5)
# A label none of a query's neighbours knows gets this probability (no vote either way).
UNKNOWN_PROBABILITY = 0.5
# The largest similarity block (queries x train, float32) a search holds at once. Larger blocks were faster
# on 100,000 x 768 train rows (2 cores): 128 MiB took 1.28x as long as 1 GiB, 512 MiB 1.05x.
BLOCK_BYTES = 512 << 20
TRAIN_SPLIT = "train"


def l2_rows(X):
    """Unit-length float32 rows, as a torch tensor."""
    import torch

    X = torch.as_tensor(np.asarray(X, dtype=np.float32))
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


def block_rows(n_train: int, block_bytes: int | None = None) -> int:
    """Queries per similarity block: as many as keep (rows x n_train) float32 within ``block_bytes``
    (default :data:`BLOCK_BYTES`)."""
    return max(1, (block_bytes or BLOCK_BYTES) // (4 * max(1, n_train)))


def similarity_blocks(train, queries, block_bytes: int | None = None):
    """(first query, (rows, n_train) cosines) for consecutive blocks of ``queries``; unit rows in, torch tensors."""
    step = block_rows(len(train), block_bytes)
    for start in range(0, len(queries), step):
        yield start, queries[start : start + step] @ train.T


def nearest(train, queries, k: int, block_bytes: int | None = None):
    """The exact ``k`` nearest train rows of each query by cosine: (similarities, indices), each (Q, k), nearest first.

    ``train`` and ``queries`` are unit rows (:func:`l2_rows`).
    """
    import torch

    k = min(k, len(train))
    sims = torch.empty(len(queries), k)
    index = torch.empty(len(queries), k, dtype=torch.int64)
    for start, block in similarity_blocks(train, queries, block_bytes):
        top = block.topk(k, dim=1)  # sorted, nearest first
        sims[start : start + len(block)] = top.values
        index[start : start + len(block)] = top.indices
    return sims, index


def one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, K) vote targets of single-label rows."""
    return np.eye(n_classes, dtype=np.float32)[np.asarray(y, dtype=np.int64)]


def vote_targets(y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(targets, known): one-hot rows and None for class indices; for (N, L) multi-label targets (NaN
    unknown), the targets with unknowns as 0 and the (N, L) 0/1 mask of the known ones."""
    if np.ndim(y) == 1:
        return one_hot(y, n_classes), None
    y = np.asarray(y, dtype=np.float32)
    known = ~np.isnan(y)
    return np.where(known, y, 0.0).astype(np.float32), known.astype(np.float32)


def vote_probabilities(sims, neighbour_targets: np.ndarray, ks, temperature: float,
                       class_weight: np.ndarray | None, neighbour_known: np.ndarray | None = None):
    """(len(ks), Q, K) probabilities for each k of ``ks`` from neighbours found once at ``max(ks)``.

    ``neighbour_targets`` is (Q, kmax, K): the targets of each query's
    neighbours, nearest first (``targets[index]``, gathered once for every
    temperature). Weights ``exp(sim / T)`` are taken relative to each query's
    nearest neighbour (the ratios, hence the probabilities, are the same,
    and no weight overflows). The cumulative sum along the neighbours holds
    the votes of every k at once. With ``neighbour_known`` (Q, kmax, L), the
    multi-label masks, each label's weights are summed over the neighbours
    that know it: a per-label weighted average of the known targets.
    """
    sims = np.asarray(sims, dtype=np.float32)
    weights = np.exp((sims - sims[:, :1]) / np.float32(temperature))  # (Q, kmax), each in (0, 1]
    votes = np.cumsum(weights[:, :, None] * neighbour_targets, axis=1)  # (Q, kmax, K)
    steps = [min(k, sims.shape[1]) - 1 for k in ks]
    if neighbour_known is not None:
        total = np.cumsum(weights[:, :, None] * neighbour_known, axis=1)[:, steps]
        probs = np.where(total > 0, votes[:, steps] / np.maximum(total, 1e-30), UNKNOWN_PROBABILITY)
        return probs.transpose(1, 0, 2)
    total = np.cumsum(weights, axis=1)[:, :, None]
    probs = votes[:, steps] / total[:, steps]  # (Q, len(ks), K)
    if class_weight is not None:
        probs = probs * class_weight.astype(np.float32)
        probs = probs / probs.sum(axis=2, keepdims=True)  # the nearest neighbour's vote is 1: never 0
    return probs.transpose(1, 0, 2)


def _identity(cache) -> tuple[str, str]:
    """What says a cache is the one a head was fitted on: its fingerprint and its features' SHA-256."""
    return str(cache.attrs.get("fingerprint", "")), str(cache.attrs.get("features_sha256", ""))


@dataclass(frozen=True)
class TrainRows:
    """Where a kNN head's train rows live: a cache's train split, named by path, fingerprint and checksum."""

    cache: str
    fingerprint: str
    features_sha256: str
    n_rows: int
    dim: int

    @classmethod
    def of(cls, cache_path: str, n_rows: int, dim: int) -> "TrainRows":
        from featcache.cache.h5 import FeatureCache

        return cls(str(Path(cache_path).resolve()), *_identity(FeatureCache.open(cache_path)), n_rows, dim)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of the train split, after checking it is the cache the head was fitted on."""
        from featcache.cache.h5 import FeatureCache

        if not Path(self.cache).is_file():
            raise UserError(f"the knn head's train features are in {self.cache}, which is not there now; "
                            "put the cache back there (or refit the head)")
        cache = FeatureCache.open(self.cache)
        now = _identity(cache)
        if now != (self.fingerprint, self.features_sha256):
            what = "fingerprint" if now[0] != self.fingerprint else "feature checksum"
            raise UserError(f"{self.cache} is not the cache the knn head was fitted on (its {what} differs); "
                            "refit the head on it")
        X, y, _ = cache.arrays(TRAIN_SPLIT, views=True)  # as fit-head trains: every view of the train images
        if X.shape != (self.n_rows, self.dim):
            raise UserError(f"{self.cache} holds {X.shape[0]} x {X.shape[1]} train rows, the knn head was fitted "
                            f"on {self.n_rows} x {self.dim}; refit the head")
        return X, y


@register
class KnnHead(Head):
    """Cosine kNN with temperature-weighted votes over train rows kept by reference to their cache."""

    kind = "knn"
    help = "cosine k-nearest-neighbour votes (k x temperature x class weight, exact search)"
    takes_multilabel = True
    rereads_cache_labels = True  # its train rows and their labels are a reference to the cache

    def __init__(self, k: int = 20, temperature: float = 0.07, class_weight: str = "none",
                 source: TrainRows | None = None, policy: tuple[str, str] | None = None):
        self.k = k
        self.temperature = temperature
        self.class_weight = class_weight
        self.source = source
        self.policy = policy  # (uncertain, unmentioned) that made multi-label targets from the cache's labels

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> "KnnHead":
        """Keep the unit train rows and their vote targets (a kNN learns nothing else)."""
        self.train_ = l2_rows(X)
        self.labels_ = np.asarray(y)
        self.targets_, self.known_ = vote_targets(y, n_classes)
        self.weights_ = self._class_weights(self.class_weight)
        return self

    def _class_weights(self, mode: str) -> np.ndarray | None:
        """Per-class vote factors of the train labels, None for plain votes (and for multi-label targets)."""
        if mode == "none" or self.known_ is not None:
            return None
        return class_weight_vector(self.labels_, self.targets_.shape[1], mode)

    def _neighbours(self, X: np.ndarray, k: int):
        """(similarities, targets, known masks or None) of each row's ``k`` nearest train rows."""
        sims, index = nearest(self.train_, l2_rows(X), k)
        index = index.numpy()
        return sims, self.targets_[index], None if self.known_ is None else self.known_[index]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        sims, targets, known = self._neighbours(X, self.k)
        return vote_probabilities(sims, targets, [self.k], self.temperature, self.weights_,
                                  known)[0].astype(np.float64)

    def n_parameters(self) -> int:
        return 0  # nothing trains: the train rows are data, read from the cache

    def state_dict(self) -> dict:
        """The settings and the reference to the train rows (plain numbers and strings); the rows stay in the cache."""
        if self.source is None:
            raise ValueError("a knn head is saved with a reference to its cache; fit it through candidates with "
                             "HeadSettings(cache=...)")
        state = {"kind": self.kind, "k": int(self.k), "temperature": float(self.temperature),
                 "class_weight": self.class_weight, "n_classes": int(self.targets_.shape[1]),
                 **{f"train_{key}": value for key, value in asdict(self.source).items()}}
        if self.known_ is not None:
            state.update(task="multilabel", uncertain=self.policy[0], unmentioned=self.policy[1])
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "KnnHead":
        """The saved head, its train rows read back from the cache (a moved or changed one is refused)."""
        source = TrainRows(**{f.name: state[f"train_{f.name}"] for f in fields(TrainRows)})
        policy = (state["uncertain"], state["unmentioned"]) if state.get("task") == "multilabel" else None
        head = cls(int(state["k"]), float(state["temperature"]), state["class_weight"], source, policy)
        X, y = source.load()
        return head.fit(X, y if policy is None else apply_policy(y, *policy), int(state["n_classes"]))

    @classmethod
    def candidates(cls, train, val, n_classes, score, settings: HeadSettings):
        X, y = train
        Xv, yv = val
        multilabel = np.ndim(y) == 2
        if multilabel and settings.class_weight == "balanced":
            raise UserError("--class-weight balanced does not apply to knn on a multi-label set: scaling a label's "
                            "positive votes changes neither its AUROC nor its threshold; leave it out")
        source = None if settings.cache is None else TrainRows.of(settings.cache, *np.shape(X))
        ks = [k for k in K_GRID if k <= len(X)] or [len(X)]
        class_weights = ("none",) if multilabel else \
            CLASS_WEIGHTS if settings.class_weight is None else (settings.class_weight,)
        # one copy of the unit train rows for every head
        base = cls(source=source, policy=settings.policy if multilabel else None).fit(X, y, n_classes)
        sims, targets, known = base._neighbours(Xv, max(ks))
        out = []
        for cw, temperature in itertools.product(class_weights, TEMPERATURES):
            probs = vote_probabilities(sims, targets, ks, temperature, base._class_weights(cw), known)
            for k, p in zip(ks, probs):
                out.append({
                    "name": f"knn_k_{k}_T_{temperature:g}_cw_{cw}",
                    "params": {"k": k, "temperature": temperature, "class_weight": cw},
                    "val_auroc": score(yv, p),
                    # More neighbours and a higher temperature smooth the votes; unweighted votes are simpler.
                    "rank": (k, temperature, cw == "none"),
                    "export": (lambda k=k, t=temperature, cw=cw: base.with_settings(k, t, cw)),
                })
        return out

    def with_settings(self, k: int, temperature: float, class_weight: str) -> "KnnHead":
        """This fitted head with other settings (the train rows shared, not copied)."""
        head = KnnHead(k, temperature, class_weight, self.source, self.policy)
        head.train_, head.labels_, head.targets_, head.known_ = self.train_, self.labels_, self.targets_, self.known_
        head.weights_ = head._class_weights(class_weight)
        return head
