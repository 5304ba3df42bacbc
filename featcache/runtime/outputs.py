"""Output paths checked before any work: a run that ends by failing to write its result wastes it."""

from __future__ import annotations

import os
from pathlib import Path

from featcache.errors import UserError

MAX_NAME_BYTES = 255  # one path component, on every common file system


def _check_names(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    for name in (path.name + s for s in ("", *suffixes)):
        if len(os.fsencode(name)) > MAX_NAME_BYTES:
            raise UserError(f"{flag} {path}: the file name {name[:40]}... is over {MAX_NAME_BYTES} bytes; "
                            "give a shorter one")


def _check_parent(path: Path, flag: str) -> None:
    """The folder that will hold ``path``: created if missing, refused if it is a file or read-only."""
    parent = path.parent if str(path.parent) else Path(".")
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise UserError(f"{flag} {path}: {above} is a file, not a folder")
            if not os.access(above, os.W_OK | os.X_OK):
                raise UserError(f"{flag} {path}: {above} is not writable")
            break


def output_file(path: str | os.PathLike, flag: str = "--out", *, suffixes: tuple[str, ...] = ()) -> Path:
    """A file to be written: not a folder, a sane name (``suffixes``: files made beside it), a writable place.

    Missing parent folders are fine (they are created when written).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    _check_names(path, flag, suffixes)
    _check_parent(path, flag)
    return path


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder to be written into: not an existing file, a sane name, a writable place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    _check_names(path, flag, ())
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path} is not writable")
    else:
        _check_parent(path, flag)
    return path
