"""The PostgreSQL index back end (``index = "postgresql://..."``), through ``asyncpg``.

Several ``serve`` nodes (and their workers) share one database and one storage
directory: any node answers for what any node stored. The archive's worker threads
call blocking :class:`Connection` methods; each call runs as a coroutine on this back
end's own event loop thread (asyncpg's connections belong to one loop), so neither
the archive's event loop nor the engine waits on the other.

- Migrations (``migrations/postgresql/NNNN_*.sql``) are applied at start under an
  advisory lock, recorded in ``schema_version``: nodes starting at once migrate once.
- A store holds a session advisory lock on its SOP Instance UID while it compares,
  moves the file into place and indexes it: the database, not the file system, is the
  arbiter between nodes, and a node that dies releases its locks with its connection.
- Write transactions meeting a deadlock or serialization failure are retried; a
  commit returns once durable (``synchronous_commit``), unless ``fsync = false``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import re
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from ..log import get_logger
from .backend import Backend, IndexRow, hierarchy_conflict, migrations

#: The ``asyncpg`` module, imported by the first :class:`PostgreSQLBackend` (~160 ms):
#: ``serve`` on an SQLite index never loads it.
asyncpg: Any = None


def _load_asyncpg() -> Any:
    global asyncpg
    if asyncpg is None:
        try:
            import asyncpg as module  # type: ignore[import-untyped,unused-ignore]
        except ImportError:  # pragma: no cover - the optional extra
            raise ValueError("a postgresql:// index needs asyncpg: pip install 'dimse_async[postgresql]'") from None
        asyncpg = module
    return asyncpg

T = TypeVar("T")

log = get_logger()

#: Connections per process: writer threads, queries, and one per store holding its lock.
POOL_SIZE = 24
#: A statement (or a wait for a lock) taking longer fails: the store is answered 0xA700.
COMMAND_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
WRITE_RETRIES = 3
#: SQLSTATE of ``index_instance`` refusing an instance whose series or study the index
#: holds under another parent (migration 0005; its message is the reason).
HIERARCHY_CONFLICT = "DA001"


def _refusal(exc: BaseException) -> BaseException:
    """``exc``, or the :class:`.HierarchyConflict` it stands for (:data:`HIERARCHY_CONFLICT`):
    the instance is refused 0xA900, not the index said to be out of order (0xA700)."""
    if getattr(exc, "sqlstate", None) == HIERARCHY_CONFLICT:
        return hierarchy_conflict(str(getattr(exc, "message", "") or exc))
    return exc


#: Indexing one instance: one statement, one round trip (migration 0002).
_INDEX_INSTANCE = f"SELECT index_instance({', '.join(f'${i + 1}' for i in range(len(IndexRow.__annotations__)))})"


def _new_loop() -> asyncio.AbstractEventLoop:
    """The back end's loop: uvloop when installed (asyncpg's own choice; a hop and a
    round trip cost less), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def redact(dsn: str) -> str:
    """``dsn`` without its password."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def lock_key(kind: str, name: str) -> int:
    """A 64-bit advisory lock key for ``name`` (collisions merely serialise)."""
    return int.from_bytes(
        hashlib.blake2b(f"dimse_async:{kind}:{name}".encode(), digest_size=8).digest(), "big", signed=True
    )


@functools.lru_cache(maxsize=512)
def dollar_placeholders(sql: str) -> str:
    """``?`` placeholders (outside quoted literals) numbered ``$1, $2, ...``."""
    out, n = [], 0
    for part in re.split(r"('(?:[^']|'')*')", sql):
        if part.startswith("'"):
            out.append(part)
            continue
        pieces = part.split("?")
        for i, piece in enumerate(pieces):
            if i:
                n += 1
                out.append(f"${n}")
            out.append(piece)
    return "".join(out)


def _arg(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL: dropped alike when storing and when querying.
    return value.replace("\x00", "") if isinstance(value, str) and "\x00" in value else value


class _Rows:
    def __init__(self, rows: list[Any]):
        self.rows = rows

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


class HeldInstance:
    """A store's hold of one SOP Instance UID's advisory lock: the stored copy found
    when it was taken (``None``: none, or not looked up) and the index write on the
    lock's own connection, so no writer thread is involved."""

    __slots__ = ("backend", "conn", "existing", "key", "released", "writing")

    def __init__(self, backend: PostgreSQLBackend, conn: Any, key: int, existing: tuple[str, int] | None):
        self.backend = backend
        self.conn = conn
        self.key = key
        self.existing = existing
        self.released = False
        self.writing: concurrent.futures.Future[None] | None = None

    async def write_index(self, make: Callable[[], IndexRow], *, unlock: bool) -> None:
        """Index the stored instance (``make()`` runs on the back end's loop thread),
        committed when this returns; ``unlock``: release the lock in the same hop once
        committed (after a failure it stays held while the store undoes its file).
        Cancelling the caller does not stop the write (the row matches the file)."""
        loop = self.backend._loop
        assert loop is not None
        self.writing = asyncio.run_coroutine_threadsafe(self.backend._write_held(self, make, unlock), loop)
        await asyncio.shield(asyncio.wrap_future(self.writing))


