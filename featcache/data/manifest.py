"""The only walk of a data folder: files, labels, splits, patient ids, junk.

Two layouts are understood::

    DATA/{train,val,test}/CLASS/*    any subset of the three split folders
    DATA/CLASS/*                     one split, called ``all``

Everything downstream (extraction, fine-tuning, reports) reads the
:class:`Manifest` that :func:`scan` returns and never lists a folder again, so
the class list, the row order and the validation split are decided once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from featcache.data.labels import MULTICLASS, MULTILABEL
from featcache.data.splits import assign_validation
from featcache.errors import UserError

SPLITS = ("train", "val", "test")
ALL = "all"
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, ALL: 3}
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png"})
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})
JUNK_FOLDERS = frozenset({"__MACOSX"})

DEFAULT_VAL_FRACTION = 0.15
DEFAULT_MIN_VAL = 100

# Kermany et al. file names: person123_bacteria_456.jpeg / person123_virus_78.jpeg
# (PNEUMONIA) and IM-0115-0001.jpeg / NORMAL2-IM-1427-0001.jpeg (NORMAL).
KERMANY_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+"),
)

# Skip reasons, as shown in the scan table.
HIDDEN = "hidden file"
SYSTEM = "system file"
NOT_IMAGE = "not an image extension"
OUTSIDE_CLASS = "not inside a class folder"
JUNK_DIR = "junk folder"
UNREADABLE = "broken link or unreadable"
NOT_UTF8 = "name is not valid UTF-8"
NOT_REGULAR = "not a regular file (a pipe, device or socket)"
TOO_LARGE = "larger than the file size cap"
LINK_REPEAT = "symlinked folder already walked (a loop or a second link to it)"
LINK_OUT = "symlinked folder outside its class folder"
FOLDER_UNREADABLE = "folder cannot be read"
# No chest X-ray file comes near this (a 16-bit 4,000 x 4,000 PNG is 32 MB); a file this large is
# not an image to decode whole into memory, whatever its name says.
MAX_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Manifest:
    """Every image of a data folder, one row each, in a fixed order.

    Rows are ordered by split (train, val, test, all), then class, then path,
    and are addressed by their index everywhere else in featcache.
    ``patients`` are scoped by the split folder they came from
    (``train/person12``) when they come from file names, because Kermany's
    person numbers restart in test.

    ``task`` is ``multiclass`` (``labels``: one class index per row, into
    ``classes``) or ``multilabel`` (``labels``: an (N, L) int8 array as read,
    1 / 0 / -1 uncertain / -2 not mentioned, columns named by ``classes``).
    """

    root: str
    layout: str
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    splits: tuple[str, ...]
    patients: tuple[str, ...]
    sizes: tuple[int, ...]
    mtimes_ns: tuple[int, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    validation: dict = field(default_factory=dict)
    patient_sources: dict = field(default_factory=dict)
    label_rules: tuple[tuple[str, str], ...] = ()
    task: str = MULTICLASS

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def split_names(self) -> list[str]:
        present = set(self.splits)
        return [s for s in (*SPLITS, ALL) if s in present]

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.splits) == split)

    @property
    def multilabel(self) -> bool:
        return self.task == MULTILABEL

    def counts(self) -> dict[str, list[int]]:
        """Images per split and class, classes in ``self.classes`` order (multi-label: positives per label)."""
        if self.multilabel:
            return {s: (self.labels[self.indices(s)] == 1).sum(axis=0).tolist() for s in self.split_names}
        table = {s: [0] * len(self.classes) for s in self.split_names}
        for split, label in zip(self.splits, self.labels):
            table[split][label] += 1
        return table

    def patient_counts(self) -> dict[str, int]:
        seen: dict[str, set[str]] = defaultdict(set)
        for split, patient in zip(self.splits, self.patients):
            seen[split].add(patient)
        return {s: len(seen[s]) for s in self.split_names}

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.skipped))

    def subset(self, rows) -> "Manifest":
        """The manifest of ``rows`` only (in their order), with its own digest."""
        rows = [int(r) for r in rows]

        def pick(values):
            return tuple(values[r] for r in rows)

        labels = self.labels[np.asarray(rows, dtype=np.int64)] if self.multilabel else pick(self.labels)
        return replace(self, paths=pick(self.paths), labels=labels, splits=pick(self.splits),
                       patients=pick(self.patients), sizes=pick(self.sizes), mtimes_ns=pick(self.mtimes_ns))

    def stratified_subset(self, n: int | None, seed: int = 0, *, splits: tuple[str, ...] | None = None) -> "Manifest":
        """At most ``n`` rows of ``splits`` (every split when None), keeping each split x class share (seeded).

        Rows of other splits are all kept; without ``n`` the manifest is returned whole.
        Splits are decided before sampling, so patients stay on their side.
        """
        if n is None:
            return self
        if n < 1:
            raise UserError(f"--max-images must be at least 1, got {n}")
        pool = np.array([splits is None or s in splits for s in self.splits])
        if n >= int(pool.sum()):
            return self
        rng = np.random.default_rng(seed)
        # Multi-label rows are drawn per split alone: every label keeps its share in expectation.
        keys = np.array(list(self.splits) if self.multilabel else
                        [f"{s}/{lab}" for s, lab in zip(self.splits, self.labels)])
        chosen = np.flatnonzero(~pool).tolist()
        for key in sorted(set(keys[pool].tolist())):
            members = np.flatnonzero((keys == key) & pool)
            take = max(1, int(n * len(members) / pool.sum()))  # floor: never more than n, so idempotent
            chosen.extend(rng.choice(members, size=min(take, len(members)), replace=False).tolist())
        return self.subset(sorted(chosen))

    def limit(self, max_images: int | None, seed: int = 0, *, subsample_all: bool = False) -> "Manifest":
        """``--max-images``: a stratified subset of the train images; val and test stay whole
        (every number reported on them stays comparable), unless ``subsample_all``."""
        return self.stratified_subset(max_images, seed, splits=None if subsample_all else ("train",))

    def digest(self) -> str:
        """Hash of everything about the rows that can change a feature or a label."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.classes)).encode())
        for row in zip(self.paths, self.sizes, self.mtimes_ns, self._label_values(), self.splits, self.patients):
            h.update(json.dumps(row).encode())
            h.update(b"\n")
        return h.hexdigest()

    def _label_values(self):
        """Each row's label as JSON takes it: a class index, or the list of one row's label values."""
        return self.labels.tolist() if self.multilabel else self.labels

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "layout": self.layout,
            **({"task": self.task} if self.multilabel else {}),
            "classes": list(self.classes),
            "validation": self.validation,
            "patient_sources": self.patient_sources,
            "label_rules": [list(r) for r in self.label_rules],
            "digest": self.digest(),
            "rows": [
                {"path": p, "label": lab, "split": s, "patient": pt, "size": sz, "mtime_ns": mt}
                for p, lab, s, pt, sz, mt in zip(
                    self.paths, self._label_values(), self.splits, self.patients, self.sizes, self.mtimes_ns
                )
            ],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))


