"""The archive index database: the writer connection and its thread, read-only
connections for queries on their own threads (SQLite WAL), and retries while
another process holds the database (``--workers N``)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..inflate import DEFAULT_LIMITS, InflationLimits
from ..log import get_logger
from .schema import (
    _SCHEMA,
    _SCHEMA_VERSION,
)

T = TypeVar("T")

log = get_logger()


#: What a C-STORE of a SOP Instance UID already stored does. ``keep``: the stored
#: instance stays; the same data set again is answered success, a different one
#: failure 0xA900. ``replace``: a complete, valid new instance replaces the stored one.
DUPLICATE_POLICIES = ("keep", "replace")


#: Several processes share one index (``--workers N``): SQLite waits this long for a
#: lock held by another process, and a write still finding the database busy is
#: retried (:func:`_retry_busy`) before the store is answered 0xA700.
BUSY_TIMEOUT = 5.0
BUSY_RETRIES = 2


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def _retry_busy(fn: Callable[[], T]) -> T:
    """Run a write transaction, retrying a few times while another process holds the
    database (SQLITE_BUSY beyond the busy timeout, or a busy WAL snapshot upgrade)."""
    for attempt in range(BUSY_RETRIES):
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or attempt == BUSY_RETRIES - 1:
                raise
            log.warning("archive: index busy; retrying", attempt=attempt + 1, error=str(exc)[:100])
            time.sleep(0.05 * (2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover


class IndexDB:
    """Files under ``root`` and the index connections in ``root/index.sqlite``."""

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
        shared: bool = False,
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
        #: Other processes store into the same root and index (``--workers N``): stores
        #: of one SOP Instance UID are serialised across processes too.
        self.shared = shared
        # Writes (store, re-index) on one thread and one connection; queries on their
        # own threads, each with its own read-only connection (SQLite WAL: readers never
        # wait for the writer), so a query never delays a store and the reverse.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-index")
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="archive-query")
        self._db: sqlite3.Connection | None = None
        self._schema_ready = False
        self._locks: dict[str, list[Any]] = {}

    # -- database thread ----------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, timeout=BUSY_TIMEOUT)
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")

            def upgrade() -> None:
                # Under the write lock, so two processes starting at once upgrade once.
                db.execute("BEGIN IMMEDIATE")
                try:
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    if version != _SCHEMA_VERSION:
                        # An index from an earlier layout: start afresh; the re-index refills it from the files.
                        for table in ("instances", "series", "studies", "patients"):
                            db.execute(f"DROP TABLE IF EXISTS {table}")
                        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise

            _retry_busy(upgrade)
            _retry_busy(lambda: db.executescript(_SCHEMA))
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            self._db = db
        return self._db

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)
        self._readers.shutdown(wait=True)

    def _read_conn(self, deadline: float | None = None) -> sqlite3.Connection:
        """A read-only connection of its own for one query; interrupted past ``deadline``."""
        db = sqlite3.connect(f"file:{self.root / 'index.sqlite'}?mode=ro", uri=True, check_same_thread=False)
        if deadline is not None:
            db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
        return db

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._schema_ready:
            await self._call(self._conn)  # the writer creates (or migrates) the schema first
            self._schema_ready = True
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    def _count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    async def count(self) -> int:
        return await self._call(self._count)

    def _stored(self, sop_uid: str) -> tuple[str, int] | None:
        """The stored file of ``sop_uid`` and its size, if indexed and present."""
        row = self._conn().execute("SELECT path, size FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return (row[0], row[1]) if row and os.path.exists(row[0]) else None
