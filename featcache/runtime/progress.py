"""A rich progress bar that counts images and shows images/s."""

from __future__ import annotations

import contextlib

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from featcache.runtime.console import get_console


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("- img/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:,.1f} img/s", style="progress.data.speed")


@contextlib.contextmanager
def image_progress(total: int, description: str, *, enabled: bool = True):
    """Yield ``advance(n)``; draws a bar with images/s when ``enabled``."""
    if not enabled:
        yield lambda n: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=get_console(),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
