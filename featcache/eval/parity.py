"""Parity criteria between two decodes (or two precisions) of the same images.

"Mean cosine similarity >= 0.99" does not tell a correct decode from a wrong
one: with a random-init backbone (and, less extremely, with any backbone
whose features share a large common component) the features of two
*different* X-rays already have cosine 0.993-0.995, because every feature
vector is dominated by the same mean direction. A check that a swapped,
shifted or mis-ordered set of rows also passes proves nothing. The criteria
below each compare the difference between the two sides *for the same image*
with the difference between *different images*, or bound it in absolute
pixel units, so a mismatch fails them:

(a) :func:`crop_difference` - decoded uint8 crops differ by at most
    :data:`MAX_MEAN_GREY_LEVELS` grey levels on average;
(b) :func:`nearest_same_fraction` - the nearest row (cosine) of the other
    side is the same image for at least :data:`MIN_NEAREST_SAME` of the rows;
(c) :func:`distance_ratio` - the mean distance between the two sides'
    features of the same image is at most :data:`MAX_DISTANCE_RATIO` of the
    median distance between features of different images.

Plain numpy; rows of the two arrays are the same images in the same order.
A data set may hold the same picture under two file names (the Kermany set
has 30 groups of byte-identical files, 62 of its 5,840 images): ``same``, one
group id per row (:func:`duplicate_groups`), makes (b) and (c) treat such rows
as one image instead of as rivals that tie with it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

MAX_MEAN_GREY_LEVELS = 2.0  # (a) mean |a - b| over all pixels of all crops, in uint8 grey levels
MIN_NEAREST_SAME = 0.995  # (b) fraction of rows whose nearest other-side row is the same image
MAX_DISTANCE_RATIO = 0.05  # (c) mean same-image distance / median different-image distance
DEFAULT_CHUNK = 2048  # (b) rows of the similarity matrix built at a time
DEFAULT_MAX_PAIRS = 200_000  # (c) different-image pairs sampled when N(N-1)/2 is larger


def crop_difference(a, b) -> dict:
    """Mean absolute grey-level difference between two stacks of uint8 crops.

    ``a`` and ``b``: arrays (or tensors) of the same shape, first axis the
    image, e.g. (N, 3, 224, 224). Returns ``per_image`` (N means), ``mean``
    (over every pixel of every image, the criterion) and ``max_image`` (the
    worst image).

    Why it discriminates: it is measured in absolute pixel units, not
    relative to anything the backbone does. Two resize implementations of
    the same image differ by a grey level or less (rounding, filter taps);
    a different image, a shifted or mirrored crop, a wrongly converted one
    (CMYK, 16-bit, RGBA) differs by tens. A backbone can map very different
    inputs to near-identical features; pixels cannot hide it.
    """
    a, b = _numpy(a), _numpy(b)
    if a.shape != b.shape:
        raise ValueError(f"crop stacks differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 2 or len(a) == 0:
        raise ValueError(f"expected a non-empty stack of images, got shape {a.shape}")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).reshape(len(a), -1)
    per_image = diff.mean(axis=1, dtype=np.float64)
    return {"per_image": per_image, "mean": float(per_image.mean()), "max_image": float(per_image.max())}


def nearest_same_fraction(a, b, *, same=None, chunk: int = DEFAULT_CHUNK) -> dict:
    """Fraction of rows whose nearest row (cosine) on the other side is the same image, both directions.

    ``a_to_b``: rows i of ``a`` whose most similar row of ``b`` is row i;
    ``b_to_a``: the same from ``b`` to ``a``; ``fraction`` = the smaller of
    the two (the criterion). Row i counts only when its own image is
    *strictly* more similar than every other image, so ties (identical
    feature rows, e.g. a constant output) are misses. ``same``: a group id
    per row, rows of one group showing the same picture (duplicate files);
    then "its own image" is any row of its group. The similarity matrix is
    built ``chunk`` rows at a time (chunk x N floats), never N x N.

    Why it discriminates: it ranks the same image against *every other image
    in the set* instead of comparing a similarity with a fixed threshold.
    However close all features are to each other (cosine 0.99 between
    different X-rays), a decode that preserves the image keeps its own
    partner nearest; rows paired with the wrong image, or features so
    perturbed that they are no closer to their own image than to others,
    fail it. It needs N >= 2 and gets stricter as N grows (more rivals).
    """
    a, b = _pair(a, b)
    if len(a) < 2:
        raise ValueError("nearest_same_fraction needs at least two rows")
    groups = _groups(same, len(a))
    an, bn = _unit(a), _unit(b)
    a_to_b = float(np.mean(_own_is_nearest(an, bn, groups, chunk)))
    b_to_a = float(np.mean(_own_is_nearest(bn, an, groups, chunk)))
    return {"a_to_b": a_to_b, "b_to_a": b_to_a, "fraction": min(a_to_b, b_to_a)}


def distance_ratio(a, b, *, same=None, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0) -> dict:
    """Mean ||a_i - b_i|| over the median ||a_i - a_j|| (i, j different images), in the raw feature space.

    ``same_mean``: mean Euclidean distance between the two sides' features of
    the same image; ``different_median``: median distance between features of
    different images of ``a`` (every pair when N(N-1)/2 <= ``max_pairs``,
    else ``max_pairs`` pairs drawn with ``seed``; pairs within one ``same``
    group - duplicate files - left out); ``ratio``: their quotient (the
    criterion).

    Why it discriminates: it sets the disagreement for one image against the
    natural spread between images *on the scale the features actually vary
    on*. Cosine is dominated by the common mean direction (random-init
    features of two X-rays: cosine 0.993-0.995), so a small angle can still
    be as large as the gap between two different images; the ratio is ~1
    when rows are mismatched and ~0 when both sides see the same image,
    whatever the backbone's scale or offset. It is relative to the set: on
    images much alike (synthetic X-rays from one generator) the same
    absolute disagreement is a larger ratio.
    """
    a, b = _pair(a, b)
    n = len(a)
    if n < 2:
        raise ValueError("distance_ratio needs at least two rows")
    same_rows = np.linalg.norm(a - b, axis=1)
    i, j, sampled = _pairs(n, max_pairs, seed, _groups(same, n))
    different = np.empty(len(i))
    for s in range(0, len(i), 65536):  # bounded memory: 65536 x dim at a time
        different[s:s + 65536] = np.linalg.norm(a[i[s:s + 65536]] - a[j[s:s + 65536]], axis=1)
    median = float(np.median(different))
    same_mean = float(same_rows.mean())
    ratio = same_mean / median if median > 0 else (0.0 if same_mean == 0 else float("inf"))
    return {"same_mean": same_mean, "different_median": median, "ratio": ratio, "pairs": int(len(i)),
            "sampled": sampled}


def mean_cosine(a, b) -> float:
    """Mean cosine similarity of row i of ``a`` with row i of ``b``: the old, non-discriminating check.

    Kept only to report beside the criteria (and to show in the tests that
    it passes for mismatched rows); never use it as a parity test.
    """
    a, b = _pair(a, b)
    return float(np.mean(np.sum(_unit(a) * _unit(b), axis=1)))


def different_image_cosine(a, *, same=None, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0) -> float:
    """Median cosine similarity between features of *different* images of ``a`` (pairs as in
    :func:`distance_ratio`): how high "mean cosine" already is for rows that do not match."""
    a = _unit(_rows(a))
    i, j, _ = _pairs(len(a), max_pairs, seed, _groups(same, len(a)))
    cos = np.concatenate([np.sum(a[i[s:s + 65536]] * a[j[s:s + 65536]], axis=1) for s in range(0, len(i), 65536)])
    return float(np.median(cos))


def duplicate_groups(paths, root: str | os.PathLike | None = None) -> np.ndarray:
    """One group id per file, equal for byte-identical files (the same picture under two names)."""
    ids: dict[bytes, int] = {}
    out = np.empty(len(paths), dtype=np.int64)
    for k, path in enumerate(paths):
        with open(os.path.join(root, path) if root is not None else path, "rb") as f:
            digest = hashlib.sha256(f.read()).digest()
        out[k] = ids.setdefault(digest, len(ids))
    return out


def parity(a_features, b_features, a_crops=None, b_crops=None, *, crop_per_image=None, same=None,
           chunk: int = DEFAULT_CHUNK, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0) -> dict:
    """All criteria for one pairing, each with its threshold and pass/fail; ``passed`` is all of them.

    Criterion (a) needs the crops (``a_crops``/``b_crops``, or their per-image
    mean absolute differences already computed, ``crop_per_image``, as a
    streaming caller does); without them (e.g. bf16 against fp32 on the same
    decode, where the crops are identical by construction) it is ``None`` and
    not counted. ``same``: duplicate-image groups, see
    :func:`nearest_same_fraction`. ``mean_cosine`` (same image) and
    ``different_cosine_median`` (different images) are reported beside the
    criteria to show why the old "mean cosine >= 0.99" check could not tell
    the two apart.
    """
    a_features, b_features = _pair(a_features, b_features)
    n = len(a_features)
    groups = _groups(same, n)
    out = {"rows": n, "duplicate_rows": int(n - len(np.unique(groups))),
           "mean_cosine": mean_cosine(a_features, b_features),
           "different_cosine_median": different_image_cosine(a_features, same=groups, max_pairs=max_pairs,
                                                             seed=seed)}
    if crop_per_image is None and a_crops is not None and b_crops is not None:
        crop_per_image = crop_difference(a_crops, b_crops)["per_image"]
    if crop_per_image is not None:
        per_image = np.asarray(crop_per_image, dtype=np.float64).reshape(-1)
        if len(per_image) != n:
            raise ValueError(f"{len(per_image)} crop differences for {n} feature rows")
        mean = float(per_image.mean())
        out["crop_difference"] = {"mean": mean, "max_image": float(per_image.max()),
                                  "threshold": MAX_MEAN_GREY_LEVELS, "passed": mean <= MAX_MEAN_GREY_LEVELS}
    else:
        out["crop_difference"] = None
    nearest = nearest_same_fraction(a_features, b_features, same=groups, chunk=chunk)
    out["nearest_same"] = {**nearest, "threshold": MIN_NEAREST_SAME,
                           "passed": nearest["fraction"] >= MIN_NEAREST_SAME}
    dist = distance_ratio(a_features, b_features, same=groups, max_pairs=max_pairs, seed=seed)
    out["distance_ratio"] = {**dist, "threshold": MAX_DISTANCE_RATIO, "passed": dist["ratio"] <= MAX_DISTANCE_RATIO}
    out["passed"] = all(out[k]["passed"] for k in ("crop_difference", "nearest_same", "distance_ratio")
                        if out[k] is not None)
    return out


def failures(result: dict) -> list[str]:
    """The criteria a :func:`parity` result fails, in words (empty when it passes)."""
    words = []
    crops = result.get("crop_difference")
    if crops is not None and not crops["passed"]:
        words.append(f"(a) crops differ by {crops['mean']:.2f} grey levels on average (> {crops['threshold']})")
    near = result["nearest_same"]
    if not near["passed"]:
        words.append(f"(b) nearest row is the same image for {near['fraction']:.2%} of rows "
                     f"(< {near['threshold']:.1%})")
    dist = result["distance_ratio"]
    if not dist["passed"]:
        words.append(f"(c) same-image distance is {dist['ratio']:.2%} of the different-image median "
                     f"(> {dist['threshold']:.0%})")
    return words


def _groups(same, n: int) -> np.ndarray:
    if same is None:
        return np.arange(n)
    groups = np.asarray(same).reshape(-1)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} duplicate-group ids for {n} rows")
    return groups


def _pairs(n: int, max_pairs: int, seed: int, groups: np.ndarray):
    """(i, j, sampled): pairs of rows of different groups; all pairs i < j when there are at most
    ``max_pairs``, else ``max_pairs`` seeded draws of i != j."""
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        sampled = False
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=max_pairs)
        j = (i + rng.integers(1, n, size=max_pairs)) % n  # uniform over j != i
        sampled = True
    keep = groups[i] != groups[j]
    if not keep.any():
        raise ValueError("no pair of different images")
    return i[keep], j[keep], sampled


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _rows(x) -> np.ndarray:
    x = _numpy(x)
    x = x.reshape(len(x), -1) if x.ndim != 2 else x
    return x.astype(np.float64, copy=False)


def _pair(a, b):
    a, b = _rows(a), _rows(b)
    if a.shape != b.shape:
        raise ValueError(f"feature arrays differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _own_is_nearest(query: np.ndarray, keys: np.ndarray, groups: np.ndarray, chunk: int) -> np.ndarray:
    """For each row i of ``query``: is a row of i's group in ``keys`` strictly more similar than every row
    of another group? (unit rows; a chunk x N similarity block at a time)"""
    chunk = max(1, chunk)
    out = np.empty(len(query), dtype=bool)
    for s in range(0, len(query), chunk):
        sim = query[s:s + chunk] @ keys.T
        mine = groups[s:s + chunk, None] == groups[None, :]
        best_mine = np.where(mine, sim, -np.inf).max(axis=1)
        best_other = np.where(mine, -np.inf, sim).max(axis=1)
        out[s:s + chunk] = best_mine > best_other
    return out
