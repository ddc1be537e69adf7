"""Progress on a terminal (``rich``); nothing when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["Bar", "progress_bar"]


class Bar:
    """What commands report progress to: items done (of ``total``, if known) and bytes."""

    def __init__(self, progress: Any = None, task: Any = None):
        self._progress, self._task = progress, task
        self.done = 0
        self.bytes = 0

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        self.done += items
        self.bytes += nbytes
        if self._progress is not None:
            elapsed = self._progress.tasks[0].elapsed or 0.0
            rate = f"{self.bytes / elapsed / 1e6:.1f} MB/s" if self.bytes and elapsed > 0 else ""
            self._progress.update(self._task, advance=items, rate=rate)

    def update(self, *, done: int | None = None, total: int | None = None, description: str | None = None) -> None:
        if done is not None:
            self.done = done
        if self._progress is not None:
            fields: dict[str, Any] = {"completed": self.done}
            if total is not None:
                fields["total"] = total
            if description is not None:
                fields["description"] = description
            self._progress.update(self._task, **fields)


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None = None, unit: str = "", *, enabled: bool | None = None
) -> Iterator[Bar]:
    """A ``rich`` progress bar on stderr when it is a terminal (or ``enabled``)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total, rate="")
        yield Bar(progress, task)