def scan(
    root: str | os.PathLike,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    min_val: int = DEFAULT_MIN_VAL,
    split_seed: int = 0,
    patient_regex: str | None = None,
    label_from_name: list[str] | None = None,
) -> Manifest:
    """Walk ``root`` once and return its :class:`Manifest`.

    When there is a train split and no ``val`` folder (or one with fewer than
    ``min_val`` images, like Kaggle's 16), a stratified, patient-grouped
    validation split of ``val_fraction`` is carved out of train, seeded by
    ``split_seed`` (and nothing else, so changing a run's ``--seed`` never
    moves the split), and no patient has images on both sides.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if min_val < 0:
        raise UserError(f"--min-val must be 0 or more, got {min_val}")
    patient_pattern = _compile_patient_regex(patient_regex)
    rules = parse_label_rules(label_from_name)
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"data path is not a folder: {root}")
    root = root.resolve()

    skipped: list[tuple[str, str]] = []
    layout, split_dirs = _find_splits(root, skipped)
    classes = _check_classes(root, split_dirs)

    rows = []  # (path, label, folder_split, patient_stem_id, source, size, mtime)
    sources: Counter[str] = Counter()
    empty = []
    for split, split_dir in split_dirs.items():
        for label, cls in enumerate(classes):
            found = list(_walk_class(root, split_dir / cls, skipped))
            if not found:
                empty.append(f"{split_dir.relative_to(root).as_posix() + '/' if split != ALL else ''}{cls}")
            for rel, size, mtime in found:
                pid, source = _patient_id(Path(rel).stem, patient_pattern)
                sources[source] += 1
                rows.append([rel, label, split, pid, size, mtime])
    if empty:
        raise UserError(
            f"empty class folder: {', '.join(empty)} has no {'/'.join(sorted(IMAGE_EXTENSIONS))} images"
        )

    if rules:
        classes = _relabel(rows, classes, rules, list(split_dirs))
    splits, patients, validation = assign_validation(
        [r[2] for r in rows], [r[3] for r in rows], [r[1] for r in rows], min_val=min_val, fraction=val_fraction,
        seed=split_seed, scope=True)
    for r, split, patient in zip(rows, splits, patients):
        r[2], r[3] = split, patient
    rows.sort(key=lambda r: (SPLIT_ORDER[r[2]], r[1], r[0]))
    paths, labels, splits, patients, sizes, mtimes = (tuple(col) for col in zip(*rows))
    return Manifest(
        root=str(root),
        layout=layout,
        classes=tuple(classes),
        paths=paths,
        labels=labels,
        splits=splits,
        patients=patients,
        sizes=sizes,
        mtimes_ns=mtimes,
        skipped=tuple(sorted(skipped)),
        validation=validation,
        patient_sources=dict(sources),
        label_rules=tuple((r.pattern, c) for r, c in rules),
    )


# Presets for --label-from-name. Kermany's PNEUMONIA files name their subtype.
LABEL_PRESETS = {
    "kermany-3class": (("_bacteria_", "BACTERIA"), ("_virus_", "VIRUS")),
}


def parse_label_rules(specs: list[str] | None) -> list[tuple[re.Pattern, str]]:
    """``REGEX=CLASS`` rules (or a preset name) to compiled (pattern, class) pairs."""
    rules = []
    for spec in specs or ():
        if spec in LABEL_PRESETS:
            rules += [(re.compile(p), c) for p, c in LABEL_PRESETS[spec]]
            continue
        pattern, sep, cls = spec.rpartition("=")
        if not sep or not pattern or not cls:
            raise UserError(f"--label-from-name takes REGEX=CLASS or a preset ({', '.join(LABEL_PRESETS)}), "
                            f"got {spec!r}")
        try:
            rules.append((re.compile(pattern), cls))
        except re.error as exc:
            raise UserError(f"--label-from-name {spec!r}: not a valid regular expression: {exc}") from None
    return rules


def _relabel(rows: list, folder_classes: list[str], rules, splits: list[str]) -> list[str]:
    """Label each row by the first rule whose pattern is found in its file name, else by its folder.

    Mutates the label (index 1) of each row; returns the new sorted class list.
    """
    names = []
    for r in rows:
        name = r[0].rsplit("/", 1)[-1]
        names.append(next((cls for pattern, cls in rules if pattern.search(name)), folder_classes[r[1]]))
    classes = sorted(set(names))
    if len(classes) < 2:
        raise UserError(f"--label-from-name leaves one class ({classes[0]}); classification needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    for r, name in zip(rows, names):
        r[1] = index[name]
    present = {split: {names[i] for i, r in enumerate(rows) if r[2] == split} for split in splits}
    lacking = [f"{split}/ has no {', '.join(sorted(set(classes) - got))}" for split, got in present.items()
               if set(classes) - got]
    if lacking:
        raise UserError(f"after --label-from-name, {'; '.join(lacking)} images")
    return classes


def _compile_patient_regex(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"--patient-regex is not a valid regular expression: {exc}") from None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _listing(folder: Path) -> list[Path]:
    """The sorted entries of a folder the layout depends on; one that cannot be read is a user error."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read the folder {folder} ({exc.strerror or exc.__class__.__name__}); "
                        "check its permissions") from None


