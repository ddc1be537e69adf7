"""The archive index database: a back end (:mod:`.backend`) chosen by the ``index``
setting - SQLite in the storage directory by default, or PostgreSQL for several
nodes - with the archive's writer threads and query threads, so the event loop never
waits on the database."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..inflate import DEFAULT_LIMITS, InflationLimits
from ..log import get_logger
from .backend import Backend, Connection, IndexRow
from .backend_pg import PostgreSQLBackend
from .backend_sqlite import SQLiteBackend

T = TypeVar("T")

log = get_logger()


#: What a C-STORE of a SOP Instance UID already stored does. ``keep``: the stored
#: instance stays; the same data set again is answered success, a different one
#: failure 0xA900. ``replace``: a complete, valid new instance replaces the stored one.
DUPLICATE_POLICIES = ("keep", "replace")

#: Threads running queries (each with a connection of its own) and how long one query
#: holds one before it takes its turn again (seconds; see ``IndexDB._read``).
QUERY_THREADS = 2
QUERY_SLICE = 0.05

#: URL schemes of a PostgreSQL index.
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def open_backend(root: Path, index: str | None, *, fsync: bool, shared: bool) -> Backend:
    """The back end for the ``index`` setting: ``None`` (or ``""``) is
    ``root/index.sqlite``; ``postgresql://user@host/db`` a PostgreSQL database."""
    if not index:
        return SQLiteBackend(root, fsync=fsync, shared=shared)
    if index.startswith(POSTGRESQL_SCHEMES):
        return PostgreSQLBackend(index, fsync=fsync)
    raise ValueError(f"index must be a postgresql:// URL (or absent for SQLite), not {index[:40]!r}")


def stored_file_problem(path: str, size: int | None) -> str | None:
    """``None`` when a stored file is there at the size indexed when it was stored (``size``,
    ``None``: not recorded); else why not. A file deleted or cut short since is never
    presented as the instance (retrieve, storage commitment)."""
    try:
        actual = os.stat(path).st_size
    except OSError as exc:
        return f"stored file unreadable: {exc.strerror or exc}: {path}"
    if size is not None and actual != size:
        return f"stored file is {actual} bytes, {size} when stored: {path}"
    return None


def instance_availability(path: str, size: int | None) -> str:
    """Instance Availability (0008,0056) of a stored instance (PS3.3 C.4.23.1.1): ONLINE
    when its file is there at the size it was stored at, else UNAVAILABLE (a retrieve
    fails its sub-operation: :func:`stored_file_problem`). One stat."""
    return "ONLINE" if stored_file_problem(path, size) is None else "UNAVAILABLE"


