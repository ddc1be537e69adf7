"""The SQLite index back end: ``index.sqlite`` in the storage directory, in WAL mode
(readers never wait for the writer), one writer connection, retries while another
process holds the database (``--workers N``), and a per-instance ``flock`` across
the processes sharing the directory."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..log import get_logger
from .backend import Backend, IndexRow, migrations, split_statements, write_index_rows

T = TypeVar("T")

log = get_logger()

#: Several processes share one index (``--workers N``): SQLite waits this long for a
#: lock held by another process, and a write still finding the database busy is
#: retried (:meth:`SQLiteBackend.retry`) before the store is answered 0xA700.
BUSY_TIMEOUT = 5.0
BUSY_RETRIES = 2
#: ``PRAGMA user_version`` of indexes made before the ``schema_version`` table: the
#: layout of migration 0001.
_LEGACY_VERSION = 2
_LOCK_BUCKETS = 4096  # lock files for per-instance cross-process locks


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


class _InstanceFileLock:
    """A cross-process exclusive lock for one SOP Instance UID: ``flock`` on one of
    :data:`_LOCK_BUCKETS` files under ``root/.locks`` chosen by the UID's hash (two
    UIDs sharing a bucket merely wait for each other). Polled, so the event loop
    never blocks."""

    def __init__(self, root: Path, uid: str):
        bucket = int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=4).digest(), "big") % _LOCK_BUCKETS
        self.path = root / ".locks" / f"{bucket:04d}.lock"
        self.fd: int | None = None

    async def __aenter__(self) -> None:
        self.path.parent.mkdir(exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        delay = 0.002
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    async def __aexit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


class SQLiteBackend(Backend):
    """``root/index.sqlite`` (see the module); ``shared``: other processes write it too."""

    dialect = "sqlite"
    errors = (sqlite3.Error,)
    writers = 1
    group_commit = True

    def __init__(self, root: Path, *, fsync: bool = True, shared: bool = False):
        self.root = root
        self.path = root / "index.sqlite"
        self.fsync = fsync
        self.shared = shared
        #: The file (device, inode) each writer connection opened, by ``id``.
        self._files: dict[int, tuple[int, int]] = {}

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _check_file(self, db: Any) -> None:
        """Refuse to write through a connection whose file is no longer the index: one
        removed (``rm``) or replaced (a restore) while the archive runs. SQLite would go
        on writing into the unlinked file, every store answered success while no query,
        opening ``index.sqlite`` afresh, finds it. An ``sqlite3.OperationalError`` here
        rolls the transaction back and the store is refused 0xA700 with this reason
        (the files stay; a restart re-indexes them). One ``stat`` per transaction."""
        opened = self._files.get(id(db))
        if opened is not None and self._file_identity() != opened:
            log.error("archive: index file removed or replaced while in use; restart to re-index", path=str(self.path))
            raise sqlite3.OperationalError("index file removed or replaced; restart to re-index")

    @property
    def description(self) -> str:
        return str(self.path)

    def unusable(self) -> str | None:
        """The index file removed or replaced under the writers (see :meth:`_check_file`)."""
        current = self._file_identity()
        if any(opened != current for opened in list(self._files.values())):
            return "index file removed or replaced; restart to re-index"
        return None

    def retry(self, fn: Callable[[], T]) -> T:
        """Retry a few times while another process holds the database (SQLITE_BUSY
        beyond the busy timeout, or a busy WAL snapshot upgrade)."""
        for attempt in range(BUSY_RETRIES):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or attempt == BUSY_RETRIES - 1:
                    raise
                log.warning("archive: index busy; retrying", attempt=attempt + 1, error=str(exc)[:100])
                time.sleep(0.05 * (2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def transaction_group(self, db: Any, writes: Sequence[Callable[[], IndexRow]]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        db.execute("BEGIN IMMEDIATE")  # a savepoint alone would open (and its release commit) a transaction
        try:
            self._check_file(db)
            for make in writes:
                db.execute("SAVEPOINT write")
                try:
                    write_index_rows(db, make())
                except Exception as exc:
                    db.execute("ROLLBACK TO write")
                    outcomes.append(exc)
                else:
                    outcomes.append(None)
                db.execute("RELEASE write")
            db.execute("COMMIT")  # flushed (synchronous=FULL) before any of them is answered
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    def write_index(self, db: Any, row: IndexRow) -> None:
        """One transaction taking the write lock first (its look-ups of the parents
        the instance may leave, :func:`.write_index_rows`, see what it then changes)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            self._check_file(db)
            write_index_rows(db, row)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=BUSY_TIMEOUT)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        self.retry(lambda: db.execute("PRAGMA journal_mode=WAL"))
        self.retry(lambda: self._migrate(db))
        db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        opened = self._file_identity()  # the file is open by now (journal mode, migrations)
        if opened is not None:
            self._files[id(db)] = opened
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Apply the pending migrations under the write lock, so processes starting at
        once migrate once. An index of an unknown earlier layout starts afresh (the
        re-index refills it from the files)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "schema_version" not in tables:
                legacy = db.execute("PRAGMA user_version").fetchone()[0] == _LEGACY_VERSION and "instances" in tables
                if not legacy:
                    for table in ("instances", "series", "studies", "patients"):
                        db.execute(f"DROP TABLE IF EXISTS {table}")
                db.execute(
                    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
                )
                if legacy:
                    db.execute("INSERT INTO schema_version VALUES (1, '0001_index.sql', ?)", (time.time(),))
            applied = {r[0] for r in db.execute("SELECT version FROM schema_version")}
            for version, name, sql in migrations("sqlite"):
                if version in applied:
                    continue
                for statement in split_statements(sql):
                    db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?, ?, ?)", (version, name, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def read_connection(self, deadline: float | None = None) -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        if deadline is not None:
            db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
        return db

    @contextlib.contextmanager
    def bulk(self, db: Any) -> Iterator[None]:
        db.execute("PRAGMA synchronous=OFF")
        try:
            yield
        finally:
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")

    @contextlib.asynccontextmanager
    async def instance_lock(self, uid: str, find: bool = False) -> AsyncIterator[None]:
        if not self.shared:  # one process: the archive's own per-UID lock suffices
            yield None
            return
        async with _InstanceFileLock(self.root, uid):
            yield None

    def close(self) -> None:
        pass  # nothing beyond the connections

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        path = self.root / ".locks" / f"{name}.lock"
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
