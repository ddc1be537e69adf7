"""A pool of SCU associations, the way HTTP clients pool connections.

Services that send many small jobs to the same PACS (a C-FIND per web request, a few
C-STOREs per study) pay for TCP set-up and A-ASSOCIATE negotiation (PS3.8 §7.1) every
time unless associations are kept open and reused::

    pool = AssociationPool(ae, max_size=4, idle_timeout=60)
    async with pool.acquire("pacs.local", 104, "PACS") as assoc:
        async for match in assoc.c_find(query):
            ...
    await pool.close()

Associations are kept per (host, port, called AE title, calling AE title). At most
``max_size`` are open per peer; callers beyond that wait for one to come back. An
association idle for longer than ``idle_timeout`` is released. On checkout an idle
association is health-checked (C-ECHO when Verification was negotiated, else "the
transport is still open"); one that fails, or that the peer aborted while it sat idle,
is dropped and a new one is negotiated. An association whose user left with an
association error, or that was cancelled mid-operation, is aborted rather than reused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import field
from typing import TYPE_CHECKING, Any

from .exceptions import AssociationError
from .lazy_dataclass import dataclass
from .log import get_logger
from .uids import Verification

if TYPE_CHECKING:
    from .ae import AE
    from .operations import Association

__all__ = ["AssociationPool", "PoolClosed", "PoolStats"]

Key = tuple[str, int, str, str]  # host, port, called AE title, calling AE title


class PoolClosed(AssociationError):
    """The pool was closed; no association can be checked out."""


@dataclass
class PoolStats:
    """Counters since the pool was created."""

    opened: int = 0  # associations negotiated
    reused: int = 0  # checkouts served by an idle association
    discarded: int = 0  # idle ones that failed their health check or were aborted
    expired: int = 0  # idle ones released after idle_timeout
    idle: dict[Key, int] = field(default_factory=dict)
    in_use: dict[Key, int] = field(default_factory=dict)


class _Slot:
    """Per-peer state: the idle associations (most recently used last) and a limit."""

    def __init__(self, max_size: int):
        self.idle: collections.deque[tuple[Association, float]] = collections.deque()
        self.limit = asyncio.Semaphore(max_size)
        self.in_use = 0


class AssociationPool:
    """Reusable requestor associations of ``ae`` (see the module documentation).

    ``health_check``: ``"auto"`` (C-ECHO if Verification was accepted, else transport
    check), ``"echo"``, ``"transport"`` or ``None`` (reuse without checking).
    ``timeout`` bounds negotiation and the health check (default: the AE's timeouts).
    """

    def __init__(
        self,
        ae: AE,
        *,
        max_size: int = 4,
        idle_timeout: float = 60.0,
        health_check: str | None = "auto",
        timeout: float | None = None,
    ):
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if health_check not in ("auto", "echo", "transport", None):
            raise ValueError(f"health_check {health_check!r}: one of 'auto', 'echo', 'transport', None")
        self.ae = ae
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.health_check = health_check
        self.timeout = timeout
        self._slots: dict[Key, _Slot] = {}
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        self._stats = PoolStats()
        self._log = get_logger("pool", local_ae=ae.ae_title)

    # ------------------------------------------------------------------ public

    @contextlib.asynccontextmanager
    async def acquire(
        self, host: str, port: int, called_ae: str = "ANY-SCP", *, ae: AE | None = None
    ) -> AsyncIterator[Association]:
        """Check out an established association to ``called_ae`` at ``host:port``
        (calling as ``ae`` or the pool's AE); it goes back to the pool on exit.

        Raises what :meth:`AE.associate` raises, and :class:`PoolClosed`.
        """
        ae = ae or self.ae
        key: Key = (host, port, called_ae, ae.ae_title)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(self.max_size)
        if self._closed:
            raise PoolClosed("association pool is closed")
        async with slot.limit:
            assoc = await self._checkout(key, slot, ae)
            slot.in_use += 1
            reusable = True
            try:
                yield assoc
            except (asyncio.CancelledError, AssociationError):
                reusable = False  # its state is unknown (mid-operation) or it is gone
                raise
            finally:
                slot.in_use -= 1
                self._checkin(slot, assoc, reusable)

    async def close(self, timeout: float | None = 10.0) -> None:
        """Release every idle association (A-RELEASE, aborted after ``timeout``) and
        refuse further checkouts; associations in use are released when returned."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        idle = [assoc for slot in self._slots.values() for assoc, _ in slot.idle]
        for slot in self._slots.values():
            slot.idle.clear()
        await asyncio.gather(*(self._release(a, timeout) for a in idle))

    def stats(self) -> PoolStats:
        """Counters and, per peer, how many associations are idle and in use."""
        self._stats.idle = {k: len(s.idle) for k, s in self._slots.items()}
        self._stats.in_use = {k: s.in_use for k, s in self._slots.items()}
        return self._stats

    async def __aenter__(self) -> AssociationPool:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals

    async def _checkout(self, key: Key, slot: _Slot, ae: AE) -> Association:
        loop = asyncio.get_running_loop()
        while slot.idle:
            assoc, since = slot.idle.pop()
            if loop.time() - since > self.idle_timeout:
                self._stats.expired += 1
                self._spawn_release(assoc)
                continue
            if await self._healthy(assoc):
                self._stats.reused += 1
                return assoc
            self._stats.discarded += 1
            self._log.info("pooled association dropped", assoc=assoc.id, reason=assoc.end_reason or "health check")
            if not assoc.is_closed:
                assoc.abort("failed the pool's health check")
        opened: Association = await ae.associate(key[0], key[1], key[2], timeout=self.timeout)
        self._stats.opened += 1
        return opened

    def _checkin(self, slot: _Slot, assoc: Association, reusable: bool) -> None:
        if not assoc.is_established:
            return
        if not reusable:
            assoc.abort("not returned cleanly to the pool")
            return
        if self._closed:
            self._spawn_release(assoc)
            return
        slot.idle.append((assoc, asyncio.get_running_loop().time()))
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap())

    async def _healthy(self, assoc: Association) -> bool:
        if not assoc.is_established or assoc.transport is None or assoc.transport.is_closing():
            return False
        check = self.health_check
        if check == "auto":
            check = "echo" if any(c.abstract_syntax == Verification for c in assoc.accepted_contexts) else "transport"
        if check != "echo":
            return True
        try:
            status = await assoc.c_echo(timeout=self.timeout)
        except AssociationError:
            return False
        return bool(status.is_success)

    async def _reap(self) -> None:
        """Release associations idle for longer than ``idle_timeout``; stop when none idle."""
        loop = asyncio.get_running_loop()
        while any(slot.idle for slot in self._slots.values()):
            await asyncio.sleep(max(self.idle_timeout / 4, 0.05))
            now = loop.time()
            for slot in self._slots.values():
                while slot.idle and now - slot.idle[0][1] > self.idle_timeout:
                    assoc, _ = slot.idle.popleft()
                    self._stats.expired += 1
                    self._spawn_release(assoc)
                for assoc, since in list(slot.idle):
                    if not assoc.is_established:  # aborted by the peer while idle
                        slot.idle.remove((assoc, since))
                        self._stats.discarded += 1

    def _spawn_release(self, assoc: Association) -> None:
        task = asyncio.ensure_future(self._release(assoc, self.timeout))
        _background.add(task)
        task.add_done_callback(_background.discard)

    @staticmethod
    async def _release(assoc: Association, timeout: float | None) -> None:
        with contextlib.suppress(AssociationError):
            await assoc.release(timeout=timeout)


_background: set[asyncio.Future[Any]] = set()
