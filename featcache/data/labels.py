"""Label values as datasets write them, the policies that make them targets, and the joins and refusals
multi-label sets meet.

A multi-label set keeps its labels as read, one int8 per image and label::

     1  positive            0  negative
    -1  uncertain          -2  not mentioned (a blank cell)

Policies (uncertain as positive, ignored, ...) are a choice made when a head
is fitted, so one cache serves every labelling: :func:`apply_policy` turns
the labels as read into training targets, 1.0 / 0.0, or NaN where the label
is unknown under the policy (left out of the loss and of every metric).
"""

from __future__ import annotations

import numpy as np

from featcache.errors import UserError
from featcache.options import HEAD

MULTICLASS = "multiclass"
MULTILABEL = "multilabel"

POSITIVE, NEGATIVE, UNCERTAIN, UNMENTIONED = 1, 0, -1, -2
VALUE_NAMES = {POSITIVE: "positive", NEGATIVE: "negative", UNCERTAIN: "uncertain", UNMENTIONED: "not mentioned"}
# CheXpert, MIMIC-CXR and generic 0/1 columns: floats or integers as text, blank for not mentioned.
CELL_VALUES = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "-1": UNCERTAIN, "-1.0": UNCERTAIN,
               "": UNMENTIONED}
CELL_WORDS = "1, 0, -1 (uncertain) or blank (not mentioned)"
# CheXpert's U-Ignore, U-Ones and U-Zeros (Irvin et al. 2019), and a blank cell read as negative or as unknown.
UNCERTAIN_POLICIES = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}
UNMENTIONED_POLICIES = {"negative": 0.0, "ignore": np.nan}
DEFAULT_UNCERTAIN = HEAD.uncertain
DEFAULT_UNMENTIONED = HEAD.unmentioned


def tally(labels: np.ndarray, splits, names) -> dict:
    """Per split and label: how many images are positive, negative, uncertain and not mentioned."""
    labels = np.asarray(labels)
    splits = np.asarray(splits)
    out = {}
    for split in dict.fromkeys(splits.tolist()):
        block = labels[splits == split]
        out[split] = {name: {VALUE_NAMES[v]: int((block[:, j] == v).sum()) for v in VALUE_NAMES}
                      for j, name in enumerate(names)}
    return out


def check_policy(uncertain: str, unmentioned: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise UserError(f"--uncertain takes {'|'.join(UNCERTAIN_POLICIES)}, got {uncertain!r}")
    if unmentioned not in UNMENTIONED_POLICIES:
        raise UserError(f"--unmentioned takes {'|'.join(UNMENTIONED_POLICIES)}, got {unmentioned!r}")


def check_task_flags(multilabel: bool, positive_class, uncertain: str, unmentioned: str) -> None:
    """Refuse the label flags that do not apply to this task (fit-head and finetune), rather than ignore them."""
    if multilabel and positive_class is not None:
        raise UserError("--positive-class applies to two-class sets; a multi-label set scores every label")
    if not multilabel and (uncertain, unmentioned) != (DEFAULT_UNCERTAIN, DEFAULT_UNMENTIONED):
        raise UserError("--uncertain and --unmentioned apply to multi-label sets; this one is single-label")


def apply_policy(labels: np.ndarray, uncertain: str = DEFAULT_UNCERTAIN,
                 unmentioned: str = DEFAULT_UNMENTIONED) -> np.ndarray:
    """(N, L) float32 targets from labels as read: 1.0, 0.0, or NaN where unknown under the policy."""
    check_policy(uncertain, unmentioned)
    labels = np.asarray(labels)
    out = np.where(labels == POSITIVE, 1.0, 0.0).astype(np.float32)
    out[labels == UNCERTAIN] = UNCERTAIN_POLICIES[uncertain]
    out[labels == UNMENTIONED] = UNMENTIONED_POLICIES[unmentioned]
    return out


def single_label_only(task: str, what: str, n_labels: int) -> None:
    """Refuse a multi-label set where only single-label code exists yet (fit-head and finetune fit both)."""
    if task == MULTILABEL:
        raise UserError(f"{what} is a multi-label set ({n_labels} labels); fit-head and finetune fit multi-label "
                        "sets, this command takes single-label data only for now")


def labels_for_paths(manifest, paths) -> tuple[np.ndarray, np.ndarray]:
    """The labels ``manifest`` gives each of ``paths`` (a cache's rows), matched by path, and which rows have one.

    Rows without a label get a placeholder (0, or a row of "not mentioned") and ``False`` in the mask.
    """
    where = {p.replace("\\", "/"): i for i, p in enumerate(manifest.paths)}
    found = np.array([where.get(str(p).replace("\\", "/"), -1) for p in paths], dtype=np.int64)
    keep = found >= 0
    source = np.asarray(manifest.labels)
    labels = np.zeros(len(found), dtype=np.int64) if source.ndim == 1 else \
        np.full((len(found), source.shape[1]), UNMENTIONED, dtype=np.int8)
    labels[keep] = source[found[keep]]
    return labels, keep