class IndexDB:
    """Files under ``root`` and the connections to their index (see the module)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        duplicates: str = "keep",
        fsync: bool = True,
        retrieve_ae_title: str | None = None,
        inflation_limits: InflationLimits = DEFAULT_LIMITS,
        query_max_matches: int = 50_000,
        query_time_budget: float = 60.0,
        retrieve_max_instances: int = 100_000,
        shared: bool = False,
        index: str | None = None,
        min_free_space: int = 1 << 20,
    ):
        if duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        #: What a C-STORE of an instance already stored does (see :data:`DUPLICATE_POLICIES`).
        self.duplicates = duplicates
        #: Flush each stored file and the index to the disk before answering success.
        self.fsync = fsync
        #: Retrieve AE Title (0008,0054) put in C-FIND responses; the serving AE's title.
        self.retrieve_ae_title = retrieve_ae_title
        #: How far a deflated instance may inflate; larger ones are refused on C-STORE
        #: (0xC000) and skipped by the re-index.
        self.inflation_limits = inflation_limits
        #: A C-FIND stops with 0xA700 (out of resources) past this many matches or
        #: seconds (the index keeps serving everyone else meanwhile).
        self.query_max_matches = query_max_matches
        self.query_time_budget = query_time_budget
        #: A C-GET / C-MOVE matching more instances is refused (0xA702) before any
        #: sub-operation (PS3.4 C.4.2.1.5, C.4.3.1.3).
        self.retrieve_max_instances = retrieve_max_instances
        #: Stores are refused (0xA700, "storage full") and ``/healthz`` is 503 while the
        #: storage's file system has fewer bytes available; 0: never for space.
        self.min_free_space = min_free_space
        #: Other processes store into the same root and index (``--workers N``): stores
        #: of one SOP Instance UID are serialised across processes too.
        self.shared = shared
        #: The index database (SQLite in ``root``, or PostgreSQL shared by several nodes).
        self.backend = open_backend(self.root, index, fsync=fsync, shared=shared)
        #: What a failing file system or index raises (answered 0xA700, "out of resources").
        self.resource_errors: tuple[type[BaseException], ...] = (OSError, TimeoutError, *self.backend.errors)
        # Writes (store, re-index) on the writer threads, each with its connection (SQLite:
        # one); queries on their own threads, each with its own connection (SQLite WAL:
        # readers never wait for the writer), so a query never delays a store and the reverse.
        self._executor = ThreadPoolExecutor(max_workers=self.backend.writers, thread_name_prefix="archive-index")
        self._readers = ThreadPoolExecutor(max_workers=QUERY_THREADS, thread_name_prefix="archive-query")
        self._turns: dict[int, _Turn] = {}  # per owner of query jobs (see _read)
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._connections_lock = threading.Lock()
        self._schema_ready = False
        self._locks: dict[str, list[Any]] = {}
        # Group commit (one writer): index writes waiting for the next transaction.
        self._pending: list[tuple[Callable[[], IndexRow], asyncio.Future[None]]] = []
        self._pending_lock = threading.Lock()
        self._flush_queued = False

    # -- database threads ---------------------------------------------------------

    def connection(self) -> Any:
        """This writer thread's connection (the schema is migrated by the first one)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self.backend.connect()
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    async def in_index_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a writer thread (see :meth:`connection`)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def commit_write(self, make: Callable[[], IndexRow]) -> None:
        """Write the index row ``make()`` returns (called on a writer thread), committed
        before this returns; its failure (or that of ``make``) is raised here.

        With a single writer (SQLite, :attr:`.Backend.group_commit`) the writes of stores arriving together share one
        transaction and one flush to disk (group commit): each runs inside its own
        savepoint, so one failing is rolled back alone and fails alone, and every one
        is answered only once the shared commit has returned (if it fails, all fail).
        """
        if not self.backend.group_commit:  # several writers; the server shares the flushes
            await self.in_index_thread(self._commit_alone, make)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._pending_lock:
            self._pending.append((make, fut))
            queue = not self._flush_queued
            self._flush_queued = True
        if queue:  # one flush queued at a time; it takes every write waiting when it starts
            self._executor.submit(self._flush, loop)
        await fut

    def _commit_alone(self, make: Callable[[], IndexRow]) -> None:
        row = make()
        db = self.connection()
        self.backend.retry(lambda: self.backend.write_index(db, row))

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """One group commit (on the writer thread): every pending write in one transaction."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
            self._flush_queued = False
        if not batch:
            return
        try:
            db = self.connection()
            outcomes = self.backend.retry(lambda: self.backend.transaction_group(db, [make for make, _f in batch]))
        except BaseException as exc:  # the transaction (or its commit) failed: none of them is stored
            outcomes = [exc] * len(batch)
        for (_make, fut), outcome in zip(batch, outcomes, strict=True):
            loop.call_soon_threadsafe(_settle, fut, outcome)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self.backend.close()

    def _probe(self, deadline: float) -> None:
        reason = self.backend.unusable()
        if reason is not None:
            raise OSError(reason)
        db = self.backend.read_connection(deadline)
        try:
            db.execute("SELECT COUNT(*) FROM schema_version").fetchone()
        finally:
            db.close()

    async def probe(self, timeout: float = 5.0) -> str | None:
        """Whether the index answers a read within ``timeout`` seconds: ``None``, or why
        not (for ``/healthz``: a node whose index is away answers every store 0xA700)."""
        try:  # (a thread of its own: never queued behind queries)
            await asyncio.wait_for(asyncio.to_thread(self._probe, time.monotonic() + timeout), timeout)
        except TimeoutError:
            return f"index {self.backend.description} unavailable: no answer within {timeout:g} s"
        except Exception as exc:
            return f"index {self.backend.description} unavailable: {str(exc).strip()[:200] or type(exc).__name__}"
        return None

    def _read_conn(self, deadline: float | None = None) -> Any:
        """A connection of its own for one query; its statements fail past ``deadline``."""
        return self.backend.read_connection(deadline)

    async def _read(self, fn: Callable[..., T], *args: Any, owner: object | None = None) -> T:
        """Run ``fn(*args)`` on a query thread. With an ``owner`` (the association asking),
        one job of that owner at a time is queued or running: the threads take the
        owners in turn (first come first served among owners), so one association's
        many or long queries, each a slice at a time, delay another's by a slice."""
        if not self._schema_ready:
            await self.in_index_thread(self.connection)  # the writer creates (or migrates) the schema first
            self._schema_ready = True
        loop = asyncio.get_running_loop()
        if owner is None:
            return await loop.run_in_executor(self._readers, fn, *args)
        key = id(owner)  # unique while the caller holds ``owner``
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                fut = loop.run_in_executor(self._readers, fn, *args)
                try:
                    return await asyncio.shield(fut)
                except asyncio.CancelledError:
                    # The job runs on (a slice at most): the owner's next one must not overlap it.
                    await asyncio.wait([fut])
                    raise
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]

    def _count(self) -> int:
        return int(self.connection().execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    async def count(self) -> int:
        return await self.in_index_thread(self._count)

    def _stored(self, sop_uid: str) -> tuple[str, int] | None:
        """The stored file of ``sop_uid`` and its size, if indexed and present."""
        row = self.connection().execute("SELECT path, size FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return (row[0], row[1]) if row and os.path.exists(row[0]) else None


class _Turn:
    """One owner's turn at the query threads: its lock and how many jobs wait on it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _settle(fut: asyncio.Future[None], outcome: BaseException | None) -> None:
    if fut.done():  # the store was cancelled meanwhile (what it wrote stays committed)
        return
    if outcome is None:
        fut.set_result(None)
    else:
        fut.set_exception(outcome)
