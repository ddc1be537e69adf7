"""Sending many files: the engine behind ``dimse-async send``.

Proposes only the presentation contexts the files need (each file's own transfer
syntax, plus uncompressed syntaxes for transcoding), spreads the files over one or
more associations and pipelines C-STOREs within each association's window. Files
are read and checked in a worker thread ahead of the senders, within a byte budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ..contexts import FileInfo, inspect_file, plan_contexts
from ..exceptions import AssociationError
from ..lazy_dataclass import dataclass
from ..status import Status, StatusCategory
from .store_scu import PreparedFile, prepare_file

if TYPE_CHECKING:
    from ..ae import AE

__all__ = ["SendReport", "SendResult", "collect_files", "send_files"]


_RETRIES = 3  # associations in a row that may end before one more file is answered


@dataclass(slots=True)
class SendResult:
    """One file's outcome: the response status, or why it was not sent."""

    path: str
    size: int
    status: Status | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status.category in (StatusCategory.SUCCESS, StatusCategory.WARNING)


@dataclass
class SendReport:
    """The outcome of :func:`send_files`: one result per file and the seconds it took."""

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


#: Bytes of prepared data sets held ahead of the senders (each file read whole is at
#: most :data:`~dimse_async.services.store_scu.READ_WHOLE`; larger ones stay on disk).
READ_AHEAD_BYTES = 16 << 20
_BATCH_BYTES = 2 << 20  # read at most about this much per worker-thread hop
_BATCH_FILES = 16


def _scan(paths: list[str]) -> list[FileInfo | str]:
    """Each file's SOP class and transfer syntax from its file meta (to plan the contexts)."""
    return [inspect_file(p) for p in paths]


def _prepare_some(items: list[FileInfo], check: bool) -> list[PreparedFile | str | None]:
    """Prepare files from the start of ``items`` until about :data:`_BATCH_BYTES` are read.
    Blocking: runs in a worker thread. A string is why a file cannot be sent."""
    out: list[PreparedFile | str | None] = []
    read = 0
    for it in items:
        try:
            got = prepare_file(it.path, check=check)
        except ValueError as exc:
            out.append(str(exc))
        except OSError as exc:
            out.append(f"cannot read: {exc}")
        else:
            out.append(got)
            if got is not None and got.dataset is not None:
                read += len(got.dataset)
        if read >= _BATCH_BYTES:
            break
    return out


_Entry = tuple[FileInfo, "PreparedFile | str | None"]


class _Feed:
    """The files in order, read and checked ahead in a worker thread (bounded by
    :data:`READ_AHEAD_BYTES`), so the event loop never waits on the disk for them."""

    def __init__(self, items: list[FileInfo], check: bool):
        self.items = items
        self.check = check
        self.unclaimed = len(items)  # entries no consumer has claimed yet
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue()
        self._buffered = 0
        self._room = asyncio.Event()
        self._produced = 0  # items[:_produced] are in the queue or taken
        self._taken = 0
        self._task = asyncio.ensure_future(self._produce())

    @staticmethod
    def _size(entry: _Entry) -> int:
        got = entry[1]
        return len(got.dataset) if isinstance(got, PreparedFile) and got.dataset is not None else 0

    async def _produce(self) -> None:
        batch = 1  # the first file as soon as possible, then larger hops
        try:
            while self._produced < len(self.items):
                while self._buffered >= READ_AHEAD_BYTES:
                    self._room.clear()
                    await self._room.wait()
                chunk = self.items[self._produced : self._produced + batch]
                results = await asyncio.to_thread(_prepare_some, chunk, self.check)
                for it, got in zip(chunk, results):
                    entry = (it, got)
                    self._buffered += self._size(entry)
                    self._queue.put_nowait(entry)
                self._produced += len(results)
                batch = min(batch * 2, _BATCH_FILES)
        except Exception as exc:  # an unexpected failure: every file left is reported with it
            for it in self.items[self._produced :]:
                self._queue.put_nowait((it, f"cannot read: {exc!r}"))
            self._produced = len(self.items)

    def claim(self) -> bool:
        """Reserve the next entry for the caller (False: none left)."""
        if self.unclaimed == 0:
            return False
        self.unclaimed -= 1
        return True

    async def take(self) -> _Entry:
        """The entry a :meth:`claim` reserved."""
        entry = await self._queue.get()
        self._taken += 1
        self._buffered -= self._size(entry)
        self._room.set()
        return entry

    async def close(self, reason: str = "not sent") -> list[FileInfo]:
        """Stop reading ahead; the files nobody has claimed. A claim still waiting gets
        its file with ``reason`` as the error."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        left: list[FileInfo] = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait()[0])
        left.extend(self.items[self._produced :])
        self._produced = len(self.items)
        waiting = len(self.items) - self.unclaimed - self._taken
        for it in left[:waiting]:
            self._queue.put_nowait((it, reason))
        self.unclaimed = 0
        return left[waiting:]


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
    check: bool = True,
) -> SendReport:
    """C-STORE every file; never raises for a single instance, reports it instead.

    The contexts are planned from the files' meta; then each file is read and (with
    ``check``) its data set walked to the end in a worker thread, ahead of the
    senders: a file that is not what it claims is reported, not sent (a peer would
    abort the association on it).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = SendReport()

    def record(res: SendResult) -> None:
        report.results.append(res)
        if progress:
            progress(res)

    items: list[FileInfo] = []
    for p, got in zip(paths, await asyncio.to_thread(_scan, paths)):
        if isinstance(got, str):
            record(SendResult(p, 0, error=got))
        else:
            items.append(got)
    if not items:
        report.seconds = loop.time() - started
        return report
    specs = plan_contexts(items)
    feed = _Feed(items, check)

    async def one_association() -> bool:
        """Send from the feed until it is empty (True) or the association ends (False)."""
        async with ae.associate(
            host, port, called_ae, contexts=specs, async_ops=(window, 1), ssl=ssl, server_hostname=server_hostname
        ) as assoc:

            async def worker() -> None:
                while assoc.is_established and feed.claim():
                    it, got = await feed.take()
                    if isinstance(got, str):
                        record(SendResult(it.path, it.size, error=got))
                        continue
                    try:
                        status = await assoc.c_store(it.path if got is None else got)
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
        while feed.unclaimed:
            before = len(report.results)
            error = "association ended before a response"
            try:
                if await one_association():
                    return
            except AssociationError as exc:
                error = str(exc)
            idle = idle + 1 if len(report.results) == before else 0
            if idle >= _RETRIES:
                for it in await feed.close(error):
                    record(SendResult(it.path, it.size, error=error))
                return

    try:
        await asyncio.gather(*(sender() for _ in range(max(1, associations))))
    finally:
        await feed.close()
    report.seconds = loop.time() - started
    return report
