"""Rich console shared by the CLI and the library's progress output."""

from __future__ import annotations

import functools

from rich.console import Console


@functools.cache
def get_console() -> Console:
    # One console per process so progress bars and tables interleave cleanly.
    return Console(highlight=False)


@functools.cache
def get_error_console() -> Console:
    return Console(stderr=True, highlight=False)


def quiet_console() -> Console:
    """For the ranks of a distributed run other than 0: they work, rank 0 speaks."""
    return Console(quiet=True)
