"""Where a received C-STORE data set goes while it arrives (PS3.4 B.2.3 SCP behaviour).

A :class:`Spool` keeps fragments in memory up to a threshold, then in a ``.partial``
temporary file created and written by the association's file writer thread (never on
the event loop); reading pauses while the disk lags. It is the sink the AE's factory hands to an association (see
``services.storage.make_spool``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from collections.abc import Callable
from typing import Any

from ..filewriter import FileWriter, writev_all
from ..status import Status

__all__ = ["Spool"]

_FLUSH_CHUNK = 512 << 10  # write to disk in pieces of at least this size
_HIGH_WATER = 8 << 20  # pause reading while this much waits for the disk
_LOW_WATER = 2 << 20


def _nothing() -> None:
    return None


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Spool:
    """Receives one C-STORE data set; holds ``header`` (Part 10 meta) + data set bytes.

    Received fragments are kept as they came (views into the received PDUs, no copy).
    Up to ``threshold`` bytes stay in memory; past it they go to a ``.partial``
    temporary file in ``directory``, created and written in ``writer``'s thread (a
    worker thread of the default executor without one): no file work on the event loop. While more than ``_HIGH_WATER`` bytes wait for the disk,
    ``pause`` is called to stop reading the socket; ``resume`` when the writer catches
    up. :meth:`discard` never closes or removes the file under a running write: the
    writer does it when that write returns.
    """

    def __init__(
        self,
        header: bytes,
        *,
        threshold: int,
        directory: str | None,
        pause: Callable[[], None],
        resume: Callable[[], None],
        writer: FileWriter | None = None,
    ):
        self._chunks: list[bytes | memoryview] = [header]
        self._pending = len(header)  # bytes in _chunks
        self.header_length = len(header)
        self.size = 0
        self.threshold = threshold
        self.directory = directory
        self.path: str | None = None
        self._fd: int | None = None
        self.writer = writer
        self._spilling = False  # past the threshold: bytes go to the file
        self._flusher: asyncio.Task[None] | None = None
        self._in_thread: asyncio.Future[None] | None = None  # the file operation running in a worker thread
        self._discarded = False
        self._pause, self._resume = pause, resume
        self._paused = False
        #: The OSError that made the spool fail (disk full, permissions), if any.
        self.error: OSError | None = None
        #: Set when the request is refused before its data set arrives: the bytes are
        #: counted and dropped, and this status answers it.
        self.refusal: Status | None = None
        #: Set when the request's SOP Class and Instance UIDs were checked as it arrived.
        self.uids_valid = False
        #: A write of the spool's that failed, as the writer thread saw it.
        self.write_error: OSError | None = None
        self._handed_off = False  # some bytes went to the writer thread

    @classmethod
    def refused(cls, status: Status) -> Spool:
        """A spool that keeps nothing: the data set is drained and ``status`` answers."""
        spool = cls(b"", threshold=0, directory=None, pause=_nothing, resume=_nothing)
        spool.refusal = status
        spool._chunks, spool._pending = [], 0
        return spool

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        self.size += n
        if self.error is not None or self.refusal is not None or self._discarded:
            return  # failed or refused: count, drop, and answer with a failure status
        self._chunks.append(data)
        self._pending += n
        if not self._spilling:
            if self._pending <= self.threshold:
                return
            self._spilling = True
        if self._flusher is None and self._pending >= _FLUSH_CHUNK:
            self._flusher = asyncio.ensure_future(self._flush())
        if self._pending >= _HIGH_WATER and not self._paused:
            self._paused = True
            self._pause()

    def _open(self) -> int:
        """Create the ``.partial`` file (in the writer thread)."""
        directory = self.directory or tempfile.gettempdir()
        try:
            fd, self.path = tempfile.mkstemp(prefix=".incoming-", suffix=".partial", dir=directory)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            fd, self.path = tempfile.mkstemp(prefix=".incoming-", suffix=".partial", dir=directory)
        return fd

    def _write_chunks(self, chunks: list[bytes | memoryview]) -> None:
        try:
            if self._fd is None:
                self._fd = self._open()
            writev_all(self._fd, chunks)
        except OSError as exc:
            self.write_error = exc  # for a later job of this spool (see :meth:`finish_job`)
            raise

    def take_rest(self) -> list[bytes | memoryview] | None:
        """For a spool past its threshold whose data set is complete: the bytes not
        handed to the writer yet, for :meth:`finish_job` (which must run next in
        ``writer``); reading resumes. ``None`` when it cannot be placed that way
        (failed, refused, discarded, or no writer)."""
        if self.writer is None or self.error is not None or self.refusal is not None or self._discarded:
            return None
        chunks, self._chunks, self._pending = self._chunks, [], 0
        self._unpause()
        return chunks

    def finish_job(self, rest: list[bytes | memoryview]) -> str | None:
        """In the writer thread, after the spool's earlier writes: write ``rest`` to the
        temporary file and close it; its path (still the spool's until moved, see
        ``services.storage``). ``None`` when no file was started: ``rest`` is then
        the whole instance. A failed earlier write is raised here."""
        if self.write_error is not None:
            raise self.write_error
        if self._fd is None:
            if self._handed_off:  # bytes went to a write that left no file: never answer success
                raise OSError(errno.EIO, "spool file missing")
            return None
        try:
            writev_all(self._fd, rest)
        finally:
            self._close(False)
        return self.path

    def _close(self, sync: bool) -> None:
        """Close the file, ``fsync`` first when ``sync`` (in the writer thread)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self._chunks, self._pending = [], 0
        self._unpause()

    def _unpause(self) -> None:
        if self._paused:
            self._paused = False
            self._resume()

    async def _thread(self, fn: Callable[..., None], *args: Any) -> None:
        """Run one file operation in the writer thread; a cancelled waiter does not stop
        it, and a discard during it is carried out when it returns."""
        if self.writer is not None:
            fut = self.writer.submit(fn, *args)
        else:
            fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._in_thread = fut
        fut.add_done_callback(self._thread_done)
        await asyncio.shield(fut)

    def _thread_done(self, fut: asyncio.Future[None]) -> None:
        self._in_thread = None
        if not fut.cancelled():
            fut.exception()  # the awaiting side reports it
        if self._discarded and self.writer is None:
            self._remove()

    async def _flush(self, final: bool = False) -> None:
        try:
            while (
                self._spilling
                and self.error is None
                and not self._discarded
                and (self._pending >= _FLUSH_CHUNK or (final and self._pending))
            ):
                chunks, self._chunks, self._pending = self._chunks, [], 0
                self._handed_off = True
                await self._thread(self._write_chunks, chunks)
                if self._pending < _LOW_WATER:
                    self._unpause()
        except OSError as exc:
            self._fail(exc)
        finally:
            if not final:
                self._flusher = None

    async def finish(self, sync: bool = False) -> None:
        """Wait until every byte received is in memory or on disk; close the file
        (after an ``fsync`` when ``sync``)."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._spilling:
            await self._flush(final=True)
            if self._fd is not None and not self._discarded:
                try:
                    await self._thread(self._close, sync)
                except OSError as exc:
                    self._fail(exc)
        self._unpause()

    @property
    def in_memory(self) -> bool:
        """Everything received is in memory, no file work pending (:meth:`finish` has nothing to do)."""
        return not self._spilling and self._flusher is None

    def chunks(self) -> list[bytes | memoryview]:
        """The in-memory part (header + data set) as received, without copying."""
        return self._chunks

    def memory(self) -> bytes:
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return bytes(self._chunks[0]) if self._chunks else b""

    def _unlink(self) -> None:
        path, self.path = self.path, None
        if path is not None:
            if self.writer is not None:
                self.writer.post(_unlink, path)
            else:
                _unlink(path)

    def _remove(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            if self.writer is not None:
                self.writer.post(_close_fd, fd)
            else:
                _close_fd(fd)
        self._unlink()

    def _remove_now(self) -> None:
        """Close and unlink the file (in the writer thread, after its running write)."""
        fd, self._fd = self._fd, None
        path, self.path = self.path, None
        if fd is not None:
            _close_fd(fd)
        if path is not None:
            _unlink(path)

    def discard(self) -> None:
        """Drop the spool and its temporary file (after aborts and failures).

        With a writer, one job closes and removes the file; it runs after the write
        under way, if any (a writer's jobs run in order), so whoever waits for the
        writer's queue to drain knows the file is gone. Without one, the name goes at
        once and the file is closed when no write runs in the worker thread.
        """
        if self._discarded:
            return
        self._discarded = True
        self._chunks, self._pending = [], 0
        self._unpause()
        if self.writer is not None:
            if self._in_thread is not None or self._fd is not None or self.path is not None:
                self.writer.post(self._remove_now)
            return
        self._unlink()  # one metadata operation; a running write carries on into the unlinked file
        if self._in_thread is None:
            self._remove()
