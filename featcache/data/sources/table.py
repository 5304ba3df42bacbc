"""CSV and list files as label sources ship them (plain or gzip), every error naming file, row and column.

Rows are numbered as a spreadsheet shows them: the header is row 1.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import os
import zlib
from pathlib import Path

from featcache.data.labels import CELL_VALUES, CELL_WORDS
from featcache.errors import UserError


# What reading a (gzip) text file can raise: bad UTF-8, a file that is not gzip or is truncated or corrupt.
READ_ERRORS = (UnicodeDecodeError, EOFError, OSError, zlib.error)


def _open_raw(path: Path):
    try:
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc.__class__.__name__})") from None


def open_text(path: Path):
    """A text file, gzip-compressed when its name ends in ``.gz``; BOMs are dropped."""
    return io.TextIOWrapper(_open_raw(path), encoding="utf-8-sig", newline="")


def unreadable(path: Path, exc: Exception, fallback_row: int) -> UserError:
    """The one-line error for a file that stopped reading with ``exc``, at the line where its bytes fail.

    The text layer decodes (and gunzips) ahead of the rows handed out, so the row is found again in the raw
    bytes, line by line; ``fallback_row`` is used when they read cleanly this time.
    """
    row = _failing_line(path) or fallback_row
    if isinstance(exc, UnicodeDecodeError):
        what = f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x}: {exc.reason}); save it as UTF-8"
    elif path.name.endswith(".gz"):
        what = f"not a readable gzip file ({exc.__class__.__name__}: {exc})"
    else:
        what = f"not readable ({exc.__class__.__name__}: {exc})"
    return UserError(f"{path}, row {row}: {what}")


def _failing_line(path: Path) -> int | None:
    """The number of the first line of ``path`` that cannot be read or decoded as UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    try:
        with _open_raw(path) as raw:
            while piece := raw.readline(1 << 20):  # bounded: a file without newlines is read in pieces
                decoder.decode(piece)
                line += piece.endswith(b"\n")
            decoder.decode(b"", final=True)
    except READ_ERRORS:
        return line
    return None


def find_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` (each also as ``NAME.gz``) present in ``folder``."""
    for name in names:
        for candidate in (name, name + ".gz"):
            if (folder / candidate).is_file():
                return folder / candidate
    raise UserError(f"{what} not found: {folder} has no {' or '.join(names)} (plain or .gz)")


def dataset_folder(data: str | os.PathLike, fmt: str, expected: str) -> Path:
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise UserError(f"--format {fmt} reads a dataset folder ({expected}); not a folder: {folder}")
    return folder.resolve()


class CsvTable:
    """One CSV file's header, checked for ``required`` columns, and its rows."""

    def __init__(self, path: Path, required: list[str]):
        self.path = path
        self._file = open_text(path)
        self._reader = csv.reader(self._file)
        try:
            header = next(self._reader, None)
        except READ_ERRORS as exc:
            self._file.close()
            raise unreadable(path, exc, 1) from None
        except csv.Error as exc:
            self._file.close()
            raise UserError(f"{path}, row {self._reader.line_num or 1}: not readable as CSV ({exc})") from None
        if header is None:
            raise UserError(f"{path} is empty: expected a header row with the columns {', '.join(required)}")
        self.columns = {name.strip(): i for i, name in reversed(list(enumerate(header)))}
        self.width = len(header)
        self._index_cache: dict[tuple[str, ...], list[int]] = {}
        missing = [c for c in required if c not in self.columns]
        if missing:
            shown = ", ".join(repr(c) for c in list(self.columns)[:12])
            raise UserError(f"{path}, row 1: no column {', '.join(repr(c) for c in missing)} (the header has "
                            f"{shown}{', ...' if len(self.columns) > 12 else ''})")

    def rows(self):
        """(row number, cell getter) for each data row; blank lines are passed over."""
        try:
            for fields in self._reader:
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                yield self._reader.line_num, _Row(fields, self.columns)
        except READ_ERRORS as exc:
            raise unreadable(self.path, exc, self._reader.line_num + 1) from None
        except csv.Error as exc:  # e.g. a field over the size limit: csv has read the row it is in
            raise UserError(f"{self.path}, row {self._reader.line_num}: not readable as CSV ({exc})") from None
        finally:
            self._file.close()

    def error(self, row: int, column: str, message: str) -> UserError:
        return UserError(f"{self.path}, row {row}, column '{column}': {message}")

    def _indices(self, columns: tuple[str, ...]) -> list[int]:
        found = self._index_cache.get(columns)
        if found is None:
            found = self._index_cache[columns] = [self.columns[c] for c in columns]
        return found

    def label_values(self, row: int, cells, columns: tuple[str, ...]) -> tuple[int, ...]:
        """One row's value in each label column: 1, 0, -1 (uncertain) or -2 (blank: not mentioned)."""
        fields = cells.fields
        if len(fields) < self.width:  # a short row: its missing cells are blank
            fields = fields + [""] * (self.width - len(fields))
        cell = CELL_VALUES.get
        values = tuple([cell(fields[i].strip()) for i in self._indices(columns)])
        if None in values:
            column = columns[values.index(None)]
            raise self.error(row, column, f"unknown label value {cells[column]!r} (expected {CELL_WORDS})")
        return values


class _Row:
    __slots__ = ("fields", "columns")

    def __init__(self, fields: list[str], columns: dict[str, int]):
        self.fields, self.columns = fields, columns

    def __getitem__(self, column: str) -> str:
        i = self.columns[column]
        return self.fields[i].strip() if i < len(self.fields) else ""


def read_list(path: Path) -> list[tuple[int, str]]:
    """(line number, name) of each non-blank line of a list file such as NIH's ``test_list.txt``."""
    with open_text(path) as f:
        try:
            return [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
        except READ_ERRORS as exc:
            raise unreadable(path, exc, 1) from None


def relative_path(text: str, root: Path) -> str | None:
    """``text`` as a clean path relative to ``root``, or None when it leaves the root (``../``, absolute elsewhere)."""
    if os.path.isabs(text):
        try:
            text = Path(text).relative_to(root).as_posix()
        except ValueError:
            return None
    parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)