class PGConnection:
    """A blocking facade over one pooled asyncpg connection (see the module)."""

    def __init__(self, backend: PostgreSQLBackend, deadline: float | None = None):
        self.backend = backend
        self.deadline = deadline
        self._conn: Any = None
        self._tx: Any = None

    def _timeout(self) -> float:
        if self.deadline is None:
            return COMMAND_TIMEOUT
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("query time budget exhausted")
        return min(left, COMMAND_TIMEOUT)

    def _ensure(self) -> Any:
        if self._conn is not None and self._conn.is_closed():
            if self._tx is not None:
                raise asyncpg.InterfaceError("connection lost in a transaction")
            self.backend.run(self.backend.release(self._conn))
            self._conn = None
        if self._conn is None:
            self._conn = self.backend.run(self.backend.acquire())
        return self._conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Rows:
        conn = self._ensure()
        args = [_arg(a) for a in parameters]
        rows = self.backend.run(conn.fetch(dollar_placeholders(sql), *args, timeout=self._timeout()))
        return _Rows([tuple(r) for r in rows])

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> None:
        conn = self._ensure()
        batch = [[_arg(a) for a in p] for p in parameters]
        if batch:
            self.backend.run(conn.executemany(dollar_placeholders(sql), batch, timeout=self._timeout()))

    def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """``statements`` in one transaction, sent in one call to the back end's loop."""
        conn = self._ensure()
        if self._tx is not None:
            for sql, parameters in statements:
                self.execute(sql, parameters)
            return
        timeout = self._timeout()
        prepared = [(dollar_placeholders(sql), [_arg(a) for a in parameters]) for sql, parameters in statements]

        async def run() -> None:
            async with conn.transaction():
                for sql, args in prepared:
                    await conn.execute(sql, *args, timeout=timeout)

        self.backend.run(run())

    def __enter__(self) -> PGConnection:
        conn = self._ensure()
        tx = conn.transaction()
        self.backend.run(tx.start())
        self._tx = tx
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        tx, self._tx = self._tx, None
        if tx is None:
            return
        if exc_type is None:
            self.backend.run(tx.commit())
        else:
            with contextlib.suppress(Exception):
                self.backend.run(tx.rollback())

    def close(self) -> None:
        if self._tx is not None:
            self.__exit__(RuntimeError, None, None)
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                self.backend.run(self.backend.release(conn))


