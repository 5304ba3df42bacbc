"""Label sources: where the images and their labels are listed, one module per format.

``--format`` picks one; each reads its files into a
:class:`~featcache.data.manifest.Manifest` (labels as read) and nothing
downstream knows which it was:

- ``folder`` (:mod:`~featcache.data.sources.folder`): ``DATA/{train,val,test}/CLASS/*``, the default;
- ``csv`` (:mod:`~featcache.data.sources.generic`): any CSV naming paths and labels;
- ``nih`` (:mod:`~featcache.data.sources.nih`): NIH ChestX-ray14 as downloaded;
- ``chexpert`` (:mod:`~featcache.data.sources.chexpert`): CheXpert-v1.0 or -small;
- ``mimic`` (:mod:`~featcache.data.sources.mimic`): MIMIC-CXR-JPG.

A new format is a module here that registers its reader with
:func:`~featcache.data.sources.base.register`, imported below.
"""

from __future__ import annotations

import os

from featcache.data.manifest import DEFAULT_MIN_VAL, DEFAULT_VAL_FRACTION, Manifest
from featcache.data.sources.base import SOURCES, register
from featcache.errors import UserError

DEFAULT_FORMAT = "folder"
# Every scan option of every source, with its default: a source is handed the ones it takes, and any
# other one set away from its default is refused (it would be silently ignored otherwise).
SCAN_DEFAULTS = {
    "val_fraction": DEFAULT_VAL_FRACTION, "min_val": DEFAULT_MIN_VAL, "split_seed": 0, "patient_regex": None,
    "label_from_name": None, "path_col": None, "label_col": None, "label_cols": None, "patient_col": None,
    "split_col": None, "root": None, "views": "all",
}


def read_manifest(data: str | os.PathLike, *, format: str | None = None, **options) -> Manifest:
    """The :class:`Manifest` of ``data`` read as ``format`` (default: a folder)."""
    fmt = format or DEFAULT_FORMAT
    if fmt not in SOURCES:
        raise UserError(f"unknown --format {fmt!r}; choose one of: {', '.join(SOURCES)}")
    unknown = sorted(set(options) - set(SCAN_DEFAULTS))
    if unknown:
        raise TypeError(f"read_manifest() got unexpected options {', '.join(unknown)}")
    source = SOURCES[fmt]
    stray = [name for name, value in options.items()
             if name not in source.options and value not in (None, SCAN_DEFAULTS[name])]
    if stray:
        flags = ", ".join("--" + name.replace("_", "-") for name in stray)
        raise UserError(f"{flags} {'does' if len(stray) == 1 else 'do'} not apply to --format {fmt} "
                        f"(it reads {source.expects})")
    taken = {name: options.get(name, SCAN_DEFAULTS[name]) for name in source.options}
    if not 0.0 < taken.get("val_fraction", 0.5) < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, got {taken['val_fraction']}")
    if taken.get("min_val", 0) < 0:
        raise UserError(f"--min-val must be 0 or more, got {taken['min_val']}")
    return source.read(data, **taken)


def format_names() -> str:
    return "|".join(SOURCES)


# Importing registers them, in the order --help lists them.
from featcache.data.sources import folder, generic, nih, chexpert, mimic  # noqa: E402

__all__ = ["DEFAULT_FORMAT", "SCAN_DEFAULTS", "SOURCES", "chexpert", "folder", "format_names", "generic", "mimic", "nih",
           "read_manifest", "register"]
