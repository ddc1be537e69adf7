"""File work of the storage SCP (PS3.4 B.2.3: success only once stored).

A :class:`FileWriter` is an association's writer: its jobs run in order in one of a
few threads shared by all associations (started on first use, ended after a few idle
seconds): file creation, ``os.writev`` of the received fragments, ``fsync`` and
rename run there, one thread hop per instance. :func:`write_file` is the job that
places one instance; :class:`GroupCommit` batches the directory ``fsync`` of durable
stores done at about the same time into one (group commit), so concurrent durable
stores share it.

A small instance (not durable) may instead be placed on the event loop itself by
:func:`write_file_inline` (a new temporary file, ``writev``, rename: no thread hop, no
wake-ups), as long as :class:`InlineWrites` finds such writes fast; a slow one sends
the following ones to the writer thread for a while, so a slow disk never stalls the
other associations for long.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from queue import Empty, SimpleQueue
from typing import Any, Protocol, TypeVar

__all__ = [
    "FileWriter",
    "GroupCommit",
    "InlineWrites",
    "group_commit",
    "make_dirs",
    "sync_file",
    "write_file",
    "write_file_inline",
    "writev_all",
]

T = TypeVar("T")

_IDLE_EXIT = 2.0  # seconds without work before a thread ends (a later job starts another)
_IOV_MAX = 1024  # buffers per writev call (Linux IOV_MAX)
_BATCH = 256 << 10  # bytes per writev call at most (unless one chunk is larger)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class _Worker:
    """One thread running file jobs in order, for any loop; ends after a few idle seconds."""

    __slots__ = ("_queue", "_thread", "_lock", "name")

    def __init__(self, name: str):
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.name = name

    def put(
        self,
        item: tuple[FileWriter, asyncio.AbstractEventLoop, _Result | None, Callable[..., Any], tuple[Any, ...]],
    ) -> None:
        self._queue.put(item)
        with self._lock:  # against the thread ending idle at this moment
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        queue = self._queue
        while True:
            try:
                owner, loop, fut, fn, args = queue.get(timeout=_IDLE_EXIT)
            except Empty:
                with self._lock:  # idle: end; a job queued meanwhile starts a new thread
                    if queue.empty():
                        self._thread = None
                        return
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting side
                owner.finished += 1
                if fut is not None:
                    _deliver(loop, fut, None, exc)
                del owner, loop, fut, fn, args
                continue
            owner.finished += 1  # only this thread counts an owner's jobs (one thread per owner)
            if fut is not None:
                _deliver(loop, fut, result, None)
            # Not kept while waiting for the next job: the fragments written are views
            # into receive buffers, reused once nothing refers to them (pdu.BufferPool).
            del owner, loop, fut, fn, args, result


_POOL_SIZE = 4  # writer threads shared by every association of the process
_pool = [_Worker("dimse-async-writer") for _ in range(_POOL_SIZE)]
_next_worker = itertools.count()


class FileWriter:
    """An association's file writer: its jobs run in order, in one of a few threads
    shared by all associations (each association keeps to one of them, so its own
    jobs never overlap or reorder); results come back as futures on ``loop``.

    ``submit`` costs one queue put; the thread hands each result back with one
    ``call_soon_threadsafe``. Threads start on first use and end after a few idle
    seconds, so idle associations hold none.
    """

    __slots__ = ("_loop", "_worker", "submitted", "finished")

    def __init__(self, loop: asyncio.AbstractEventLoop, worker: _Worker | None = None):
        self._loop = loop
        self._worker = worker if worker is not None else _pool[next(_next_worker) % _POOL_SIZE]
        #: Jobs handed to the thread so far.
        self.submitted = 0
        #: Jobs the thread has run to their end (counted there, before the result is handed back).
        self.finished = 0

    @property
    def busy(self) -> bool:
        """Whether a job handed to the thread has not run to its end yet (file work
        done elsewhere now could overtake it)."""
        return self.submitted != self.finished

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in the writer's thread; the future resolves on the loop."""
        fut: asyncio.Future[T] = self._loop.create_future()
        self.submitted += 1
        self._worker.put((self, self._loop, fut, fn, args))
        return fut

    def submit_then(self, then: Callable[[Any, BaseException | None], None], fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the writer's thread, then ``then(result, exception)`` on
        the loop: no future, and the callback runs in the loop pass that takes the
        result (a future's done callbacks would wait for the next)."""
        self.submitted += 1
        self._worker.put((self, self._loop, _Then(then), fn, args))

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the thread, nobody waiting (errors ignored)."""
        self.submitted += 1
        self._worker.put((self, self._loop, None, fn, args))

    def close(self) -> None:
        """Nothing to stop: the shared thread ends by itself once idle."""


class _Result(Protocol):
    """Where a job's outcome goes: a future on the loop, or a :class:`_Then`."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exc: BaseException, /) -> None: ...


class _Then:
    """A job's outcome handed straight to a callback (see :meth:`FileWriter.submit_then`)."""

    __slots__ = ("_then",)

    def __init__(self, then: Callable[[Any, BaseException | None], None]):
        self._then = then

    def done(self) -> bool:
        return False

    def set_result(self, result: Any, /) -> None:
        self._then(result, None)

    def set_exception(self, exc: BaseException, /) -> None:
        self._then(None, exc)


def _deliver(loop: asyncio.AbstractEventLoop, fut: _Result, result: Any, exc: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, fut, result, exc)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


def _settle(fut: _Result, result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def writev_all(fd: int, chunks: Sequence[bytes | bytearray | memoryview]) -> int:
    """Write every chunk to ``fd``: small neighbours together with ``writev``, each
    large one with its own ``write`` (a multi-megabyte ``writev`` costs the kernel
    several times more per byte than the same bytes in ~256 KiB writes)."""
    if 1 < len(chunks) <= _IOV_MAX:  # the usual small instance: one writev writes it all
        size = sum(map(len, chunks))
        if size <= _BATCH:
            n = os.writev(fd, chunks)
            if n == size:
                return n
            return n + _write_batch(fd, _after(chunks, n))  # a short write: the rest
    total = 0
    batch: list[Any] = []
    size = 0
    for chunk in chunks:
        n = len(chunk)
        if not n:
            continue
        if batch and (size + n > _BATCH or len(batch) >= _IOV_MAX):
            total += _write_batch(fd, batch)
            batch, size = [], 0
        batch.append(chunk)
        size += n
    if batch:
        total += _write_batch(fd, batch)
    return total


def _after(chunks: Sequence[bytes | bytearray | memoryview], n: int) -> list[Any]:
    """What is left of ``chunks`` once their first ``n`` bytes are written."""
    rest: list[Any] = []
    for chunk in chunks:
        size = len(chunk)
        if n >= size:
            n -= size
            continue
        rest.append(memoryview(chunk).cast("B")[n:] if n else chunk)
        n = 0
    return rest


def _write_batch(fd: int, batch: list[Any]) -> int:
    total = 0
    if len(batch) == 1:
        view = memoryview(batch[0]).cast("B")
        while view:
            n = os.write(fd, view)
            total += n
            view = view[n:]
        return total
    while batch:
        n = os.writev(fd, batch)
        total += n
        i = 0
        while i < len(batch) and n >= len(batch[i]):
            n -= len(batch[i])
            i += 1
        del batch[:i]
        if n:
            batch[0] = memoryview(batch[0]).cast("B")[n:]
    return total


def make_dirs(directory: str) -> list[str]:
    """Create ``directory`` and missing parents; the directories whose entries changed
    (the parents of those created), to fsync for a durable store."""
    created: list[str] = []
    path = directory
    while path and not os.path.isdir(path):
        created.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    os.makedirs(directory, exist_ok=True)
    return [os.path.dirname(p) or "." for p in created]


def write_file(dest: str, chunks: Sequence[bytes | bytearray | memoryview], durable: bool) -> list[str]:
    """Write ``chunks`` to ``dest`` atomically: a new ``.partial`` file, written,
    (fsynced,) then renamed over ``dest``. Creates the directory if missing. In the writer
    thread. Returns the directories created on the way's parents (see :func:`make_dirs`).

    The temporary file is created here (``O_EXCL``): when ``dest.partial`` is taken (the
    same instance being written by another association or process, or anything else
    under that name) a name of its own is used, so two writers never share a file."""
    created: list[str] = []
    try:
        fd, tmp = _create_partial(dest)
    except FileNotFoundError:
        created = make_dirs(os.path.dirname(dest) or ".")
        fd, tmp = _create_partial(dest)
    _fill_and_place(fd, tmp, dest, chunks, durable)
    return created


def _fill_and_place(
    fd: int, tmp: str, dest: str, chunks: Sequence[bytes | bytearray | memoryview], durable: bool
) -> None:
    """Write ``chunks`` to the new file ``fd`` named ``tmp``, (fsync,) close, rename it
    over ``dest``; on any failure the temporary file is removed and the error raised."""
    try:
        try:
            writev_all(fd, chunks)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_partial_names = itertools.count()


def _create_partial(dest: str) -> tuple[int, str]:
    """A new temporary file for ``dest``: ``dest.partial``, else ``dest.<pid>-<n>.partial``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
    tmp = f"{dest}.partial"
    while True:
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            tmp = f"{dest}.{os.getpid()}-{next(_partial_names)}.partial"


def write_file_inline(dest: str, chunks: Sequence[bytes | bytearray | memoryview]) -> bool:
    """Place a small instance at ``dest`` from the calling thread (the event loop): a
    new ``.partial`` file (``O_EXCL``: created here, so a regular file nobody else
    writes, never a FIFO or a link), written, then renamed over ``dest``, so ``dest``
    only ever names a complete file. On failure the temporary file is removed and the
    error raised (PS3.4 B.2.3: a failure status, nothing half-written left).

    ``False``, nothing done: the temporary name is taken or the directory is missing;
    :func:`write_file` in the writer thread deals with those.
    """
    tmp = f"{dest}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666)
    except (FileExistsError, FileNotFoundError):
        return False
    _fill_and_place(fd, tmp, dest, chunks, False)
    return True


try:
    import resource as _resource
except ImportError:  # pragma: no cover - not on Windows
    _resource = None  # type: ignore[assignment]
# Linux: the calling thread's voluntary context switches; where it is missing, an
# inline write is judged by its wall time alone.
_RUSAGE_THREAD: int | None = getattr(_resource, "RUSAGE_THREAD", None)


def _thread_usage() -> tuple[float, int] | None:
    """The calling thread's CPU seconds (``CLOCK_THREAD_CPUTIME_ID``: exact; getrusage's
    lags up to a scheduler tick) and voluntary context switches so far."""
    if _RUSAGE_THREAD is None:  # pragma: no cover
        return None
    return time.thread_time(), _resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


class InlineWrites:
    """When a small instance is written on the event loop (:func:`write_file_inline`)
    instead of in the writer thread.

    Up to ``max_size`` bytes, while such writes stay fast: the file work is then
    cheaper than the two thread hand-offs it saves (queue, wake-ups, context switches).
    They count as slow when their moving average (over about the last 8) exceeds
    ``slow`` seconds or one takes more than ``stall``: the following writes then go to
    the thread for ``backoff`` seconds. The first write after that pause is judged
    alone: fast, inline writes resume; slow, the next pause is twice as long (up to
    ``max_backoff``). So a slow or stalled disk holds the loop for a few writes, then
    for at most one per pause.

    The defaults: creating a 39 KB file took 1.1-1.3 ms (median), 4.5-9 ms (99th
    percentile) and up to 20 ms on a loaded 2-core VM; a disk is slow when that is
    the usual time, not when the scheduler delays one write.

    A write is timed by :meth:`start` / :meth:`done`: its wall time when the thread
    slept during it (it waited for the disk, a lock, memory: the loop stalled), else
    its CPU time. A thread that never slept was only ever running or waiting for a
    CPU; on a machine busier than its cores that wait is the scheduler's, it would
    delay the thread path as much, and it says nothing of the disk (8 senders on 2
    cores among other work made preempted writes look 5-50 ms slow and sent half the
    instances to the thread). Telling the two apart costs four system calls, so it is
    done only for the ``watch`` writes after one whose wall time exceeded a quarter
    of ``slow``; writes that stay fast are timed by the clock alone.
    """

    __slots__ = (
        "max_size",
        "slow",
        "stall",
        "backoff",
        "max_backoff",
        "watch",
        "_avg",
        "_until",
        "_pause",
        "_watching",
        "writes",
        "pauses",
    )

    def __init__(
        self,
        max_size: int = 256 << 10,
        slow: float = 0.005,
        stall: float = 0.05,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        watch: int = 64,
    ):
        self.max_size = max_size
        self.slow = slow
        self.stall = stall
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.watch = watch
        self._watching = 0  # writes left to time by CPU and sleep, not the clock alone
        self._avg = 0.0  # moving average of the inline writes' durations
        self._until = 0.0  # paused until then (monotonic clock); 0: not paused
        self._pause = backoff
        #: Inline writes tried, and pauses started (for tests and the benchmark).
        self.writes = 0
        self.pauses = 0

    def allowed(self, size: int) -> bool:
        """Whether an instance of ``size`` bytes may be written on the loop now."""
        return size <= self.max_size and (not self._until or time.monotonic() >= self._until)  # writable(), inlined

    def writable(self) -> bool:
        """Whether writes go on the loop now (not paused after slow ones): for the
        pieces of a large instance written as they arrive (``services.spool``)."""
        return not self._until or time.monotonic() >= self._until

    def start(self) -> tuple[float, tuple[float, int] | None]:
        """Before an inline write: what :meth:`done` measures it from."""
        return time.perf_counter(), _thread_usage() if self._watching else None

    def done(self, mark: tuple[float, tuple[float, int] | None]) -> None:
        """After the inline write begun at ``mark``: :meth:`took` its duration."""
        wall = time.perf_counter() - mark[0]
        before = mark[1]
        if before is None and wall <= self.slow / 4 and not self._until:
            # The usual write, fast and not watched: took(wall), inlined (per small instance).
            self.writes += 1
            avg = self._avg = self._avg + (wall - self._avg) * 0.125
            if avg > self.slow or wall > self.stall:
                self._back_off()
            return
        seconds = wall
        if before is not None:
            self._watching -= 1
            after = _thread_usage()
            if after is not None and after[1] == before[1]:
                seconds = min(wall, after[0] - before[0])  # never slept: its CPU time
        if wall > self.slow / 4:
            self._watching = self.watch
        self.took(seconds)

    def took(self, seconds: float) -> None:
        """An inline write (allowed just before) took ``seconds``."""
        self.writes += 1
        if self._until:  # the first one after a pause
            if seconds <= self.slow:
                self._until, self._pause, self._avg = 0.0, self.backoff, seconds
            else:
                self._back_off()
            return
        avg = self._avg = self._avg + (seconds - self._avg) * 0.125
        if avg > self.slow or seconds > self.stall:
            self._back_off()

    def _back_off(self) -> None:
        self.pauses += 1
        self._until = time.monotonic() + self._pause
        self._pause = min(self._pause * 2, self.max_backoff)


def sync_file(path: str) -> None:
    """``fsync`` an existing file by name (in the writer thread)."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dirs(directories: list[str]) -> None:
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class GroupCommit:
    """Durable renames: the directory ``fsync`` that makes a renamed file's name
    survive a crash, shared by every store that asks while one is under way.

    A store that renamed its (fsynced) file awaits :meth:`sync` of the directory; the
    first caller starts a round; callers arriving during a round wait for the next,
    which covers all of them with one ``fsync`` per directory. So N concurrent
    durable stores cost about N file ``fsync`` calls (in their writers, run in
    parallel) plus a few directory ones, not 2N.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._writer = FileWriter(loop, _Worker("dimse-async-commit"))
        self._next: dict[str, list[asyncio.Future[None]]] = {}
        self._running = False
        #: Rounds run and directory syncs waited for (for the benchmark and tests).
        self.rounds = 0
        self.waiters = 0

    async def sync(self, directory: str) -> None:
        """Return once ``directory`` was fsynced after this call started."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next.setdefault(directory, []).append(fut)
        self.waiters += 1
        if not self._running:
            self._start_round()
        await fut

    def _start_round(self) -> None:
        batch, self._next = self._next, {}
        self._running = True
        self.rounds += 1
        done = self._writer.submit(_sync_dirs, list(batch))
        done.add_done_callback(lambda f: self._round_done(f, batch))

    def _round_done(self, done: asyncio.Future[None], batch: dict[str, list[asyncio.Future[None]]]) -> None:
        exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
        for waiters in batch.values():
            for fut in waiters:
                if not fut.done():
                    if exc is not None:
                        fut.set_exception(exc)
                    else:
                        fut.set_result(None)
        self._running = False
        if self._next:
            self._start_round()


_commits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommit] = weakref.WeakKeyDictionary()


def group_commit() -> GroupCommit:
    """The running loop's :class:`GroupCommit` (one per loop, made on first use)."""
    loop = asyncio.get_running_loop()
    commit = _commits.get(loop)
    if commit is None:
        commit = _commits[loop] = GroupCommit(loop)
    return commit
