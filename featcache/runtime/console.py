"""Rich console shared by the CLI and the library's progress output."""

from __future__ import annotations

import functools

from rich.console import Console


@functools.cache
def get_console() -> Console:
    # One console per process so progress bars and tables interleave cleanly. soft_wrap: a sentence
    # is never cut into lines by rich (a path or a word broken at column 80 cannot be copied, and a
    # log piped to a file would keep those breaks); the terminal wraps long lines on screen.
    return Console(highlight=False, soft_wrap=True)


@functools.cache
def get_error_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def quiet_console() -> Console:
    """For the ranks of a distributed run other than 0: they work, rank 0 speaks."""
    return Console(quiet=True)
