"""Sending many files: the engine behind ``dimse-async send``.

Proposes only the presentation contexts the files need (each file's own transfer
syntax, plus uncompressed syntaxes for transcoding), spreads the files over one or
more associations and pipelines C-STOREs within each association's window.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..contexts import FileInfo, inspect_file, plan_contexts
from ..exceptions import AssociationError
from ..status import Status, StatusCategory

if TYPE_CHECKING:
    from ..ae import AE

__all__ = ["SendReport", "SendResult", "collect_files", "send_files"]


_RETRIES = 3  # associations in a row that may end before one more file is answered


@dataclass(slots=True)
class SendResult:
    path: str
    size: int
    status: Status | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status.category in (StatusCategory.SUCCESS, StatusCategory.WARNING)


@dataclass
class SendReport:
    results: list[SendResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[SendResult]:
        return [r for r in self.results if not r.ok]

    @property
    def bytes_sent(self) -> int:
        return sum(r.size for r in self.results if r.ok)


def collect_files(paths: Iterable[str], recurse: bool) -> list[str]:
    """Expand the command-line paths; directories need ``recurse``."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            if not recurse:
                raise ValueError(f"{p} is a directory: use --recurse")
            for root, dirs, files in os.walk(p):
                dirs.sort()
                out.extend(os.path.join(root, f) for f in sorted(files))
        else:
            out.append(p)
    return out


async def _inspect_all(
    paths: list[str], report: SendReport, progress: Callable[[SendResult], None] | None
) -> list[FileInfo]:
    """The files that can be sent; each unreadable one is reported as failed at once."""
    items: list[FileInfo] = []
    for p in paths:
        got = await asyncio.to_thread(inspect_file, p, check=True)
        if isinstance(got, str):
            failed = SendResult(p, 0, error=got)
            report.results.append(failed)
            if progress:
                progress(failed)
        else:
            items.append(got)
    return items


async def send_files(
    ae: AE,
    host: str,
    port: int,
    called_ae: str,
    paths: list[str],
    *,
    associations: int = 1,
    window: int = 1,
    progress: Callable[[SendResult], None] | None = None,
    ssl: Any = None,
    server_hostname: str | None = None,
) -> SendReport:
    """C-STORE every file; never raises for a single instance, reports it instead."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = SendReport()
    items = await _inspect_all(paths, report, progress)
    if not items:
        report.seconds = loop.time() - started
        return report
    specs = plan_contexts(items)
    queue: asyncio.Queue[FileInfo] = asyncio.Queue()
    for it in items:
        queue.put_nowait(it)

    def record(res: SendResult) -> None:
        report.results.append(res)
        if progress:
            progress(res)

    async def one_association() -> bool:
        """Send from the queue until it is empty (True) or the association ends (False)."""
        async with ae.associate(
            host, port, called_ae, contexts=specs, async_ops=(window, 1), ssl=ssl, server_hostname=server_hostname
        ) as assoc:

            async def worker() -> None:
                while not queue.empty() and assoc.is_established:
                    it = queue.get_nowait()
                    try:
                        status = await assoc.c_store(it.path)
                        record(SendResult(it.path, it.size, status=status))
                    except AssociationError as exc:
                        record(SendResult(it.path, it.size, error=str(exc)))
                    except (OSError, ValueError) as exc:
                        record(SendResult(it.path, it.size, error=f"{type(exc).__name__}: {exc}"))

            await asyncio.gather(*(worker() for _ in range(max(1, window))))
            return assoc.is_established

    async def sender() -> None:
        # A peer abort ends one association, not the batch: the rest goes on a new one,
        # until _RETRIES associations in a row answer nothing.
        idle = 0
        while not queue.empty():
            before = len(report.results)
            error = "association ended before a response"
            try:
                if await one_association():
                    return
            except AssociationError as exc:
                error = str(exc)
            idle = idle + 1 if len(report.results) == before else 0
            if idle >= _RETRIES:
                while not queue.empty():
                    it = queue.get_nowait()
                    record(SendResult(it.path, it.size, error=error))
                return

    await asyncio.gather(*(sender() for _ in range(max(1, associations))))
    report.seconds = loop.time() - started
    return report
