"""Every command's options and their defaults, declared once.

The CLI's flags (``featcache.cli``), TOML configs (``featcache.run``) and the
library functions (:func:`featcache.extract.extract`,
:func:`featcache.finetune.finetune`, :func:`featcache.fit.fit_head`) all take
their defaults from these dataclasses, so the command line and the library
cannot disagree. A test compares all three. This module imports nothing
heavy: the CLI reads it before any command runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

DEFAULT_CHUNK_ROWS = 1024
DEFAULT_RESAMPLES = 1000
# The class whose probability is scored (AUROC, sensitivity) in two-class problems unless --positive-class
# says otherwise; when no class has this name, the last class (in sorted order) is the positive one.
DEFAULT_POSITIVE_CLASS = "PNEUMONIA"


@dataclass(frozen=True)
class ExtractOptions:
    """``featcache extract``: one backbone over every image, into a cache."""

    backbone: str = "resnet18"
    weights: str = "imagenet"
    batch_size: int = 32
    backend: str = "auto"
    device: str = "auto"
    workers: int | None = None  # decode processes; None: half the cores
    seed: int = 0
    overwrite: bool = False
    dtype: str = "float32"
    compression: str = "none"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    wait: bool = False
    max_images: int | None = None
    subsample_all: bool = False
    hw_decoder_load: float | None = None  # None: DALI's default share for the hardware JPEG decoder
    amp: str = "off"
    # Augmented views of each train image besides the plain one (--aug-views; --views is the scan's filter of
    # X-ray projections), and the augmentation they are made with (light or strong).
    aug_views: int = 0
    augment: str = "none"
    progress: bool = True


@dataclass(frozen=True)
class HeadOptions:
    """``featcache fit-head``: heads on a cache, chosen on validation."""

    heads: str = "logistic"
    C: float | None = None  # None: chosen on validation from the grid
    class_weight: str | None = None  # None: chosen on validation
    threshold: str = "0.5"
    target_sensitivity: float | None = None
    sampler: str = "shuffle"
    epochs: int = 20
    device: str = "auto"
    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    positive_class: str | None = None  # None: DEFAULT_POSITIVE_CLASS when present, else the last class
    uncertain: str = "ignore"  # multi-label: uncertain labels left out (CheXpert's U-Ignore), ones or zeros
    unmentioned: str = "negative"  # multi-label: a blank cell is a negative, or left out (ignore)
    labels: str | None = None  # a label source whose labels replace the cache's, matched by path


@dataclass(frozen=True)
class FinetuneOptions:
    """``featcache finetune``: train a backbone and head end to end (or the head on a frozen backbone)."""

    backbone: str = "resnet18"
    weights: str = "imagenet"
    epochs: int | None = None  # None: the recipe's (10 for featcache, 25 for tutorial)
    lr: float | None = None  # None: the recipe's
    batch_size: int | None = None  # None: the recipe's (32 for featcache, 4 for tutorial)
    amp: str = "auto"
    freeze_backbone: bool = False
    augment: str | None = None  # None: the recipe's
    hflip: bool = False
    class_weight: str = "none"
    early_stop: int | None = None
    recipe: str = "featcache"
    max_images: int | None = None
    subsample_all: bool = False
    compile: bool = False
    seed: int = 0
    threshold: str = "0.5"
    device: str = "auto"
    backend: str = "auto"
    workers: int | None = None
    overwrite: bool = False
    n_resamples: int = DEFAULT_RESAMPLES
    progress: bool = True
    positive_class: str | None = None
    uncertain: str = "ignore"  # as for fit-head
    unmentioned: str = "negative"


EXTRACT = ExtractOptions()
HEAD = HeadOptions()
FINETUNE = FinetuneOptions()


def names(options_class) -> tuple[str, ...]:
    return tuple(f.name for f in fields(options_class))
