"""A listening AE: many concurrent associations on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .acse import NegotiationCache
from .log import get_logger
from .proxy import address_key
from .ratelimit import WarningLimiter

if TYPE_CHECKING:
    from .operations import Association

__all__ = ["Server"]


def _decrement(counts: dict[str, int], key: str) -> None:
    """One fewer under ``key``; the key goes when none is left (the dicts stay small)."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


class ServerOwner(Protocol):
    """What a server reads of its AE."""

    ae_title: str
    max_associations: int
    max_per_address: int
    max_per_calling_ae: int
    max_pending: int
    max_pending_per_address: int
    busy_pending_timeout: float | None
    ipv6_prefix: int
    refusal_log_burst: int
    refusal_log_interval: float
    fd_reserve: int
    observer: Any


class Server:
    """Returned by :meth:`AE.start_server`; already listening.

    ``async with server:`` closes it on exit; :meth:`serve_forever` blocks until
    cancelled; :meth:`close` stops accepting and :meth:`wait_closed` waits for open
    associations for a grace period, then aborts what is left. :meth:`drain` does
    both after turning :attr:`ready` false (graceful shutdown behind a load balancer).
    """

    def __init__(self, ae: ServerOwner):
        self.ae = ae
        self._server: asyncio.base_events.Server | None = None
        self.associations: set[Association] = set()
        self._admitted: set[Association] = set()  # judged or being judged, not yet closed
        # Admission counts, kept as associations come and go (never a scan over all):
        # admitted ones by peer address and by calling AE title, and connections that
        # have not sent their A-ASSOCIATE-RQ yet, by address.
        # (Plain dicts: a Counter's missing keys and deletions are Python-level calls.)
        self._unadmitted: set[Association] = set()
        self._pending_by_address: dict[str, int] = {}
        self._by_address: dict[str, int] = {}
        self._by_calling_ae: dict[str, int] = {}
        #: Per-address limits count an IPv6 client under its /``ipv6_prefix`` network
        #: (:func:`~dimse_async.proxy.address_key`); fixed for the server's life, so that a
        #: count always goes down under the key it went up under.
        self.ipv6_prefix = ae.ipv6_prefix
        self._refused_connections = 0
        self._refusal_logged = 0.0
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            baseline = len(os.listdir("/proc/self/fd"))
        except OSError:  # pragma: no cover - not Linux
            baseline = 32
        #: Connections we can hold before file descriptors run short; beyond it the
        #: ``fd_reserve`` is kept for answering A-ASSOCIATE-RJ (local limit exceeded).
        self.fd_budget = (1 << 30) if soft == resource.RLIM_INFINITY else max(0, soft - baseline - ae.fd_reserve)
        self._preambles: set[Any] = set()  # tasks of connections still in their PROXY header / TLS handshake
        # Their associations (made before the handshake): pending too, by the address key
        # they count under (``None`` while a trusted proxy's header is read: a shared address).
        self._early: dict[Association, str | None] = {}
        self._early_shed: dict[Association, Callable[[str], None]] = {}  # how the acceptor drops one
        # Every connection not yet associated (early or not), oldest first: when it took
        # its place (see _shed).
        self._pending_since: dict[Association, float] = {}
        self._log = get_logger(local_ae=ae.ae_title)
        #: Warnings about connections refused, rejected or dropped before they became
        #: associations, per kind and client address key: the first
        #: ``refusal_log_burst`` of each ``refusal_log_interval`` seconds in full, the
        #: rest counted into a "similar warnings suppressed" line (see :meth:`allow_warning`).
        self.warnings = WarningLimiter(self._suppressed, interval=ae.refusal_log_interval, burst=ae.refusal_log_burst)
        self._warnings_timer: asyncio.TimerHandle | None = None
        #: Set by :meth:`drain`: unready, new associations rejected (transient).
        self.draining = False
        #: Set while the server is listening but not open yet (``start_server(paused=True)``,
        #: e.g. while an archive is re-indexed): unready; an association request waits up
        #: to :attr:`paused_wait` seconds for :meth:`open`, then is rejected (transient,
        #: temporary congestion).
        self.paused = False
        self.paused_wait = 5.0
        self._opened = asyncio.Event()
        #: Answers to A-ASSOCIATE-RQs seen before (bounded; see :class:`~dimse_async.acse.NegotiationCache`).
        self.negotiations = NegotiationCache()

    def open(self) -> None:
        """Start admitting associations (after ``start_server(paused=True)``)."""
        self._opened.set()
        if self.paused:
            self.paused = False
            self._log.info("accepting associations")

    async def wait_open(self) -> None:
        """While paused: until :meth:`open`, at most :attr:`paused_wait` seconds."""
        if self.paused:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._opened.wait(), self.paused_wait)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets) if self._server else ()

    def address_key(self, address: str) -> str:
        """What the per-address limits count ``address`` under (IPv4: itself; IPv6: its
        /``ipv6_prefix`` network)."""
        return address if ":" not in address else address_key(address, self.ipv6_prefix)

    def over_limit(self) -> bool:
        """Whether admitting one more association would exceed ``max_associations``."""
        if self.draining or self.paused:
            return True
        return len(self._admitted) >= self.ae.max_associations

    def admit(self, assoc: Association) -> str | None:
        """Reserve a place for ``assoc`` before it is judged (an authenticator may await);
        why not (for A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded) when
        ``max_associations``, the per-address or per-calling-AE cap is reached, file
        descriptors run short, or the server is draining."""
        ae, address, calling = self.ae, assoc.peer[0], assoc.peer_ae
        if ":" in address:
            address = address_key(address, self.ipv6_prefix)
        if assoc in self._unadmitted:  # _settled, with the key made here
            self._unadmitted.discard(assoc)
            self._pending_since.pop(assoc, None)
            _decrement(self._pending_by_address, address)
        if self.draining:
            return "server draining"
        if self.paused:
            return "server starting"
        if len(self._admitted) >= ae.max_associations:
            return f"max_associations ({ae.max_associations}) reached"
        if len(self.associations) > self.fd_budget:
            return f"file descriptors running short ({len(self.associations)} connections)"
        by_address, by_calling_ae = self._by_address, self._by_calling_ae
        if by_address.get(address, 0) >= ae.max_per_address:
            return f"max_per_address ({ae.max_per_address}) reached for {address}"
        if by_calling_ae.get(calling, 0) >= ae.max_per_calling_ae:
            return f"max_per_calling_ae ({ae.max_per_calling_ae}) reached for {calling!r}"
        self._admitted.add(assoc)
        by_address[address] = by_address.get(address, 0) + 1
        by_calling_ae[calling] = by_calling_ae.get(calling, 0) + 1
        return None

    def _settled(self, assoc: Association) -> None:
        """``assoc`` has sent its A-ASSOCIATE-RQ (or is gone): no longer pending."""
        if assoc in self._unadmitted:
            self._unadmitted.discard(assoc)
            self._pending_since.pop(assoc, None)
            _decrement(self._pending_by_address, self.address_key(assoc.peer[0]))

    def _shed(self, total: int, now: float) -> int:
        """Under pressure (at least half of ``max_pending`` taken), drop the connections
        that have been waiting longer than ``busy_pending_timeout`` for their
        A-ASSOCIATE-RQ (TLS handshake and PROXY header included), oldest first, until
        under half; the count left. A client on any link sends its request within a
        few round trips; one that has sent nothing (or not all) for seconds while others
        queue only holds a place (nginx, short of connections, likewise closes the oldest
        ones still waiting for a request: "reusing connections")."""
        ae, since = self.ae, self._pending_since
        timeout = ae.busy_pending_timeout
        if timeout is None or total * 2 < ae.max_pending:
            return total
        horizon = now - timeout
        why = f"no A-ASSOCIATE-RQ within {timeout} s while half of max_pending ({ae.max_pending}) or more is taken"
        while since and total * 2 >= ae.max_pending:
            assoc = next(iter(since))
            if since[assoc] > horizon:
                break
            del since[assoc]
            if assoc in self._early:
                shed = self._early_shed.get(assoc)
                self.untrack_early(assoc)
                if shed is not None:
                    shed(why)
            elif assoc in self._unadmitted and assoc.associate_rq is None:
                self._settled(assoc)
                assoc.warn_refusal("connection refused: busy", "connection refused", reason=why)
                self.note_refused("busy pending timeout")
                assoc.abort(why)
            else:  # its request is in (a paused server's wait): not ours to drop
                continue
            total -= 1
        return total

    def _pending_full(self, address: str | None, key: str | None) -> bool:
        """Whether one more connection without an A-ASSOCIATE-RQ (from ``address``,
        counted under ``key``, when it counts under one) would pass ``max_pending`` or
        ``max_pending_per_address``; if so it is counted and logged (one line a second,
        however many)."""
        ae, pending = self.ae, self._pending_by_address
        total = len(self._unadmitted) + len(self._early)
        if total * 2 >= ae.max_pending:
            total = self._shed(total, asyncio.get_running_loop().time())
        from_address = pending.get(key, 0) if key is not None else 0
        if total < ae.max_pending and from_address < ae.max_pending_per_address:
            return False
        self._refused_connections += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged >= 1.0:
            extra = {"counted_as": key} if key != address else {}
            self._log.warning(
                "connections dropped: too many not yet associated",
                dropped=self._refused_connections,
                pending=total,
                address=address,
                from_address=from_address,
                **extra,
            )
            self._refusal_logged, self._refused_connections = now, 0
        self.note_refused("pending limit")
        return True

    def track(self, assoc: Association) -> bool:
        """A connection was made (called by the association): ``False`` to drop it at
        once because too many connections have not associated yet (``max_pending``
        in all, ``max_pending_per_address`` from its address). One that already holds
        a place from :meth:`track_early` keeps it."""
        address, pending = assoc.peer[0], self._pending_by_address
        key = address if ":" not in address else address_key(address, self.ipv6_prefix)
        if assoc in self._early:
            counted = self._early.pop(assoc)
            if counted != key:  # pragma: no cover - the acceptor re-counts after the header
                if counted is not None:
                    _decrement(pending, counted)
                pending[key] = pending.get(key, 0) + 1
            self._early_shed.pop(assoc, None)  # dropped as an association from now on
        else:
            ae, from_address = self.ae, pending.get(key, 0)
            # Well under max_pending (no shedding) and under the address's limit: what
            # _pending_full would find without a call; otherwise it judges.
            if (len(self._unadmitted) + len(self._early)) * 2 >= ae.max_pending or (
                from_address >= ae.max_pending_per_address
            ):
                if self._pending_full(address, key):
                    return False
                from_address = pending.get(key, 0)
            pending[key] = from_address + 1
            self._pending_since[assoc] = assoc.loop.time()
        self.associations.add(assoc)
        self._unadmitted.add(assoc)
        return True

    def track_early(self, assoc: Association, address: str | None, shed: Callable[[str], None] | None = None) -> bool:
        """A connection still in its PROXY header or TLS handshake (called by the
        acceptor) takes a place among those not yet associated, counted under
        ``address`` (``None``: only in the total); ``False`` to close it at once. Called
        again with the client's address once a PROXY header has named it (it keeps its
        age). ``shed(why)`` drops it when it has waited too long on a busy server."""
        if assoc in self._early:  # counted again under the address its header named
            key = self._early.pop(assoc)
            if key is not None:
                _decrement(self._pending_by_address, key)
        key = None if address is None else self.address_key(address)
        if self._pending_full(address, key):
            self._forget_early(assoc)
            return False
        self._early[assoc] = key
        if key is not None:
            self._pending_by_address[key] = self._pending_by_address.get(key, 0) + 1
        if shed is not None:
            self._early_shed[assoc] = shed
        if assoc not in self._pending_since:
            self._pending_since[assoc] = asyncio.get_running_loop().time()
        return True

    def untrack_early(self, assoc: Association) -> None:
        """The handshake ended without an association (failed, timed out, closed)."""
        if assoc in self._early:
            key = self._early.pop(assoc)
            if key is not None:
                _decrement(self._pending_by_address, key)
            self._forget_early(assoc)

    def _forget_early(self, assoc: Association) -> None:
        self._early_shed.pop(assoc, None)
        self._pending_since.pop(assoc, None)

    def untrack(self, assoc: Association) -> None:
        """The connection is gone: its place is free again."""
        if assoc not in self.associations:
            return
        if assoc in self._unadmitted:
            self._settled(assoc)
        self.associations.discard(assoc)
        if assoc in self._admitted:
            self._admitted.discard(assoc)
            address = assoc.peer[0]
            by_address, by_calling_ae, calling = self._by_address, self._by_calling_ae, assoc.peer_ae
            if ":" in address:
                address = address_key(address, self.ipv6_prefix)
            # (_decrement, twice, without the calls)
            n = by_address.get(address, 0) - 1
            if n > 0:
                by_address[address] = n
            else:
                by_address.pop(address, None)
            n = by_calling_ae.get(calling, 0) - 1
            if n > 0:
                by_calling_ae[calling] = n
            else:
                by_calling_ae.pop(calling, None)

    def attach(self, listener: Any) -> None:
        """The listening server (``loop.create_server``'s or the acceptor's) this object fronts."""
        self._server = listener

    def track_preamble(self, task: asyncio.Future[Any]) -> None:
        """A connection still in its PROXY header or TLS handshake: cancelled by :meth:`close`."""
        self._preambles.add(task)
        task.add_done_callback(self._preambles.discard)

    @property
    def preambles(self) -> int:
        """Connections still in their PROXY header or TLS handshake."""
        return len(self._preambles)

    def allow_warning(self, kind: str, address: str) -> bool:
        """Whether to log a warning of ``kind`` about a connection from ``address`` that
        was refused, rejected or dropped before it became an association: the first few
        per kind and address key (IPv6: its /``ipv6_prefix``) in each interval are, the
        rest are counted and summed up in one line once the interval is over."""
        key = address if ":" not in address else address_key(address, self.ipv6_prefix)
        if self.warnings.allow(kind, key):
            return True
        if self._warnings_timer is None:
            self._warnings_timer = asyncio.get_running_loop().call_later(self.warnings.interval, self._expire_warnings)
        return False

    def _expire_warnings(self) -> None:
        self._warnings_timer = None
        self.warnings.expire()
        if self.warnings.pending:
            self._warnings_timer = asyncio.get_running_loop().call_later(self.warnings.interval, self._expire_warnings)

    def _flush_warnings(self) -> None:
        if self._warnings_timer is not None:
            self._warnings_timer.cancel()
            self._warnings_timer = None
        self.warnings.flush()

    def _suppressed(self, kind: str, address: str, count: int, seconds: float) -> None:
        self._log.warning(
            "similar warnings suppressed", kind=kind, address=address, suppressed=count, seconds=round(seconds, 1)
        )

    def note_probe(self) -> None:
        """A connection closed before its TLS handshake or PROXY header began (a TCP
        probe): counted as a plain port's probe is, an association that failed before
        negotiation."""
        probed = getattr(self.ae.observer, "connection_probed", None)
        if probed is not None:
            probed()

    def note_refused(self, why: str) -> None:
        """A connection was dropped before it became an association (PROXY, TLS)."""
        observer = self.ae.observer
        if observer is not None:
            observer.connection_refused(why)

    @property
    def ready(self) -> bool:
        """Whether new associations are welcome: listening and not draining."""
        return self._server is not None and self._server.is_serving() and not (self.draining or self.paused)

    async def drain(self, grace: float = 30.0, delay: float = 0.0) -> None:
        """Graceful shutdown: turn :attr:`ready` false, answer new association requests
        with rejected-transient for ``delay`` seconds (while load balancers notice), stop
        listening, let running associations finish for up to ``grace`` seconds, then
        abort the rest, logging each (a C-GET or C-MOVE still running sends its final
        response first, :data:`STOP_GRACE`)."""
        self.draining = True
        self._log.info("draining", open_associations=len(self.associations), grace=grace, delay=delay)
        if delay > 0:
            await asyncio.sleep(delay)
        self.close()
        await self.wait_closed(grace)
        self._log.info("drained")

    async def serve_forever(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            self.close()
            await self.wait_closed()

    def close(self) -> None:
        """Stop listening; open associations carry on until :meth:`wait_closed`.
        Requests waiting for a paused server to open are answered at once
        (rejected-transient), not after the rest of :attr:`paused_wait`."""
        if self._server is not None:
            self._server.close()
        self._opened.set()  # a paused server stays paused: its waiters are refused now
        for welcome in list(self._preambles):
            welcome.cancel()
        self._flush_warnings()

    async def wait_closed(self, grace: float = 10.0) -> None:
        """Wait up to ``grace`` seconds for open associations to end, then abort them.

        An association already released or aborted (Sta13, PS3.8 Table 9-10: only the
        peer's close of the connection is awaited, up to ARTIM) is closed at once: a peer
        that keeps the connection after the A-RELEASE-RP holds no shutdown."""
        self._close_ended()
        pending = list(self.associations)  # also those ended and still removing their files
        if pending:
            _done, rest = await asyncio.wait([asyncio.ensure_future(a.wait_closed()) for a in pending], timeout=grace)
            for fut in rest:
                fut.cancel()
            self._close_ended()
            await _stop_operations(self.associations)
            for assoc in list(self.associations):
                if not assoc.is_closed and not _ended(assoc):
                    assoc.log.warning("aborting association still open after the grace period", grace=grace)
                    assoc.abort("server shutting down")
            still = [a for a in self.associations if not a.is_closed]
            if still:
                await asyncio.wait([asyncio.ensure_future(a.wait_closed()) for a in still], timeout=2.0)
                for assoc in still:
                    if not assoc.is_closed and assoc.transport is not None:
                        assoc.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        self._flush_warnings()  # those of connections ended meanwhile

    def _close_ended(self) -> None:
        for assoc in list(self.associations):
            if _ended(assoc) and assoc.transport is not None:
                assoc.transport.close()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()


#: Seconds the operations still running when the grace period ends get to send their
#: final response (:func:`_stop_operations`) before their associations are aborted.
STOP_GRACE = 2.0


async def _stop_operations(associations: Any) -> None:
    """Before the associations still open after the grace period are aborted: each
    operation that can end at once with a final response (``Operation.on_stop``: a
    C-MOVE or C-GET, its sub-operations not done counted failed, PS3.4 C.4.2.3.1,
    C.4.3.3.1) does, within :data:`STOP_GRACE` seconds."""
    stops = [
        op.on_stop()
        for assoc in list(associations)
        if not assoc.is_closed and not _ended(assoc) and getattr(assoc, "session", None) is not None
        for op in assoc.session.operations()
        if op.on_stop is not None
    ]
    if stops:
        await asyncio.wait([asyncio.ensure_future(stop) for stop in stops], timeout=STOP_GRACE)


def _ended(assoc: Association) -> bool:
    """Released or aborted, waiting only for the peer to close the connection (Sta13)."""
    from .fsm import Sta13

    return assoc.fsm.state is Sta13 and not assoc.is_closed
