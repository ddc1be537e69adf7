"""Where a received C-STORE data set goes while it arrives (PS3.4 B.2.3 SCP behaviour).

A :class:`Spool` keeps fragments in memory up to a threshold, then in a ``.partial``
temporary file created and written by the association's file writer thread (never on
the event loop); reading pauses while the disk lags. It is the sink the AE's factory
hands to an association (see ``services.storage.make_spool``).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import tempfile
from collections.abc import Callable
from typing import Protocol

from ..filewriter import FileWriter, InlineWrites, writev_all
from ..status import Status

__all__ = ["Spool", "remove_leftovers"]

_FLUSH_CHUNK = 1 << 20  # hand bytes to the writer in pieces of at least this size
_INLINE_MIN = 128 << 10  # write on the loop once this much is held ...
_INLINE_MAX = 1 << 20  # ... and never more than this at once (how long the loop waits)
_HIGH_WATER = 8 << 20  # pause reading while this much waits for the disk
_LOW_WATER = 2 << 20


class ReadingFlow(Protocol):
    """What pauses and resumes reading the socket (an association: ``DIMSEProvider``)."""

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...


def _nothing() -> None:
    return None


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


_spool_names = itertools.count()
try:
    import fcntl as _fcntl

    _flock: Callable[[int, int], None] | None = _fcntl.flock
    _LOCK_EX_NB = _fcntl.LOCK_EX | _fcntl.LOCK_NB
except ImportError:  # pragma: no cover - not on Windows
    _flock, _LOCK_EX_NB = None, 0
_SPOOL_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _create_spool_file(directory: str) -> tuple[int, str]:
    """A new file ``directory/.incoming-<pid>-<n>.partial``, as ``tempfile.mkstemp``
    makes one (``O_EXCL``: never an existing file or a link; mode 0600), without its
    per-call Python work (random names, path checks: ~10 us per instance); a name
    that is taken (a file left by an earlier process with this pid) falls back to it.
    The file is ``flock``-ed while its descriptor is open, so :func:`remove_leftovers`
    can tell a dead writer's file from a live one's."""
    if not os.path.isabs(directory):
        directory = os.path.abspath(directory)
    path = f"{directory}{os.sep}.incoming-{os.getpid()}-{next(_spool_names)}.partial"
    try:
        fd = os.open(path, _SPOOL_FLAGS, 0o600)
    except FileExistsError:
        fd, path = tempfile.mkstemp(prefix=".incoming-", suffix=".partial", dir=directory)
    if _flock is not None:
        try:
            _flock(fd, _LOCK_EX_NB)
        except OSError:  # a file system without locks: the pid in the name still tells
            pass
    return fd, path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: running
        return True
    return True


def remove_leftovers(directory: str, pid: int | None = None) -> int:
    """Remove the spool files process ``pid`` left in ``directory`` (a ``--workers N``
    worker killed mid-store; the caller knows it is gone): ``.incoming-<pid>-*.partial``
    that nobody holds locked (a live process of that pid on another machine sharing the
    directory holds its own). ``pid=None`` (at start-up, before any sibling process
    runs): those of every process that is not running here. Returns how many went.

    (A spool is locked while it is written; once its data set is complete it waits,
    closed, for the handler to move it: only a process known dead leaves such a file.)"""
    prefix = ".incoming-" if pid is None else f".incoming-{pid}-"
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".partial")):
            continue
        if pid is None:
            owner = name[len(prefix) :].split("-", 1)[0]
            if not owner.isdigit() or _running(int(owner)):
                continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if _flock is not None:
                _flock(fd, _LOCK_EX_NB)  # raises while a live writer holds it
            os.unlink(path)
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Spool:
    """Receives one C-STORE data set; holds ``header`` (Part 10 meta) + data set bytes.

    Received fragments are kept as they came (views into the received PDUs, no copy).
    Up to ``threshold`` bytes stay in memory; past it they go to a ``.partial``
    temporary file in ``directory``, created and written in ``writer``'s thread (the
    association's; one of the shared writer threads without one): no file work on the
    event loop. Every ``_FLUSH_CHUNK`` bytes become one write job, queued behind the
    earlier ones without waiting for them (the jobs of a writer run in order): no task,
    no future, and no wake-up of the loop per job; the thread calls back only when the
    loop has something to do (a failed write, reading to resume, :meth:`finish`
    waiting). While more than ``_HIGH_WATER`` bytes wait for the disk, ``pause`` is
    called to stop reading the socket; ``resume`` once the writer is below
    ``_LOW_WATER`` (with ``flow``, an association: its ``pause_reading("spool")`` and
    ``resume_reading("spool")`` instead). :meth:`discard` never closes or removes the file under a running
    write: the writer does it after the jobs queued before it.

    With ``inline`` (an :class:`~dimse_async.filewriter.InlineWrites` policy), bytes
    past the threshold are written on the event loop as they arrive, in pieces of
    ``_INLINE_MIN`` to ``_INLINE_MAX`` bytes, while such writes stay fast and nothing
    of the spool waits in the writer: the file is then nearly complete when the last
    fragment arrives, with no thread hand-off per piece (a writer thread taking the GIL
    back after each write from a busy loop fell behind, and the response waited for
    it). Slow writes send the following pieces to the writer thread, as above.
    """

    __slots__ = (
        "_chunks",
        "_pending",
        "header_length",
        "size",
        "threshold",
        "directory",
        "path",
        "_fd",
        "writer",
        "inline",
        "in_memory",
        "_queued",
        "_written",
        "_idle",
        "_loop",
        "_discarded",
        "_pause",
        "_resume",
        "_flow",
        "_paused",
        "error",
        "refusal",
        "uids_valid",
        "space_checked",
        "write_error",
        "_handed_off",
    )

    def __init__(
        self,
        header: bytes,
        threshold: int,
        directory: str | None,
        pause: Callable[[], None] | None,
        resume: Callable[[], None] | None,
        writer: FileWriter | None = None,
        inline: InlineWrites | None = None,
        flow: ReadingFlow | None = None,
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
        #: When pieces may be written on the loop (None: always in the writer thread).
        self.inline = inline
        #: Everything received is in memory, no file work pending (:meth:`finish` has
        #: nothing to do); ``False`` once past the threshold: bytes go to the file. (An
        #: attribute, not a property: read per instance by the C-STORE service.)
        self.in_memory = True
        # Bytes handed to write jobs (counted on the loop only) and written by them
        # (counted in the writer thread only): their difference waits for the disk.
        self._queued = 0
        self._written = 0
        self._idle: asyncio.Future[None] | None = None  # finish() waiting for every job
        self._loop: asyncio.AbstractEventLoop | None = None
        self._discarded = False
        # ``flow``: its pause_reading("spool") / resume_reading("spool") instead of
        # ``pause`` / ``resume`` (no two closures made per instance received).
        self._pause, self._resume, self._flow = pause or _nothing, resume or _nothing, flow
        self._paused = False
        #: The OSError that made the spool fail (disk full, permissions), if any.
        self.error: OSError | None = None
        #: Set when the request is refused before its data set arrives: the bytes are
        #: counted and dropped, and this status answers it.
        self.refusal: Status | None = None
        #: Set when the request's SOP Class and Instance UIDs were checked as it arrived.
        self.uids_valid = False
        #: The storage space found with room as the request's command arrived (see
        #: ``services.storage.make_spool``): not consulted again for it.
        self.space_checked: object = None
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
        if self.in_memory:
            if self._pending <= self.threshold:
                return
            self.in_memory = False
        pending = self._pending
        inline = self.inline
        if (
            inline is not None
            and _INLINE_MIN <= pending <= _INLINE_MAX
            and self._queued == self._written
            and inline.writable()
        ):
            self._write_inline(inline)
        elif pending >= _FLUSH_CHUNK:
            self._submit()

    def _write_inline(self, inline: InlineWrites) -> None:
        """Write the bytes held on the loop (nothing of the spool is in the writer), timed
        by ``inline``; a failure fails the spool as a failed write job would."""
        chunks = self._chunks
        self._chunks, self._pending = [], 0
        self._handed_off = True
        mark = inline.start()
        try:
            if self._fd is None:
                self._fd = self._open()
            writev_all(self._fd, chunks)
        except OSError as exc:
            self.write_error = exc
            self._fail(exc)
        finally:
            inline.done(mark)

    def _submit(self) -> None:
        """Queue the bytes held as one write job (on the loop); pause reading while too
        much waits for the disk."""
        chunks, n = self._chunks, self._pending
        self._chunks, self._pending = [], 0
        writer = self.writer
        if writer is None:
            self._loop = asyncio.get_running_loop()
            writer = self.writer = FileWriter(self._loop)
        elif self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._handed_off = True
        self._queued += n
        writer.post(self._write_job, chunks, n)
        if not self._paused and self._queued - self._written >= _HIGH_WATER:
            self._paused = True  # before the check below: see _write_job
            if self._flow is not None:
                self._flow.pause_reading("spool")
            else:
                self._pause()
            self._progress()  # the writer may have caught up meanwhile

    def _open(self) -> int:
        """Create the ``.partial`` file (on the loop or in the writer thread)."""
        directory = self.directory or tempfile.gettempdir()
        try:
            fd, self.path = _create_spool_file(directory)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            fd, self.path = _create_spool_file(directory)
        return fd

    def _write_job(self, chunks: list[bytes | memoryview], n: int) -> None:
        """One write job, in the writer thread. The loop is called back only when it has
        something to do; each flag is set on the loop before the check that follows it
        there, and read here after ``_written`` moved, so no call back is lost."""
        failed: OSError | None = None
        try:
            if self.write_error is None and not self._discarded:
                if self._fd is None:
                    self._fd = self._open()
                writev_all(self._fd, chunks)
        except OSError as exc:
            self.write_error = failed = exc  # for :meth:`finish_job` and the loop
        finally:
            self._written += n
        if (
            failed is not None
            or (self._paused and self._queued - self._written < _LOW_WATER)
            or (self._idle is not None and self._written == self._queued)
        ):
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._progress)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    def _progress(self) -> None:
        """On the loop: act on what the writer did (see :meth:`_write_job`)."""
        if self.write_error is not None and self.error is None:
            self._fail(self.write_error)
        backlog = self._queued - self._written
        if self._paused and backlog < _LOW_WATER:
            self._unpause()
        idle = self._idle
        if idle is not None and backlog == 0 and not idle.done():
            idle.set_result(None)

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
            if self._flow is not None:
                self._flow.resume_reading("spool")
            else:
                self._resume()

    async def finish(self, sync: bool = False) -> None:
        """Wait until every byte received is in memory or on disk; close the file
        (after an ``fsync`` when ``sync``)."""
        if not self.in_memory and self.error is None and not self._discarded:
            if self._pending:
                self._submit()
            if self._queued != self._written:
                self._idle = asyncio.get_running_loop().create_future()
                self._progress()  # the writer may be done already (see _write_job)
                await asyncio.shield(self._idle)
            if self.write_error is not None:
                self._fail(self.write_error)
            elif self._fd is not None and not self._discarded:
                assert self.writer is not None
                try:
                    await asyncio.shield(self.writer.submit(self._close, sync))
                except OSError as exc:
                    self._fail(exc)
        self._unpause()

    @property
    def file_started(self) -> bool:
        """The temporary file was created, and every write queued for it has run."""
        return self._fd is not None and self._queued == self._written

    @property
    def discarded(self) -> bool:
        """Dropped (:meth:`discard`): what it held is gone, nothing may be saved from it."""
        return self._discarded

    def chunks(self) -> list[bytes | memoryview]:
        """The in-memory part (header + data set) as received, without copying."""
        return self._chunks

    def memory(self) -> bytes:
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return bytes(self._chunks[0]) if self._chunks else b""

    def _remove_now(self) -> None:
        """Close and unlink the file (in the writer thread, after the jobs queued before)."""
        fd, self._fd = self._fd, None
        path, self.path = self.path, None
        if fd is not None:
            _close_fd(fd)
        if path is not None:
            _unlink(path)

    def discard(self) -> None:
        """Drop the spool and its temporary file (after aborts and failures).

        One job of the writer closes and removes the file; it runs after the jobs
        queued before it (a writer's jobs run in order; those not started write
        nothing once the spool is discarded), so whoever waits for the writer's queue
        to drain knows the file is gone.
        """
        if self._discarded:
            return
        self._discarded = True
        self._chunks, self._pending = [], 0
        self._unpause()
        idle = self._idle
        if idle is not None and not idle.done():
            idle.set_result(None)
        # Nothing to remove once every job ran and the file was closed and moved (the
        # usual end: see services.storage); a job still queued may yet create the file.
        if self.writer is None:  # only ever written on the loop: nothing can be running
            self._remove_now()
        elif self._queued != self._written or self._fd is not None or self.path is not None:
            self.writer.post(self._remove_now)