def _find_splits(root: Path, skipped: list) -> tuple[str, dict[str, Path]]:
    dirs = []
    for entry in _listing(root):
        if entry.is_dir():
            if _is_hidden(entry.name) or entry.name in JUNK_FOLDERS or not _is_utf8(entry.name):
                skipped.append((printable_path(entry.name) + "/", JUNK_DIR if _is_utf8(entry.name) else NOT_UTF8))
            else:
                dirs.append(entry)
        else:
            skipped.append((printable_path(entry.name), _file_skip_reason(entry.name) or OUTSIDE_CLASS))
    split_dirs = {d.name: d for d in dirs if d.name in SPLITS}
    if not split_dirs:
        if not dirs:
            raise UserError(f"no class folders in {root}: expected DATA/{{train,val,test}}/CLASS/ or DATA/CLASS/")
        # Flat layout: the files at the top level were judged above already.
        return "flat", {ALL: root}
    others = [d.name for d in dirs if d.name not in SPLITS]
    if others:
        raise UserError(
            f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders "
            f"({', '.join(others)}); expected only train/, val/ and test/"
        )
    ordered = {s: split_dirs[s] for s in SPLITS if s in split_dirs}
    for split_dir in ordered.values():
        for entry in _listing(split_dir):
            rel = printable_path(entry.relative_to(root).as_posix())
            if entry.is_dir() and not _is_utf8(entry.name):
                skipped.append((rel + "/", NOT_UTF8))
            elif entry.is_dir() and (_is_hidden(entry.name) or entry.name in JUNK_FOLDERS):
                skipped.append((rel + "/", JUNK_DIR))
            elif not entry.is_dir():
                skipped.append((rel, _file_skip_reason(entry.name) or OUTSIDE_CLASS))
    return "splits", ordered


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(
        e.name for e in _listing(split_dir)
        if e.is_dir() and not _is_hidden(e.name) and e.name not in JUNK_FOLDERS and _is_utf8(e.name)
    )