class PostgreSQLBackend(Backend):
    """One PostgreSQL database shared by every node (see the module)."""

    dialect = "postgresql"
    writers = 4
    multi_node = True

    def __init__(self, dsn: str, *, fsync: bool = True, pool_size: int = POOL_SIZE):
        _load_asyncpg()
        self.dsn = dsn
        self.fsync = fsync
        self.pool_size = pool_size
        self.errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
        self._started = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: Any = None

    @property
    def description(self) -> str:
        return redact(self.dsn)

    # -- the back end's event loop ----------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the back end's loop and wait for it (from a worker thread)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> None:
        """Start the loop thread, open the pool and migrate (once; blocking)."""
        with self._started:
            if self._pool is not None:
                return
            loop = _new_loop()
            thread = threading.Thread(target=loop.run_forever, name="archive-postgresql", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            try:
                self._pool = self.run(self._open())
            except BaseException:
                self._stop_loop()
                raise

    async def _open(self) -> Any:
        settings = {"application_name": "dimse_async"}
        if not self.fsync:
            settings["synchronous_commit"] = "off"
        pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=self.pool_size,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=settings,
        )
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn)
        except BaseException:
            await pool.close()
            raise
        return pool

    @staticmethod
    async def _migrate(conn: Any) -> None:
        key = lock_key("migrate", "index")
        await conn.execute("SELECT pg_advisory_lock($1)", key)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            applied = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
            for version, name, sql in migrations("postgresql"):
                if version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_version (version, name) VALUES ($1, $2)", version, name)
                log.info("archive: index migrated", version=version, migration=name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)

    async def acquire(self) -> Any:
        """A pooled connection; waiting longer than :data:`COMMAND_TIMEOUT` for one fails."""
        return await self._pool.acquire(timeout=COMMAND_TIMEOUT)

    async def release(self, conn: Any) -> None:
        await self._pool.release(conn)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def close(self) -> None:
        with self._started:
            pool, self._pool = self._pool, None
            if pool is not None:
                try:
                    self.run(asyncio.wait_for(pool.close(), 10))
                except Exception:
                    pool.terminate()
            self._stop_loop()

    # -- the interface ----------------------------------------------------------------

    def connect(self) -> PGConnection:
        self.start()
        return PGConnection(self)

    def read_connection(self, deadline: float | None = None) -> PGConnection:
        self.start()
        return PGConnection(self, deadline)

    def transaction(self, db: Any, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        db.transaction(statements)

    def write_index(self, db: Any, row: IndexRow) -> None:
        """One round trip: the server runs the statements (migrations 0002, 0005)."""
        try:
            db.execute(_INDEX_INSTANCE, row)  # no "?" in it: sent as it is
        except asyncpg.PostgresError as exc:
            refusal = _refusal(exc)
            if refusal is exc:
                raise
            raise refusal from None

    def drop_emptied(self, db: Any, series: Sequence[str]) -> None:
        """One statement: the server locks each parent before it checks it (migration 0003)."""
        db.execute("SELECT drop_emptied(?::text[], NULL, NULL)", (list(series),))

    def retry(self, fn: Callable[[], T]) -> T:
        for attempt in range(WRITE_RETRIES):
            try:
                return fn()
            except asyncpg.exceptions.TransactionRollbackError as exc:  # deadlock, serialization failure
                if attempt == WRITE_RETRIES - 1:
                    raise
                log.warning("archive: index write conflict; retrying", attempt=attempt + 1, error=str(exc)[:100])
                time.sleep(0.02 * (2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def bulk(self, db: Any) -> Iterator[None]:
        db.execute("SET synchronous_commit = off")
        try:
            yield
        finally:
            db.execute("RESET synchronous_commit" if self.fsync else "SET synchronous_commit = off")

    async def _lock(self, key: int) -> Any:
        conn = await self.acquire()
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
        except BaseException:
            await self._pool.release(conn)  # the pool's reset drops any advisory lock
            raise
        return conn

    async def _unlock(self, conn: Any, key: int) -> None:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            await self._pool.release(conn)

    async def _lock_and_find(self, key: int, uid: str, find: bool) -> tuple[Any, tuple[str, int] | None]:
        conn = await self._lock(key)
        if not find:
            return conn, None
        try:
            row = await conn.fetchrow("SELECT path, size FROM instances WHERE sop_uid = $1", uid)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._unlock(conn, key)
            raise
        return conn, (None if row is None else (row[0], row[1]))

    def _unlock_later(self, key: int, fut: concurrent.futures.Future[Any]) -> None:
        """The store waiting for a lock went away; free the lock if it was taken after all."""
        if not fut.cancelled() and fut.exception() is None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._unlock(fut.result()[0], key), self._loop)

    async def _write_held(self, held: HeldInstance, make: Callable[[], IndexRow], unlock: bool) -> None:
        row = make()
        for attempt in range(WRITE_RETRIES):
            try:
                await held.conn.execute(_INDEX_INSTANCE, *[_arg(a) for a in row], timeout=COMMAND_TIMEOUT)
                break
            except asyncpg.exceptions.TransactionRollbackError as exc:  # a deadlock with a move (0003)
                if attempt == WRITE_RETRIES - 1:
                    raise
                log.warning("archive: index write conflict; retrying", attempt=attempt + 1, error=str(exc)[:100])
                await asyncio.sleep(0.02 * (2**attempt))
            except asyncpg.PostgresError as exc:
                refusal = _refusal(exc)
                if refusal is exc:
                    raise
                raise refusal from None
        # Committed. Unlocked here only then: a failed store undoes its file still holding it.
        if unlock:
            held.released = True
            with contextlib.suppress(Exception):  # a connection lost or reset drops its locks anyway
                await self._unlock(held.conn, held.key)

    @contextlib.asynccontextmanager
    async def instance_lock(self, uid: str, find: bool = False) -> AsyncIterator[HeldInstance]:
        """The lock, its look-up of a stored copy (``find``) and, through the
        :class:`HeldInstance` yielded, the index write on the lock's connection: a store
        costs two hops to the back end's loop (three when a previous file is replaced)."""
        if self._pool is None:
            await asyncio.to_thread(self.start)
        assert self._loop is not None
        key = lock_key("instance", uid)
        taking = asyncio.run_coroutine_threadsafe(self._lock_and_find(key, uid, find), self._loop)
        try:
            conn, existing = await asyncio.shield(asyncio.wrap_future(taking))
        except asyncio.CancelledError:
            taking.add_done_callback(functools.partial(self._unlock_later, key))
            raise
        held = HeldInstance(self, conn, key, existing)
        try:
            yield held
        finally:
            writing = held.writing
            if writing is not None and not writing.done():  # cancelled meanwhile: unlock after it
                writing.add_done_callback(lambda _f: self._free_held(held))
            elif not held.released:
                freeing = asyncio.run_coroutine_threadsafe(self._unlock(conn, key), self._loop)
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wrap_future(freeing))

    def _free_held(self, held: HeldInstance) -> None:
        if not held.released and self._loop is not None:
            held.released = True
            asyncio.run_coroutine_threadsafe(self._unlock(held.conn, held.key), self._loop)

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        self.start()
        key = lock_key("task", name)
        conn = self.run(self._lock(key))
        try:
            yield
        finally:
            self.run(self._unlock(conn, key))
