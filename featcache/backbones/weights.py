"""What ``--weights`` means, as one type: :class:`WeightsRef`.

A reference is parsed once from what a user types (``imagenet`` or
``pretrained``, ``none``, ``none:seed=N``, a state_dict path) and has one
stable id, recorded in caches, runs and fingerprints:

=====================  =============================================
``--weights``          id
=====================  =============================================
imagenet, pretrained   ``torchvision:ResNet18_Weights.IMAGENET1K_V1`` (the library's own name)
none, none:seed=N      ``none:seed=N``
PATH                   ``file:sha256=HEX``
=====================  =============================================

``from_id`` reads an id back, so a report can say what a run's weights were
and ``predict`` can rebuild the backbone a head was trained on.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from featcache.errors import UserError

PRETRAINED_WORDS = ("imagenet", "pretrained")
KINDS = ("pretrained", "none", "file")
_NONE_SEED = re.compile(r"none:seed=(-?\d+)")


@dataclass(frozen=True)
class WeightsRef:
    """``kind``: pretrained (the library's default weights, named by ``tag`` once resolved), none (seeded
    random init) or file (a state_dict at ``path``, identified by ``sha256`` once read)."""

    kind: str
    seed: int = 0
    library: str = "torchvision"
    tag: str | None = None
    path: str | None = None
    sha256: str | None = None

    @classmethod
    def parse(cls, text: str | os.PathLike | "WeightsRef", *, seed: int = 0) -> "WeightsRef":
        """The reference a ``--weights`` value names; ``seed`` is used by ``none`` (``none:seed=N`` wins)."""
        if isinstance(text, WeightsRef):
            return text
        text = str(text)
        if text in PRETRAINED_WORDS:
            return cls("pretrained", seed=seed)
        if text == "none":
            return cls("none", seed=seed)
        match = _NONE_SEED.fullmatch(text)
        if match:
            return cls("none", seed=int(match.group(1)))
        if not text:
            raise UserError("--weights is empty; give imagenet, none or a path to a state_dict file")
        return cls("file", seed=seed, path=text)

    @classmethod
    def from_id(cls, weights_id: str, *, source: str | None = None) -> "WeightsRef":
        """The reference behind a recorded id; ``source`` is the file path recorded beside a ``file:`` id."""
        if not weights_id:
            raise UserError("no weights id recorded")
        match = _NONE_SEED.fullmatch(weights_id)
        if match:
            return cls("none", seed=int(match.group(1)))
        library, _, rest = weights_id.partition(":")
        if library == "file" and rest.startswith("sha256="):
            return cls("file", path=source if source not in (None, *PRETRAINED_WORDS, "none") else None,
                       sha256=rest[len("sha256="):])
        if rest:
            return cls("pretrained", library=library, tag=rest)
        raise UserError(f"unreadable weights id {weights_id!r}")

    def to_id(self) -> str:
        if self.kind == "none":
            return f"none:seed={self.seed}"
        if self.kind == "file":
            if not self.sha256:
                raise ValueError("a file reference has an id once its SHA-256 is known (resolved())")
            return f"file:sha256={self.sha256}"
        if not self.tag:
            raise ValueError("a pretrained reference has an id once the library names its weights (resolved())")
        return f"{self.library}:{self.tag}"

    def resolved(self, *, tag: str | None = None, sha256: str | None = None) -> "WeightsRef":
        """This reference with what building the model found out: the weights' name, the file's hash."""
        return replace(self, tag=tag or self.tag, sha256=sha256 or self.sha256)

    @property
    def is_random(self) -> bool:
        return self.kind == "none"

    @property
    def cli_value(self) -> str:
        """The ``--weights`` value that builds these weights again."""
        if self.kind == "file":
            if not self.path:
                raise UserError("the weights file these features came from was not recorded; pass it with "
                                "--weights PATH")
            return self.path
        return "imagenet" if self.kind == "pretrained" else "none"

    @property
    def source(self) -> str:
        """What a cache records so the backbone can be rebuilt: imagenet, none, or the file's absolute path."""
        return str(Path(self.path).resolve()) if self.kind == "file" else self.cli_value

    @property
    def short(self) -> str:
        """A file-name word: imagenet, random, or the weights file's stem."""
        if self.kind == "file":
            return Path(self.path).stem if self.path else "file"
        return "imagenet" if self.kind == "pretrained" else "random"

    @property
    def file_tag(self) -> str:
        """The word cache and run names carry for these weights: imagenet, none, or the weights file's stem and
        a digest of its absolute path, so two ``best.pt`` files from two runs name two caches."""
        if self.kind == "file" and self.path:
            where = hashlib.sha256(str(Path(self.path).resolve()).encode()).hexdigest()[:8]
            return f"{self.short}-{where}"
        return "none" if self.is_random else self.short

    def words(self) -> str:
        """In words for a report; random init says so plainly, because its numbers mean something else."""
        if self.kind == "none":
            return f"random init (seed {self.seed})"
        if self.kind == "file":
            return f"weights file, SHA-256 {self.sha256[:12]}" if self.sha256 else f"weights file {self.path}"
        if self.library == "torchvision":
            return f"ImageNet ({self.tag})"
        return f"{self.library} pretrained ({self.tag})"