def _check_classes(root: Path, split_dirs: dict[str, Path]) -> list[str]:
    per_split = {split: _class_folders(d) for split, d in split_dirs.items()}
    for split, names in per_split.items():
        if not names:
            where = split_dirs[split].relative_to(root).as_posix() if split != ALL else str(root)
            raise UserError(f"no class folders in {where}/: expected one folder per class, e.g. NORMAL/ and PNEUMONIA/")
    union = sorted(set().union(*per_split.values()))
    differ = classes_differ({f"{split}/": names for split, names in per_split.items()}, union)
    if differ:
        raise UserError(differ)
    if len(union) < 2:
        raise UserError(f"found one class folder ({union[0]}); classification needs at least two")
    return union


def classes_differ(per_split: dict[str, list[str]], classes: list[str]) -> str | None:
    """``classes differ across splits (train/ lacks C) - found ...`` when a split has no image of a class."""
    problems = [f"{split} lacks {', '.join(missing)}" for split, names in per_split.items()
                if (missing := [c for c in classes if c not in names])]
    if not problems:
        return None
    listing = "; ".join(f"{s}: {', '.join(n)}" for s, n in per_split.items())
    return f"classes differ across splits ({'; '.join(problems)}) - found {listing}"


def _file_skip_reason(name: str) -> str | None:
    if _is_hidden(name):
        return HIDDEN
    if name.lower() in SYSTEM_FILES:
        return SYSTEM
    if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        return NOT_IMAGE
    return None


def printable_path(rel: str) -> str:
    """A path for ``skipped`` (stored as UTF-8): undecodable bytes shown as \\xNN escapes."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.fsdecode turned undecodable bytes into lone surrogates
        return False


def _walk_class(root: Path, class_dir: Path, skipped: list):
    """Yield (relative path, size, mtime_ns) of every image below ``class_dir``.

    Symlinked folders are followed once each (by real path) and never out of the
    class folder, so a link to ``.`` or ``..`` can neither repeat images nor give
    them another class. Only regular files up to ``MAX_FILE_BYTES`` are images;
    names that are not UTF-8 are skipped here, before any work, with a reason.
    """
    top = os.path.realpath(class_dir)
    seen = {top}

    def unreadable(error: OSError):
        where = Path(error.filename) if error.filename else class_dir
        skipped.append((printable_path(where.relative_to(root).as_posix()) + "/", FOLDER_UNREADABLE))

    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True, onerror=unreadable):
        here = Path(dirpath)
        for d in list(dirnames):
            rel = printable_path((here / d).relative_to(root).as_posix()) + "/"
            real = os.path.realpath(here / d)
            reason = (JUNK_DIR if _is_hidden(d) or d in JUNK_FOLDERS else NOT_UTF8 if not _is_utf8(d)
                      else LINK_OUT if os.path.commonpath([top, real]) != top
                      else LINK_REPEAT if real in seen else None)
            if reason:
                skipped.append((rel, reason))
                dirnames.remove(d)
            else:
                seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            reason = _file_skip_reason(name) or (None if _is_utf8(name) else NOT_UTF8)
            if reason:
                skipped.append((printable_path(rel), reason))
                continue
            try:
                st = path.stat()
            except OSError:  # a dangling symlink, a file removed mid-walk
                skipped.append((rel, UNREADABLE))
                continue
            reason = stat_skip_reason(st)
            if reason:
                skipped.append((rel, reason))
            else:
                yield rel, st.st_size, st.st_mtime_ns


def stat_skip_reason(st: os.stat_result) -> str | None:
    """Why a file with this stat is no image to decode (not a regular file, over the size cap), else None."""
    if not stat.S_ISREG(st.st_mode):  # a FIFO would hang the decoder, /dev/zero never ends
        return NOT_REGULAR
    if st.st_size > MAX_FILE_BYTES:
        return f"{TOO_LARGE} ({st.st_size / 2**20:,.0f} MB > {MAX_FILE_BYTES // 2**20} MB)"
    return None


def _patient_id(stem: str, pattern: re.Pattern | None) -> tuple[str, str]:
    """Patient id of one file and where it came from (regex, kermany or stem)."""
    if pattern is not None:
        m = pattern.search(stem)
        if m:
            if "patient" in pattern.groupindex:
                return m.group("patient"), "regex"
            return (m.group(1) if pattern.groups else m.group(0)), "regex"
        return stem, "file stem"
    for kermany in KERMANY_PATIENT_PATTERNS:
        m = kermany.match(stem)
        if m:
            return m.group(1), "kermany name"
    return stem, "file stem"
