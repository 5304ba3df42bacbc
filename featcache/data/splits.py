"""Train / val / test: the validation split carved from train, grouped by patient.

A set without a validation split (or, for folders and split columns, one
smaller than ``--min-val``) gets one carved out of train, seeded by
``--split-seed`` alone, with every image of a patient on one side:

- single-label sets: :func:`carve_patients`, about ``fraction`` of each
  class's images;
- multi-label sets: :func:`iterative_stratification` (Sechidis, Tsoumakas and
  Vlahavas, 2011) over patients, about ``fraction`` of every label's
  positives and of all images.

Whether given or carved, no patient may have images in two of train, val and
test: :func:`patients_across_splits` finds one that does, for the sources to
refuse.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from featcache.data.labels import POSITIVE


def assign_validation(splits: list[str], patients: list[str], labels, *, min_val: int, fraction: float, seed: int,
                      scope: bool, source: str = "folder") -> tuple[list[str], list[str], dict]:
    """Final splits and patient ids of every row, and a description of the validation split.

    ``labels`` are class indices (single-label) or an (N, L) array (multi-label).
    With ``scope`` patient ids are prefixed by their split (``train/person12``),
    for ids taken from file names that restart in each split folder; a too-small
    val split is folded into train first and read in train's namespace.
    ``source`` names where an existing val split came from.
    """
    splits, patients = list(splits), list(patients)
    n_val = splits.count("val")
    if "train" not in splits or (n_val and n_val >= min_val):
        if scope:
            patients = [f"{s}/{p}" for s, p in zip(splits, patients)]
        return splits, patients, {"source": source if n_val else "none", "images": n_val}

    splits = ["train" if s == "val" else s for s in splits]
    if scope:
        patients = [f"{s}/{p}" for s, p in zip(splits, patients)]
    pool = [i for i, s in enumerate(splits) if s == "train"]
    multilabel = isinstance(labels, np.ndarray) and labels.ndim == 2
    if multilabel:
        chosen = iterative_stratification([patients[i] for i in pool], labels[pool], fraction=fraction, seed=seed)
    else:
        chosen = carve_patients([patients[i] for i in pool], [labels[i] for i in pool], fraction=fraction,
                                seed=seed)
    for i in pool:
        if patients[i] in chosen:
            splits[i] = "val"
    check_patients_apart(splits, patients, ("train", "val"))
    validation = {"source": "carved from train", "fraction": fraction, "seed": seed, "folded_val_images": n_val,
                  "images": splits.count("val")}
    if multilabel:
        validation["stratified"] = "labels (iterative stratification)"
    return splits, patients, validation


def patients_across_splits(splits, patients) -> tuple[int, int, int] | None:
    """When patients have images in more than one of train, val and test: how many do, and two rows of the
    first such patient by name (its first row, then its first row in another split); else None."""
    first: dict[str, int] = {}
    other: dict[str, int] = {}
    for i, (split, patient) in enumerate(zip(splits, patients)):
        if split not in ("train", "val", "test"):
            continue
        j = first.setdefault(patient, i)
        if splits[j] != split and patient not in other:
            other[patient] = i
    if not other:
        return None
    patient = min(other)
    return len(other), first[patient], other[patient]


def check_patients_apart(splits, patients, sides: tuple[str, str]) -> None:
    """No patient has images on both ``sides``; a carve that breaks this is a bug."""
    seen = {side: {p for s, p in zip(splits, patients) if s == side} for side in sides}
    both = seen[sides[0]] & seen[sides[1]]
    if both:
        raise AssertionError(f"{len(both)} patients are on both sides of {sides[0]}/{sides[1]}, "
                             f"e.g. {sorted(both)[0]}")


def carve_patients(patients: list[str], labels: list[int], *, fraction: float, seed: int) -> set[str]:
    """Choose whole patients for validation, about ``fraction`` of each class's images.

    A patient counts towards its most frequent label. Each class keeps at
    least one patient on each side when it has two or more.
    """
    per_patient: dict[str, Counter] = defaultdict(Counter)
    for patient, label in zip(patients, labels):
        per_patient[patient][label] += 1
    by_class: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(per_patient):
        label = min(per_patient[patient].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        by_class[label].append(patient)

    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < 2:
            continue
        order = [members[i] for i in rng.permutation(len(members))]
        target = max(1, round(fraction * sum(sum(per_patient[p].values()) for p in members)))
        taken = 0
        for patient in order[:-1]:  # the last one always stays in train
            if taken >= target:
                break
            chosen.add(patient)
            taken += sum(per_patient[patient].values())
    return chosen


def iterative_stratification(groups, labels: np.ndarray, *, fraction: float, seed: int) -> set:
    """The groups (patients) for a ``fraction`` side, stratified over every label's positives.

    Sechidis et al.'s iterative stratification on groups: the label with the
    fewest positives left is placed first, each of its groups going to the
    side that still wants most of that label (ties: the side with most room
    left in images, then a seeded coin); groups without positives fill the
    room last. With two or more groups each side gets at least one.
    """
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = len(names)
    counts = np.zeros((n_groups, labels.shape[1]), np.int64)
    np.add.at(counts, inverse, np.asarray(labels) == POSITIVE)
    sizes = np.bincount(inverse, minlength=n_groups)
    shares = np.array([1.0 - fraction, fraction])
    want = shares[:, None] * counts.sum(axis=0)[None, :]
    room = shares * sizes.sum()
    side = np.full(n_groups, -1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    coin = rng.random(n_groups)

    def place(g: int, label: int | None) -> None:
        keys = [(want[k, label] if label is not None else 0.0, room[k], coin[g] if k else 1 - coin[g])
                for k in (0, 1)]
        k = int(keys[1] > keys[0])
        side[g] = k
        want[k] -= counts[g]
        room[k] -= sizes[g]

    while True:
        left = counts[side < 0].sum(axis=0)
        active = np.flatnonzero(left > 0)
        if not len(active):
            break
        label = int(active[np.argmin(left[active])])
        for g in order:
            if side[g] < 0 and counts[g, label]:
                place(int(g), label)
    for g in order:
        if side[g] < 0:
            place(int(g), None)
    if n_groups >= 2 and len(set(side.tolist())) == 1:  # tiny sets: both sides get a patient
        side[order[-1]] = 1 - side[order[-1]]
    return set(names[side == 1].tolist())
