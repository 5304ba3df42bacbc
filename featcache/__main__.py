"""``python -m featcache`` (also what ``torchrun -m featcache`` runs)."""

from featcache.cli import entry

entry()
