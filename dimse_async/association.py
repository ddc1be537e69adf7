"""One association as an ``asyncio.Protocol``: the thin adapter around the sans-I/O core.

:class:`Association` moves bytes between the socket and :class:`~dimse_async.fsm.UpperLayer`,
runs the outputs it returns (writes, ARTIM and other timers, closing), reassembles
DIMSE messages, correlates responses with requests by message id, runs SCP handlers
as tasks within the negotiated asynchronous operations window, and pauses reading
when handlers fall behind.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydicom.uid import UID

from . import fsm
from .acse import (
    Negotiated,
    PresentationContext,
    context_result_text,
    negotiate,
    reject_text,
    requestor_contexts,
)
from .dimse import (
    Command,
    CommandField,
    DIMSEError,
    Message,
    MessageAssembler,
    Status,
    encode_command,
    fragment,
    fragment_stream,
)
from .exceptions import (
    AssociationAborted,
    AssociationError,
    AssociationRejected,
    AssociationTimeout,
    DIMSEFailure,
    NoAcceptedContext,
)
from .keepalive import set_keepalive
from .log import debug_enabled, get_logger
from .pdu import AbortReason, AssociateRJ, AssociateRQ
from .proxy import address_in
from .services import qr, verification
from .services.storage import Spool, c_store, make_spool, scp_c_store
from .tls import TLSInfo, session_info

if TYPE_CHECKING:
    from .ae import AE
    from .server import Server

__all__ = ["Association"]

_ids = itertools.count(1)
_WRITE_BATCH = 1 << 20  # join up to this many bytes of PDUs into one write


class Association(asyncio.Protocol):
    """A DICOM association, requestor or acceptor side.

    Users get one from ``AE.associate()`` (requestor) or in SCP handlers as
    ``request.assoc`` (acceptor). DIMSE operations: :meth:`c_echo`; the lifecycle:
    :meth:`release`, :meth:`abort`, :meth:`wait_closed`.
    """

    def __init__(self, ae: AE, *, requestor: bool, server: Server | None = None):
        self.ae = ae
        self.requestor = requestor
        self.server = server
        self.id = f"{next(_ids):x}"
        self.loop = asyncio.get_running_loop()
        self.fsm = fsm.UpperLayer(requestor=requestor, max_pdu_receive=ae.max_pdu)
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        #: Acceptor behind a PROXY protocol load balancer: the client's address from the
        #: header (``peer`` then holds it) and the proxy's own address.
        self.proxied_peer: tuple[str, int] | None = None
        self.via: tuple[str, int] | None = None
        #: The TLS session (version, cipher, verified peer certificate subject) or ``None``.
        self.tls: TLSInfo | None = None
        #: Requestor: seconds the TCP (and TLS) connect and the negotiation took.
        self.timings: dict[str, float] = {}
        self.local_ae = ae.ae_title
        self.peer_ae = ""
        self.request: AssociateRQ | None = None
        self.negotiated: Negotiated | None = None
        self.log = get_logger(assoc=self.id)
        self._debug = debug_enabled(self.log)

        self._established: asyncio.Future[None] = self.loop.create_future()
        self._release_confirm: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = self.loop.create_future()
        self._end_reason: str | None = None
        self._released = False

        self._artim: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._last_tx = 0.0  # last time the peer took data from us (resume_writing)
        self._last_dimse = 0.0  # last DIMSE message either way (idle release)
        self._idle_release: asyncio.TimerHandle | None = None

        self._assembler = MessageAssembler(sink_for=self._sink_for)
        self._send_lock = asyncio.Lock()
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._pause_reasons: set[str] = set()

        self._msg_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message] | asyncio.Queue[Message]] = {}
        self._window: asyncio.Semaphore | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        # SCP side: requests being performed, those waiting for a free slot in the
        # negotiated window, and operations a C-CANCEL can reach (by message id).
        self._serving: set[asyncio.Task[Any]] = set()
        self._backlog: collections.deque[Message] = collections.deque()
        self.running_operations: dict[int, Any] = {}
        #: Per-association C-STORE handler override (e.g. a C-GET's sink).
        self.store_handler: Callable[..., Awaitable[Any]] | None = None
        self._max_performed = 1
        self._contexts_by_id: dict[int, PresentationContext] = {}

        # Accounting for the log: bytes each way, operations by kind, open operations
        # (message id -> start time, data set bytes, request) for their outcome line.
        self._opened_at = self.loop.time()
        self.bytes_received = 0
        self.bytes_sent = 0
        self.operations: collections.Counter[str] = collections.Counter()
        self.failed_operations = 0
        self._ops_out: dict[int, tuple[float, int | None, Command]] = {}
        self._ops_in: dict[int, tuple[float, int | None, Command]] = {}

    # ------------------------------------------------------------------ properties

    @property
    def is_established(self) -> bool:
        return self.fsm.state is fsm.State.Sta6

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        return self.negotiated.accepted if self.negotiated else []

    @property
    def rejected_contexts(self) -> list[PresentationContext]:
        return [c for c in self.negotiated.contexts if not c.accepted] if self.negotiated else []

    @property
    def end_reason(self) -> str | None:
        """Why the association ended, if it ended other than by a normal release."""
        return self._end_reason

    def __repr__(self) -> str:
        return f"<Association {self.id} {self.local_ae}<->{self.peer_ae} {self.peer[0]}:{self.peer[1]} {self.fsm.state.name}>"

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - platform dependent
                pass
            if self.ae.keepalive is not None:
                set_keepalive(sock, *self.ae.keepalive)
        peer = self.proxied_peer or transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.tls = session_info(transport)
        transport.set_write_buffer_limits(high=4 * _WRITE_BATCH)
        self.log = self.log.bind(peer=f"{self.peer[0]}:{self.peer[1]}", local_ae=self.local_ae)
        if self.via is not None:
            self.log = self.log.bind(via=f"{self.via[0]}:{self.via[1]}")
        if self.tls is not None:
            self.log = self.log.bind(tls=self.tls.version, tls_subject=self.tls.peer_subject)
        if self.ae.observer is not None:
            self.ae.observer.association_started(self)
        self._last_rx = self.loop.time()
        if self.server is not None:
            self.server._track(self)
        self._run(self.fsm.connection_made())

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        self.bytes_received += len(data)
        if self._debug:
            self.log.debug("bytes received", n=len(data), state=self.fsm.state.name)
        self._run(self.fsm.receive_data(data))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        was = self.fsm.state
        outputs = self.fsm.connection_lost()
        self._run(outputs)
        if was not in (fsm.State.Sta1, fsm.State.Sta13) and self._end_reason is None:
            self._end_reason = self.fsm.failure or "connection lost"
        self._finish()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_tx = self.loop.time()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ----------------------------------------------------------- running outputs

    def _run(self, outputs: list[fsm.Output]) -> None:
        for out in outputs:
            kind = type(out)
            if kind is fsm.Send:
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(out.data)  # type: ignore[union-attr]
                    self.bytes_sent += len(out.data)  # type: ignore[union-attr]
            elif kind is fsm.PDataIndication:
                self._on_pdata(out)  # type: ignore[arg-type]
            elif kind is fsm.StartARTIM:
                if self._artim is not None:
                    self._artim.cancel()
                self._artim = self.loop.call_later(self.ae.artim_timeout, self._on_artim)
            elif kind is fsm.StopARTIM:
                if self._artim is not None:
                    self._artim.cancel()
                    self._artim = None
            elif kind is fsm.CloseTransport:
                if self.transport is not None:
                    self.transport.close()
            elif kind is fsm.AssociateIndication:
                self._spawn(self._on_associate_request(out.rq))  # type: ignore[union-attr]
            elif kind is fsm.AssociateAccepted:
                self._on_accepted(out)  # type: ignore[arg-type]
            elif kind is fsm.AssociateRejected:
                rj = out.rj  # type: ignore[union-attr]
                self._end_reason = f"rejected: {reject_text(rj)}"
                self.log.info("association rejected by peer", reason=reject_text(rj))
                if not self._established.done():
                    self._established.set_exception(AssociationRejected(rj))
            elif kind is fsm.ReleaseIndication:
                self._on_release_indication(out.collision)  # type: ignore[union-attr]
            elif kind is fsm.ReleaseConfirm:
                self._released = True
                if self.fsm.state is fsm.State.Sta12:  # acceptor side of a collision
                    self.loop.call_soon(self._release_response)
                if self._release_confirm is not None and not self._release_confirm.done():
                    self._release_confirm.set_result(None)
            elif kind is fsm.PeerAbort:
                self._aborted(f"aborted by peer (A-ABORT source {out.source}, reason {out.reason})")  # type: ignore[union-attr]
            elif kind is fsm.ProviderAbort:
                self._aborted(f"provider abort: {out.reason}")  # type: ignore[union-attr]
            # ConnectTransport: the requestor opens the connection itself (see AE.associate).

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)
        return task

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, AssociationError):
                self.log.error("internal error in association task", error=repr(exc))
                self.abort(f"internal error: {exc!r}")
        if task in self._serving:
            self._serving.discard(task)
            while self._backlog and len(self._serving) < self._max_performed and not self._closed.done():
                self._start_serving(self._backlog.popleft())
            if not self._backlog:
                self._resume_reading("window")

    def _pause_reading(self, reason: str) -> None:
        """Stop reading the socket until every reason to pause is gone (backpressure)."""
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._pause_reasons.add(reason)

    def _resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _on_artim(self) -> None:
        self._artim = None
        self._run(self.fsm.artim_expired())
        if self.fsm.state is fsm.State.Sta1 and self.transport is not None:
            self.transport.abort()  # ARTIM expired: do not wait to flush to a silent peer
        if self.fsm.failure and self._end_reason is None:
            self._end_reason = self.fsm.failure
        if self.fsm.state is fsm.State.Sta1:
            self.log.warning("ARTIM timer expired, connection closed", reason=self.fsm.failure)

    def _cancel_timers(self) -> None:
        for handle in (self._artim, self._idle, self._idle_release):
            if handle is not None:
                handle.cancel()
        self._artim = self._idle = self._idle_release = None

    def _arm_idle_release(self) -> None:
        """Requestor with ``AE(idle_release=...)``: release after that long without DIMSE traffic."""
        delay = self.ae.idle_release
        if delay is None or not self.requestor or self._closed.done():
            return
        self._idle_release = self.loop.call_at(self._last_dimse + delay, self._check_idle_release)

    def _check_idle_release(self) -> None:
        self._idle_release = None
        delay = self.ae.idle_release
        if delay is None or self._closed.done() or not self.is_established:
            return
        if self._pending or self.loop.time() - self._last_dimse < delay:
            if self._pending:
                self._last_dimse = self.loop.time()
            self._arm_idle_release()
            return
        self.log.info("releasing idle association", idle_release=delay)
        self._spawn(self.release())

    def _arm_idle(self) -> None:
        timeout = self.ae.network_timeout
        if timeout is None or self._closed.done():
            return
        self._idle = self.loop.call_at(max(self._last_rx, self._last_tx) + timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._idle = None
        timeout = self.ae.network_timeout
        if timeout is None or self._closed.done():
            return
        now = self.loop.time()
        silent = now - max(self._last_rx, self._last_tx) >= timeout
        # Handlers blocked on a peer that neither sends nor reads are not local work.
        if silent and (self._write_paused or (not self._handlers and not self._pending)):
            self.abort(f"network idle timeout ({timeout} s)")
            return
        if silent:
            self._last_rx = now  # busy locally: not idle
        self._arm_idle()

    def _aborted(self, reason: str) -> None:
        if self._end_reason is None:
            self._end_reason = reason
        self.log.warning("association aborted", reason=reason)
        self._settle_waiters(AssociationAborted(reason), released=False)

    def _settle_waiters(self, exc: Exception, *, released: bool) -> None:
        """Answer everyone still waiting on this association: ``exc``, or a completed
        release when ``released``."""
        if not self._established.done():
            self._established.set_exception(exc)
        if self._release_confirm is not None and not self._release_confirm.done():
            if released:
                self._release_confirm.set_result(None)
            else:
                self._release_confirm.set_exception(exc)
        self._fail_pending(exc)

    def _fail_pending(self, exc: Exception) -> None:
        for waiter in self._pending.values():
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(exc)  # type: ignore[arg-type]
            elif not waiter.done():
                waiter.set_exception(exc)
        self._pending.clear()

    def _finish(self) -> None:
        if self._closed.done():
            return
        self._cancel_timers()
        reason = self._end_reason
        self._settle_waiters(AssociationAborted(reason or "association closed"), released=self._released)
        for task in list(self._handlers):
            task.cancel()
        partial = self._assembler._current
        if partial is not None and isinstance(partial.sink, Spool):
            partial.sink.discard()  # an interrupted instance never looks complete
        self._closed.set_result(None)
        if self.server is not None:
            self.server._untrack(self)
        if self.ae.observer is not None:
            self.ae.observer.association_ended(self)
        if self.negotiated is not None:
            event = "released" if self._released and reason is None else "aborted"
            self.ae._fire(event, self)
        # Mark retrieved exceptions on futures nobody awaits.
        for fut in (self._established, self._release_confirm):
            if fut is not None and fut.done() and not fut.cancelled():
                fut.exception()
        ops = ",".join(f"{name}:{n}" for name, n in sorted(self.operations.items())) or "none"
        fields: dict[str, Any] = {
            "ops": ops,
            "failed": self.failed_operations,
            "rx_bytes": self.bytes_received,
            "tx_bytes": self.bytes_sent,
            "duration_ms": round((self.loop.time() - self._opened_at) * 1000),
        }
        if reason:
            fields["reason"] = reason
        self.log.info("association closed", **fields)

    # ----------------------------------------------------------- establishment

    async def _on_associate_request(self, rq: AssociateRQ) -> None:
        """Acceptor: judge the A-ASSOCIATE-RQ (AE-6 issued the indication; we are Sta3)."""
        self.request = rq
        self.peer_ae = rq.calling_ae
        self.log = self.log.bind(peer_ae=rq.calling_ae, called_ae=rq.called_ae)
        ae = self.ae
        ae._fire("requested", self)
        result: Any
        if self.server is not None and self.server.over_limit():
            result, neg = AssociateRJ(2, 3, 2), None  # rejected-transient, local-limit-exceeded
        elif ae.allowed_peer_addresses is not None and not address_in(self.peer[0], ae.allowed_peer_addresses):
            self.log.warning("peer address not allowed", address=self.peer[0])
            result, neg = AssociateRJ(1, 1, 1), None  # rejected-permanent, service-user, no-reason-given
        else:
            ok, response = True, None
            identity = rq.user_info.identity_rq
            if identity is not None and ae._authenticator is not None:
                try:
                    ok, response = await asyncio.wait_for(ae._authenticator(identity, self), ae.acse_timeout)
                except Exception as exc:  # the hook failed: treat as a refusal, say why
                    self.log.warning("user identity check failed", error=repr(exc))
                    ok, response = False, None
            policy = ae._acceptor_policy()
            result, neg = negotiate(rq, policy, identity_ok=ok, identity_response=response)
        if self.fsm.state is not fsm.State.Sta3:
            return  # the peer aborted or went away while we decided
        if isinstance(result, AssociateRJ):
            self._end_reason = f"rejected: {reject_text(result)}"
            self.log.info("association rejected", reason=reject_text(result))
            self._run(self.fsm.reject(result))
            ae._fire("rejected", self)
            return
        assert neg is not None
        self._set_negotiated(neg)
        self._run(self.fsm.accept(result))
        self._log_negotiation("association accepted")
        ae._fire("accepted", self)
        if not self._established.done():
            self._established.set_result(None)

    def _on_accepted(self, out: fsm.AssociateAccepted) -> None:
        """Requestor: the peer accepted (AE-3)."""
        assert self.request is not None
        self._set_negotiated(requestor_contexts(self.request, out.ac))
        self._log_negotiation("association accepted by peer")
        self.ae._fire("accepted", self)
        if not self._established.done():
            self._established.set_result(None)

    def _set_negotiated(self, neg: Negotiated) -> None:
        self.negotiated = neg
        self._contexts_by_id = {c.id: c for c in neg.accepted}
        self._window = asyncio.Semaphore(neg.max_ops_invoked or 1 << 16)
        self._max_performed = neg.max_ops_performed or 1 << 16
        self._arm_idle()
        self._last_dimse = self.loop.time()
        self._arm_idle_release()

    def _log_negotiation(self, what: str) -> None:
        neg = self.negotiated
        assert neg is not None
        self.log.info(
            what,
            contexts=f"{len(neg.accepted)}/{len(neg.contexts)}",
            window=f"{neg.max_ops_invoked},{neg.max_ops_performed}",
        )
        if not self._debug:
            return
        self.log.debug(
            "negotiated",
            accepted=[f"{c.id}:{_uid_name(c.abstract_syntax)}/{_uid_name(c.transfer_syntax)}" for c in neg.accepted],
            rejected=[
                f"{c.id}:{_uid_name(c.abstract_syntax)}:{context_result_text(c.result)}"
                for c in neg.contexts
                if not c.accepted
            ],
            peer_max_pdu=neg.peer_max_pdu,
            window=(neg.max_ops_invoked, neg.max_ops_performed),
            peer_impl=neg.peer_implementation_version or neg.peer_implementation_uid,
        )

    async def _wait_established(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._established), timeout)
        except TimeoutError:
            self.abort(f"association negotiation timeout ({timeout} s)")
            raise AssociationTimeout(f"no A-ASSOCIATE response within {timeout} s") from None

    # ----------------------------------------------------------- release and abort

    async def release(self, timeout: float | None = None) -> None:
        """A-RELEASE (PS3.8 §7.2): waits for outstanding requests, then for A-RELEASE-RP.

        A peer that does not answer within ``timeout`` (default: ACSE timeout) is aborted.
        """
        if self.fsm.state is not fsm.State.Sta6:
            if not self._closed.done() and self.fsm.state is not fsm.State.Sta1:
                await self.wait_closed()
            return
        if self._pending:
            await asyncio.gather(
                *(w for w in self._pending.values() if isinstance(w, asyncio.Future)), return_exceptions=True
            )
        if self.fsm.state is not fsm.State.Sta6:
            return
        async with self._send_lock:
            self._release_confirm = self.loop.create_future()
            self._run(self.fsm.release())
        timeout = self.ae.acse_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._release_confirm), timeout)
        except TimeoutError:
            self.abort(f"no A-RELEASE-RP within {timeout} s")
            raise AssociationTimeout(f"no A-RELEASE response within {timeout} s") from None
        await self.wait_closed()

    def _on_release_indication(self, collision: bool) -> None:
        if collision:
            self.log.info("release collision", side="requestor" if self.requestor else "acceptor")
            if self.requestor:  # Sta9: answer at once (AR-9)
                self.loop.call_soon(self._release_response)
            return  # acceptor (Sta10) waits for the A-RELEASE-RP first
        self._released = True
        self._spawn(self._release_after_handlers())

    async def _release_after_handlers(self) -> None:
        """The peer asked to release (Sta8): let running handlers send their responses."""
        current = asyncio.current_task()
        others = [t for t in self._handlers if t is not current]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        self._release_response()

    def _release_response(self) -> None:
        if self.fsm.state in (fsm.State.Sta8, fsm.State.Sta9, fsm.State.Sta12):
            self._run(self.fsm.release_response())

    def abort(self, reason: str = "aborted by local user") -> None:
        """A-ABORT (PS3.8 §7.3), service-user source. Safe to call in any state."""
        state = self.fsm.state
        if state in (fsm.State.Sta1, fsm.State.Sta2, fsm.State.Sta13):
            if self.transport is not None and state is not fsm.State.Sta13:
                self.transport.close()
            if self._end_reason is None:
                self._end_reason = reason
            return
        self._end_reason = self._end_reason or reason
        self.log.info("aborting association", reason=reason)
        self._run(self.fsm.abort(reason))
        self._aborted(reason)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # ----------------------------------------------------------- DIMSE transport

    def context_for(self, abstract_syntax: str, *, as_scp: bool = False) -> PresentationContext:
        """The first accepted context for ``abstract_syntax`` where we may take the role."""
        for ctx in self.accepted_contexts:
            if ctx.abstract_syntax == abstract_syntax and (ctx.as_scp if as_scp else ctx.as_scu):
                return ctx
        raise NoAcceptedContext(
            f"no accepted presentation context for {_uid_name(abstract_syntax)} with us as {'SCP' if as_scp else 'SCU'}"
        )

    def _check_can_send(self) -> None:
        if self.fsm.state not in (fsm.State.Sta6, fsm.State.Sta8):
            raise AssociationAborted(self._end_reason or f"association not established ({self.fsm.state.name})")

    async def _drain(self) -> None:
        if self._write_paused and self.transport is not None and not self.transport.is_closing():
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    async def send_message(self, context_id: int, command: Command, dataset: bytes | memoryview | Any = None) -> None:
        """Send one DIMSE message, fragmented for the peer's maximum PDU length.

        ``dataset`` is bytes, or a payload with ``length`` and ``read(n)`` that is
        streamed in PDU-sized pieces (a file). Messages never interleave: the send lock
        is held from the first fragment to the last; small messages go out in one
        write, large ones in ~1 MiB writes that wait for the transport to drain.
        """
        if dataset is not None:
            command.data_set_type = 0x0000
        cmd = encode_command(command)
        max_pdu = self.negotiated.peer_max_pdu if self.negotiated else 0
        async with self._send_lock:
            self._check_can_send()
            self._track_sent(command, dataset)
            batch = list(fragment(context_id, cmd, True, max_pdu))
            size = sum(map(len, batch))
            if dataset is not None:
                pdus = (
                    fragment(context_id, dataset, False, max_pdu)
                    if isinstance(dataset, (bytes, bytearray, memoryview))
                    else fragment_stream(context_id, dataset, max_pdu)
                )
                started = False
                try:
                    for pdu in pdus:
                        batch.append(pdu)
                        size += len(pdu)
                        if size >= _WRITE_BATCH:
                            self._run(self.fsm.send_pdata(b"".join(batch)))
                            started = True
                            batch, size = [], 0
                            await self._drain()
                            self._check_can_send()
                except BaseException as exc:
                    if started:
                        # Part of the message is on the wire: the peer can never see it
                        # complete, so the association cannot carry on (PS3.8 Annex E).
                        self.abort(f"sending {command.name} failed midway: {exc!r}")
                    raise
            if batch:
                self._run(self.fsm.send_pdata(b"".join(batch) if len(batch) > 1 else batch[0]))
            if self._debug:
                self.log.debug("message sent", command=command.name, context=context_id, dataset=dataset is not None)
            self._last_dimse = self.loop.time()
            if self.ae.observer is not None:
                self.ae.observer.message_sent(self, command)
            await self._drain()

    def _next_message_id(self) -> int:
        for _ in range(0x10000):
            mid = next(self._msg_ids) & 0xFFFF
            if mid and mid not in self._pending:
                return mid
        raise DIMSEFailure("no free message id")  # pragma: no cover

    async def _request(
        self, context: PresentationContext, command: Command, dataset: bytes | None = None, timeout: float | None = None
    ) -> Message:
        """Send a request and await its single response (within the async ops window)."""
        assert self._window is not None
        async with self._window:
            self._check_can_send()
            mid = self._next_message_id()
            command.message_id = mid
            waiter: asyncio.Future[Message] = self.loop.create_future()
            self._pending[mid] = waiter
            try:
                await self.send_message(context.id, command, dataset)
                timeout = self.ae.dimse_timeout if timeout is None else timeout
                try:
                    return await asyncio.wait_for(waiter, timeout)
                except TimeoutError:
                    self.abort(f"no {command.name} response within {timeout} s")
                    raise AssociationTimeout(f"no {command.name} response within {timeout} s") from None
            finally:
                self._pending.pop(mid, None)

    def _on_pdata(self, out: fsm.PDataIndication) -> None:
        if self.fsm.state in (fsm.State.Sta1, fsm.State.Sta13):
            return  # aborted earlier in this batch of PDUs: the data is ignored (AA-6)
        try:
            events = self._assembler.receive(out.pdu.pdvs)
            for kind, msg in events:
                if msg.context_id not in self._contexts_by_id:
                    raise DIMSEError(f"message on presentation context {msg.context_id}, which was not accepted")
                if kind == "command" and msg.command.has_dataset:
                    if msg.command.command_field in _NO_DATASET_REQUESTS:
                        raise DIMSEError(f"{msg.command.name} must not carry a data set")
                    continue  # its data set follows
                self._on_message(msg)
        except DIMSEError as exc:
            self.log.warning("DIMSE protocol violation", error=str(exc))
            self._run(self.fsm.provider_abort(f"DIMSE protocol violation: {exc}", AbortReason.NOT_SPECIFIED))

    def _sink_for(self, msg: Message) -> Spool | None:
        """Where an arriving data set goes: C-STORE data sets stream into a spool."""
        if msg.command.command_field == CommandField.C_STORE_RQ and msg.context_id in self._contexts_by_id:
            return make_spool(self, msg)
        return None

    def _on_message(self, msg: Message) -> None:
        cmd = msg.command
        if self._debug:
            self.log.debug("message received", command=cmd.name, context=msg.context_id)
        self._track_received(msg)
        self._last_dimse = self.loop.time()
        if self.ae.observer is not None:
            self.ae.observer.message_received(self, cmd)
        if cmd.is_response:
            waiter = self._pending.get(cmd.message_id_being_responded_to or -1)
            if waiter is None:
                raise DIMSEError(f"{cmd.name} answers message id {cmd.message_id_being_responded_to}, never sent")
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(msg)
            elif not waiter.done():
                waiter.set_result(msg)
            return
        if cmd.command_field == CommandField.C_CANCEL_RQ:
            op = self.running_operations.get(cmd.message_id_being_responded_to or -1)
            if op is not None:
                op.cancel()
            return  # C-CANCEL has no response (PS3.7 §9.3.2.3)
        if len(self._serving) < self._max_performed:
            self._start_serving(msg)
        else:
            # The peer exceeded the negotiated window: hold the request and stop reading
            # until a slot frees (C-CANCELs already read still get through).
            self._backlog.append(msg)
            self._pause_reading("window")

    # ----------------------------------------------------------- operation log

    def _track_sent(self, command: Command, dataset: Any) -> None:
        """Note a request we send, or log the outcome of one we performed."""
        if command.is_response:
            if command.status is not None and command.status not in (0xFF00, 0xFF01):
                started = self._ops_in.pop(command.message_id_being_responded_to or -1, None)
                if started is not None:
                    self._op_done("scp", started, Status(command.status, command.error_comment), command)
        elif command.command_field != CommandField.C_CANCEL_RQ and command.message_id is not None:
            size = None if dataset is None else (len(dataset) if hasattr(dataset, "__len__") else dataset.length)
            self._ops_out[command.message_id] = (self.loop.time(), size, command)

    def _track_received(self, msg: Message) -> None:
        """Note a request we are asked to perform, or log the outcome of one we sent."""
        cmd = msg.command
        if cmd.is_response:
            if cmd.status is not None and cmd.status not in (0xFF00, 0xFF01):
                started = self._ops_out.pop(cmd.message_id_being_responded_to or -1, None)
                if started is not None:
                    self._op_done("scu", started, Status(cmd.status, cmd.error_comment), cmd)
        elif cmd.command_field != CommandField.C_CANCEL_RQ and cmd.message_id is not None:
            size = len(msg.dataset) if msg.dataset is not None else getattr(msg.sink, "size", None)
            self._ops_in[cmd.message_id] = (self.loop.time(), size, cmd)

    def _op_done(self, role: str, started: tuple[float, int | None, Command], status: Status, rsp: Command) -> None:
        """One line per finished operation: DEBUG on success, INFO otherwise."""
        t0, size, rq = started
        name = rq.name.removesuffix("-RQ")
        self.operations[name] += 1
        ok = status == 0
        if not ok and status.category != "warning":
            self.failed_operations += 1
        if ok and not self._debug:
            return
        fields: dict[str, Any] = {"role": role, "status": f"0x{int(status):04X}"}
        uid = rq.affected_sop_instance_uid or rsp.affected_sop_instance_uid
        if uid:
            fields["sop_instance"] = uid
        if size is not None:
            fields["bytes"] = size
        fields["ms"] = round((self.loop.time() - t0) * 1000, 1)
        if rsp.completed is not None or rsp.failed is not None:
            fields["sub_ops"] = f"{rsp.completed or 0} completed, {rsp.failed or 0} failed, {rsp.warning or 0} warning"
        if ok:
            self.log.debug(f"{name} done", **fields)
        else:
            if status.error_comment:
                fields["error_comment"] = status.error_comment
            self.log.info(f"{name} {status.category}", **fields)

    def _start_serving(self, msg: Message) -> None:
        self._serving.add(self._spawn(self._serve(msg)))

    async def _serve(self, msg: Message) -> None:
        """Run the SCP side of one request and send its response."""
        cmd = msg.command
        ctx = self._contexts_by_id[msg.context_id]
        service = _SCP_SERVICES.get(cmd.command_field)
        if service is None:
            self.log.warning("unsupported DIMSE request", command=cmd.name)
            rsp = Command(cmd.command_field | 0x8000, message_id_being_responded_to=cmd.message_id, status=0x0211)
            rsp.affected_sop_class_uid = cmd.affected_sop_class_uid
            await self.send_message(ctx.id, rsp)
            return
        await service(self, ctx, msg)

    # ----------------------------------------------------------- DIMSE-C: verification

    async def c_echo(self, *, timeout: float | None = None) -> Status:
        """C-ECHO (PS3.7 §9.1.5, PS3.4 Annex A): returns the response status."""
        return await verification.c_echo(self, timeout=timeout)

    async def c_store(
        self,
        source: Any,
        *,
        priority: int = 0,
        move_originator: tuple[str, int] | None = None,
        timeout: float | None = None,
    ) -> Status:
        """C-STORE one instance (PS3.7 §9.1.1): a pydicom ``Dataset`` or a Part 10 file path.

        A file in an accepted transfer syntax is streamed from disk without decoding.
        Pipelines with other calls up to the negotiated window, e.g.
        ``await asyncio.gather(*(assoc.c_store(p) for p in paths))``.
        """
        return await c_store(self, source, priority=priority, move_originator=move_originator, timeout=timeout)

    def c_find(self, query: Any, model: str = "study", *, priority: int = 0) -> qr.Responses:
        """C-FIND (PS3.4 C.4.1, K.4): ``async for identifier in assoc.c_find(query):``.

        ``model``: "patient", "study", "patient-study", "worklist" or a SOP class UID.
        Leaving the loop early sends C-CANCEL; ``.status`` holds the final status.
        """
        return qr.c_find(self, query, model, priority=priority)

    def c_get(self, query: Any, model: str = "study", *, priority: int = 0, store: Any = None) -> qr.Responses:
        """C-GET (PS3.4 C.4.3): yields :class:`~dimse_async.services.qr.Progress`.

        Instances arrive as C-STORE sub-operations on this association (propose the
        storage classes with ``scp_role=True``) and go to ``store`` or the C-STORE handler.
        """
        return qr.c_get(self, query, model, priority=priority, store=store)

    def c_move(self, query: Any, destination: str, model: str = "study", *, priority: int = 0) -> qr.Responses:
        """C-MOVE (PS3.4 C.4.2) to the AE titled ``destination``: yields progress."""
        return qr.c_move(self, query, destination, model, priority=priority)


def _uid_name(uid: str) -> str:
    try:
        name = UID(uid).name
    except Exception:  # pragma: no cover
        return uid
    return name if name and name != uid else uid


# Requests that never carry a data set (PS3.7 §9.3.5, §9.3.2.3, §10.3.6).
_NO_DATASET_REQUESTS = frozenset({CommandField.C_ECHO_RQ, CommandField.C_CANCEL_RQ, CommandField.N_DELETE_RQ})

_SCP_SERVICES: dict[int, Callable[[Association, PresentationContext, Message], Awaitable[None]]] = {
    CommandField.C_ECHO_RQ: verification.scp_c_echo,
    CommandField.C_STORE_RQ: scp_c_store,
    CommandField.C_FIND_RQ: qr.scp_c_find,
    CommandField.C_GET_RQ: qr.scp_c_get,
    CommandField.C_MOVE_RQ: qr.scp_c_move,
}
