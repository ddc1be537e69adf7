"""One association as an ``asyncio.Protocol``: the thin adapter around the sans-I/O core.

:class:`AssociationProtocol` moves bytes between the socket and
:class:`~dimse_async.fsm.UpperLayer`, runs the outputs it returns (writes, ARTIM,
closing), keeps the idle timers, and carries the association through negotiation,
release and abort. Its DIMSE half (:class:`~dimse_async.messaging.DIMSEMessaging`)
feeds P-DATA to the sans-I/O :class:`~dimse_async.session.Session` and runs what that
returns. Together they implement :class:`~dimse_async.interface.DIMSEProvider`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any, cast

from . import fsm
from .acse import MIN_PEER_PDU, Negotiated, negotiation_summary, reject_text, requestor_contexts
from .exceptions import AssociationAborted, AssociationRejected, AssociationTimeout
from .interface import AssociationEvent, Settings
from .keepalive import set_keepalive
from .log import LOGGER_NAME, get_logger, log_info
from .messaging import HIGH_WATER, DIMSEMessaging
from .pdu import AssociateAC, AssociateRJ, AssociateRQ
from .session import (
    Session,
)

if TYPE_CHECKING:  # loaded by a TLS association only (connection_made)
    from .tls import TLSInfo

__all__ = ["AssociationProtocol"]

_ids = itertools.count(1)
_log = get_logger()  # bound per association (no logger look-up per association)
_stdlib_log = logging.getLogger(LOGGER_NAME)  # the one _log writes to (its level read per association)
_WIND_DOWN = 30.0  # seconds for an ended association's cancelled tasks, then for its file work
# Read once (a member read from its enum class is slow on Python 3.11: see fsm.Sta1).
_REQUESTED, _ACCEPTED, _REJECTED, _RELEASED, _ABORTED = (
    AssociationEvent.REQUESTED,
    AssociationEvent.ACCEPTED,
    AssociationEvent.REJECTED,
    AssociationEvent.RELEASED,
    AssociationEvent.ABORTED,
)


#: States where the peer's EOF closes the transport as it is (see eof_received).
_CLOSE_AT_EOF = (fsm.Sta1, fsm.Sta2, fsm.Sta13)


def _nothing() -> None:
    return None


class AssociationProtocol(DIMSEMessaging, asyncio.BufferedProtocol):
    """A DICOM association, requestor or acceptor side: transport, timers, session outputs.

    Received bytes land in the PDU reader's own buffer (``asyncio.BufferedProtocol``).
    """

    # Every attribute an association sets, its own and its DIMSE half's (messaging.py),
    # in slots: made at a fixed place per association instead of in a dict (CPython 3.11
    # keeps at most 30 attribute names per class in an instance's compact layout; past
    # that each association built a dict of ~45 entries, ~3 us). The instance still has a
    # ``__dict__`` (``get_buffer`` below, and what a subclass or an application adds).
    __slots__ = (
        # the adapter (this module)
        "settings",
        "ae",
        "requestor",
        "id",
        "loop",
        "fsm",
        "transport",
        "peer",
        "proxied_peer",
        "via",
        "tls",
        "timings",
        "local_ae",
        "peer_ae",
        "associate_rq",
        "negotiated",
        "_log",
        "_log_fields",
        "_debug",
        "_established",
        "_release_confirm",
        "_closed",
        "_wound_down",
        "_end_reason",
        "_released",
        "_peer_eof",
        "_timer",
        "_timer_at",
        "_refused",
        "_quiet",
        "_last_dimse",
        "_last_rx",
        "_last_tx",
        # its DIMSE half (DIMSEMessaging._init_messaging)
        "session",
        "store_handler",
        "oplog",
        "_send_lock",
        "_sending",
        "_write_paused",
        "_drain_waiter",
        "_pause_reasons",
        "_window",
        "_waiters",
        "_finished_ops",
        "_tasks",
        "_sink",
        "_writer",
        "_message_start",
        "_message_mark",
        "_last_request",
        "_spare_done",
        "_spare_for",
    )

    def __init__(self, settings: Settings, *, requestor: bool, ae: Any = None):
        self.settings = settings
        #: The AE this association belongs to (for handlers' convenience).
        self.ae = ae
        self.requestor = requestor
        self.id = f"{next(_ids):x}"
        self.loop = asyncio.get_running_loop()
        self.fsm = fsm.UpperLayer(
            requestor=requestor,
            max_pdu_receive=settings.max_pdu,
            artim_timeout=settings.artim_timeout,
            abort_artim_timeout=settings.abort_artim_timeout,
            pdu_timeout=settings.pdu_timeout,
            decode_rq=settings.decode_rq,
        )
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
        self.local_ae = settings.ae_title
        self.peer_ae = ""
        self.associate_rq: AssociateRQ | None = None
        self.negotiated: Negotiated | None = None
        # The bound logger is made when first used (see ``log``): an association that
        # logs nothing until its closing line binds its fields once, not three times.
        self._log: Any = None
        self._log_fields: dict[str, Any] = {"assoc": self.id}
        self._debug = _stdlib_log.isEnabledFor(logging.DEBUG)
        self._established: asyncio.Future[None] = self.loop.create_future()
        self._release_confirm: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = self.loop.create_future()
        self._wound_down: asyncio.Task[None] | None = None  # see _wind_down
        self._end_reason: str | None = None
        self._released = False
        self._peer_eof = False  # the peer half-closed after its A-RELEASE-RQ (see eof_received)
        self._timer: asyncio.TimerHandle | None = None  # the one wake-up: see _schedule
        self._timer_at = 0.0
        self._refused = False  # dropped by admission control before the upper layer started
        self._quiet: bool | None = None  # see warn_refusal(); None: not decided yet
        self._last_dimse = 0.0  # last DIMSE message either way (idle release)
        self._last_rx = self._last_tx = 0.0  # last bytes from the peer / last time it took ours
        # The transport asks the PDU reader itself where to receive (once per read: no
        # calls through this object and the upper layer; the reader is the core's for good).
        self.get_buffer = self.fsm.reader.get_buffer  # type: ignore[method-assign]
        self.fsm.reader.hold = True  # a message's next PDU goes to the rest of its buffer (see _on_pdata)
        self._init_messaging()

    @property
    def log(self) -> Any:
        """The association's logger, bound with its fields (``assoc``, ``peer``,
        ``local_ae``, ``peer_ae`` ...); made on first use."""
        log = self._log
        if log is None:  # (the fields handed over: later binds go to the logger)
            log = self._log = _log.bind_fields(self._log_fields)
        return log

    @log.setter
    def log(self, value: Any) -> None:
        self._log = value

    def _bind(self, fields: dict[str, Any]) -> None:
        """Bind ``fields`` to the association's logger (a field bound before keeps its
        place with the new value), or to the fields it will be made with."""
        if self._log is None:
            self._log_fields.update(fields)
        else:
            self._log = self._log.bind(**fields)

    @property
    def is_established(self) -> bool:
        return self.fsm.state is fsm.Sta6

    @property
    def peer_released(self) -> bool:
        """The peer asked to release (Sta8): our answers still go out, our requests fail."""
        return self.fsm.state is fsm.Sta8

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    @property
    def end_reason(self) -> str | None:
        """Why the association ended, if it ended other than by a normal release."""
        return self._end_reason

    def __repr__(self) -> str:
        return f"<Association {self.id} {self.local_ae}<->{self.peer_ae} {self.peer[0]}:{self.peer[1]} {self.fsm.state.name}>"

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport = self.transport
        # TCP_NODELAY is set by the event loop on the TCP transports it makes (asyncio and
        # uvloop alike), and by us on the sockets we make ourselves (the acceptor's, a
        # PROXY header's connection): no system call here for it.
        if self.settings.keepalive is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                set_keepalive(sock, *self.settings.keepalive)
        peer = self.proxied_peer or transport.get_extra_info("peername") or ("", 0)
        host = str(peer[0])
        if host[:7].lower() == "::ffff:":  # IPv4-mapped: counted and logged as the IPv4 address
            from .proxy import plain_address  # (a server-side module: a sender does not load it)

            host = plain_address(host)
        self.peer = (host, int(peer[1]))
        if transport.get_extra_info("ssl_object") is not None:
            from .tls import session_info  # (a plain TCP association does not load it)

            self.tls = session_info(transport)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        peer_text = f"{self.peer[0]}:{self.peer[1]}"
        if self._log is None:  # (the usual case: _bind without the call and its dict)
            fields = self._log_fields
            fields["peer"] = peer_text
            fields["local_ae"] = self.local_ae
        else:
            self._bind({"peer": peer_text, "local_ae": self.local_ae})
        if self.via is not None:
            self._bind({"via": f"{self.via[0]}:{self.via[1]}"})
        if self.tls is not None:
            self._bind({"tls": self.tls.version, "tls_subject": self.tls.peer_subject})
        if self.settings.observer is not None:
            self.settings.observer.association_started(self)
        self._last_rx = self.loop.time()
        if self.settings.on_open is not None and self.settings.on_open(self) is False:
            self._refused = True
            transport.abort()  # refused by the server's admission control (logged there)
            return
        self._run(self.fsm.connection_made(now=self._last_rx))

    def get_buffer(self, sizehint: int) -> memoryview:
        """The transport receives straight into the PDU reader's buffer (no copy, no join).
        (Each association answers with its reader's method directly: see ``__init__``.)"""
        return self.fsm.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_rx = now = self.loop.time()
        self.oplog.bytes_received += nbytes
        if self._debug:
            self.log.debug("bytes received", n=nbytes, state=self.fsm.state.name)
        self._run(self.fsm.buffer_updated(nbytes, now))

    def data_received(self, data: bytes) -> None:
        """The same for bytes handed over as an object (a transport that does not
        receive into our buffer)."""
        self._last_rx = now = self.loop.time()
        self.oplog.bytes_received += len(data)
        if self._debug:
            self.log.debug("bytes received", n=len(data), state=self.fsm.state.name)
        self._run(self.fsm.receive_data(data, now=now))

    def eof_received(self) -> bool | None:
        """The peer shut down its sending side (TCP FIN).

        After its A-RELEASE-RQ (Sta8) that is a half-close, not a lost connection: no
        P-DATA could follow the A-RELEASE-RQ anyway, so nothing waits on the peer any
        more (our requests failed at the release indication, and none can start in
        Sta8), while the answers to its requests and the A-RELEASE-RP still go out; the
        transport is closed once the A-RELEASE-RP is written (PS3.8 §7.2, Table 9-10).
        In Sta13 it is the close awaited, in Sta2 the end of a connection that never
        associated (AA-5; we have sent nothing). Anywhere else it is the end of the
        connection (Evt17: A-P-ABORT, AA-4), taken at once: what we had queued for the
        peer is dropped, not drained first while the association's work waits on a peer
        that is gone (a C-GET's C-STORE sub-operation behind megabytes the peer never
        reads)."""
        state, transport = self.fsm.state, self.transport
        if transport is None or state in _CLOSE_AT_EOF:
            return None  # close the transport (after what is buffered); connection_lost follows
        if (
            state is fsm.Sta8
            and not self.fsm.reader.buffered  # (a PDU cut short by the close is a lost connection)
            and transport.get_extra_info("sslcontext") is None  # (TLS closes at the peer's EOF whatever we answer)
        ):
            self._peer_eof = True
            if self._debug:
                self.log.debug("peer half-closed after its A-RELEASE-RQ: answering, then closing")
            return True
        transport.abort()  # connection_lost follows at once: Evt17
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.fsm.state
        self._run(self.fsm.connection_lost(now=self.loop.time()))
        if was not in (fsm.Sta1, fsm.Sta13) and self._end_reason is None:
            self._end_reason = self.fsm.failure or "connection lost"
        if exc is not None and isinstance(exc, ssl.SSLError) and self._end_reason is not None:  # a bad record, a refused renegotiation
            self._end_reason += f" (TLS: {exc.reason or exc})"
        self._finish()

    # ----------------------------------------------------------- upper layer outputs

    def _run(self, outputs: list[fsm.Output]) -> None:
        for out in outputs:
            if type(out) is fsm.Send:  # the two per-message outputs first, by identity
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    data = out.data
                    if isinstance(data, list):  # PDU headers and value slices: one writev, no join
                        transport.writelines(data)
                        self.oplog.bytes_sent += sum(map(len, data))
                    else:
                        transport.write(data)
                        self.oplog.bytes_sent += len(data)
            elif type(out) is fsm.PDataIndication:
                self._on_pdata(out)
            else:
                self._run_other(out)
        if self._timer is not None:  # the usual case, per PDU: has the core's deadline moved earlier?
            # (fsm.get_timer() inlined: this runs for every batch of outputs)
            at, core, pdu = self._timer_at, self.fsm.artim_deadline, self.fsm.pdu_deadline
            if (core is None or core >= at) and (pdu is None or pdu >= at):
                return  # the adapter's own deadlines only move later (see _set_negotiated)
        self._schedule()

    def _run_other(self, out: fsm.Output) -> None:
        """The outputs of association set-up, release, abort and timers."""
        kind = type(out)
        if kind is fsm.StartARTIM or kind is fsm.StopARTIM or kind is fsm.ConnectTransport:
            # The core keeps the ARTIM deadline (fsm.get_timer); the requestor opens the
            # connection itself (see AE.associate).
            return
        if type(out) is fsm.AssociateIndication:  # (an acceptor's one of each, by identity before the others)
            self._on_associate_indication(out.rq)
            return
        if type(out) is fsm.ReleaseIndication:
            self._on_release_indication(out.collision)
            return
        if isinstance(out, fsm.TimerExpired):
            self._end_reason = self._end_reason or out.reason
            what = "ARTIM timer expired, connection closed" if out.timer == "ARTIM" else f"{out.timer} timeout"
            reason = self.fsm.failure if out.timer == "ARTIM" else out.reason
            if self.negotiated is None:  # never associated: a silent or dripping client
                self.warn_refusal(what, what, reason=reason)
            else:
                self.log.warning(what, reason=reason)
        elif isinstance(out, fsm.Refused):
            self._end_reason = self._end_reason or out.reason
            self.warn_refusal("connection refused: protocol", "connection refused", reason=out.reason)
        elif isinstance(out, fsm.StopReading):
            self.pause_reading("aborted")  # for good: ARTIM closes the connection
        elif isinstance(out, fsm.CloseTransport) and self.transport is not None:
            if out.discard:
                self.transport.abort()  # nothing queued can matter to the peer any more
            else:
                self.transport.close()
        elif isinstance(out, fsm.AssociateIndication):
            self._on_associate_indication(out.rq)
        elif isinstance(out, fsm.AssociateAccepted):
            assert self.associate_rq is not None
            neg = requestor_contexts(self.associate_rq, out.ac)
            if 0 < neg.peer_max_pdu < MIN_PEER_PDU:
                # What an acceptor rejects (see acse._refusal); a requestor can only abort.
                why = f"peer's maximum length received {neg.peer_max_pdu} is below {MIN_PEER_PDU}"
                self.log.warning("association accepted by peer but unusable", why=why)
                self.abort(why)
                return
            self._set_negotiated(neg, "association accepted by peer")
        elif isinstance(out, fsm.AssociateRejected):
            self._end_reason = f"rejected: {reject_text(out.rj)}"  # on the "association closed" line
            if self._debug:
                self.log.debug("association rejected by peer", reason=reject_text(out.rj))
            if not self._established.done():
                self._established.set_exception(AssociationRejected(out.rj))
        elif isinstance(out, fsm.ReleaseIndication):
            self._on_release_indication(out.collision)
        elif isinstance(out, fsm.ReleaseConfirm):
            self._released = True
            if self.fsm.state is fsm.Sta12:  # acceptor side of a collision
                self.loop.call_soon(self._release_response)
            if self._release_confirm is not None and not self._release_confirm.done():
                self._release_confirm.set_result(None)
        elif isinstance(out, fsm.PeerAbort):
            self._aborted(f"aborted by peer (A-ABORT source {out.source}, reason {out.reason})")
        elif isinstance(out, fsm.ProviderAbort):
            self._aborted(f"provider abort: {out.reason}")

    # ----------------------------------------------------------- the one timer

    def _schedule(self) -> None:
        """Keep one ``call_at`` for the earliest deadline: the core's (ARTIM, PDU
        progress) and the adapter's own (network idle, idle release). A deadline that
        moved later is found when the timer fires early and is scheduled again."""
        if self._timer is not None:  # the usual case, per PDU: has the core's deadline moved earlier?
            core = self.fsm.get_timer()
            if core is None or core >= self._timer_at:
                return  # the adapter's own deadlines only move later (see _set_negotiated)
        if self._closed.done():
            return
        when = self.fsm.get_timer()
        if self.negotiated is not None or self._message_start is not None:
            # (before negotiation, with no message under way, the adapter has no deadline
            # of its own: _idle_deadline and _idle_release_deadline would find none)
            for deadline in (self._idle_deadline(), self._idle_release_deadline()):
                if deadline is not None and (when is None or deadline < when):
                    when = deadline
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        self._run(self.fsm.handle_timer(now))
        self._check_idle(now)
        self._check_idle_release(now)
        self._schedule()

    # ----------------------------------------------------------- life cycle

    def _aborted(self, reason: str, *, local: bool = False) -> None:
        self._end_reason = self._end_reason or reason
        if not local:  # a local abort was logged by abort()
            self.log.warning("association aborted", reason=reason)
        self._settle(AssociationAborted(reason), released=False)

    def _settle(self, exc: Exception, *, released: bool) -> None:
        """Answer everyone still waiting: ``exc``, or a completed release when ``released``."""
        if not self._established.done():
            self._established.set_exception(exc)
            self._established.exception()  # retrieved: a caller that timed out no longer waits
        if self._release_confirm is not None and not self._release_confirm.done():
            if released:
                self._release_confirm.set_result(None)
            else:
                self._release_confirm.set_exception(exc)
                self._release_confirm.exception()
        for mid, waiter in list(self._waiters.items()):
            waiter.fail(exc)
            self.session.forget_request(mid)
        self._waiters.clear()

    def _finish(self) -> None:
        if self._closed.done():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = self._end_reason
        if self._drain_waiter is not None:
            self._wake_drain()  # a send waiting for a peer that never read: the connection is gone
        settings = self.settings
        if settings.output_budget is not None:
            settings.output_budget.report(self, 0)  # (_report_output(0))
        release_confirm = self._release_confirm
        if (
            self._waiters
            or not self._established.done()
            or (release_confirm is not None and not release_confirm.done())
        ):  # someone still waits (not after a release the peer asked for: no exception made)
            self._settle(AssociationAborted(reason or "association closed"), released=self._released)
        tasks = list(self._tasks) if self._tasks else None
        if tasks:
            for task in tasks:
                task.cancel()
        if self._sink is not None:
            self._sink.discard()  # an interrupted instance never looks complete
            self._sink = None
        for op in self.session.operations():  # held back, or cancelled before they started
            if op.message.sink is not None:
                op.message.sink.discard()
        writer = self._writer
        if writer is not None:
            self._close_writer()
        self._closed.set_result(None)
        if tasks or (writer is not None and writer.submitted):
            self._wound_down = self.loop.create_task(self._wind_down(tasks or []))
        elif settings.on_close is not None:
            settings.on_close(self)
        if settings.observer is not None:
            settings.observer.association_ended(self)
        if self.negotiated is not None:
            released = self._released and reason is None
            self._hook(_RELEASED if released else _ABORTED)
        # Exceptions nobody awaits marked as retrieved (the established future holds one
        # only when the association never was; a release confirmation only when asked for).
        established = self._established
        if established.done() and not established.cancelled():
            established.exception()
        if release_confirm is not None and release_confirm.done() and not release_confirm.cancelled():
            release_confirm.exception()
        if self._refused:
            return
        if self.negotiated is None and self._quiet is not False and self.settings.limit_warning is not None:
            # Never associated (rejected, refused, silent, closed at once): this line is
            # held back with the warning about it, or on its own under a flood.
            if self._quiet is None:
                self._quiet = not self.settings.limit_warning("closed before association", self.peer[0])
            if self._quiet:
                return
        # The association's one INFO line (PS3.8 has no say; the contract): who,
        # what was negotiated, what was done, how long, and why it ended if not released.
        if not _stdlib_log.isEnabledFor(logging.INFO):  # (the logger self.log writes to)
            return
        neg = self.negotiated
        contexts = None
        if neg is not None:
            accepted = 0
            for context in neg.contexts:  # (not neg.accepted: no list made)
                if context.accepted:
                    accepted += 1
            contexts = f"{accepted}/{len(neg.contexts)}"
        fields, text = self.oplog.closing(self.loop.time(), contexts)
        if reason:
            fields["reason"] = reason
            text = None
        log_info(self.log, "association closed", fields, text)

    def warn_refusal(self, kind: str, event: str, **fields: Any) -> None:
        """A warning about a connection that is refused, rejected or dropped before it
        becomes an association: on an acceptor logged in full unless the server's limit
        for ``kind`` and the peer's address holds it back (then counted). The decision
        stands for the association's later lines (its "association closed" line)."""
        if self._quiet is None:
            gate = self.settings.limit_warning
            self._quiet = gate is not None and not gate(kind, self.peer[0])
        if not self._quiet:
            self.log.warning(event, **fields)

    def _hook(self, event: AssociationEvent) -> None:
        """The hooks for ``event``: not called when none is registered (the usual case)."""
        settings = self.settings
        hook, hooks = settings.hook, settings.hooks
        if hook is not None and (hooks is None or hooks.get(event)):
            hook(event, self)

    def _on_associate_indication(self, rq: AssociateRQ) -> None:
        """Acceptor: the AE judges the A-ASSOCIATE-RQ (AE-6 gave the indication; we are
        Sta3): at once when nothing needs awaiting (no task), else in a task."""
        self.associate_rq, self.peer_ae = rq, rq.calling_ae
        if self._log is None:  # (as in connection_made)
            fields = self._log_fields
            fields["peer_ae"] = rq.calling_ae
            fields["called_ae"] = rq.called_ae
        else:
            self._bind({"peer_ae": rq.calling_ae, "called_ae": rq.called_ae})
        judge_now = self.settings.judge_now
        if judge_now is None or self.fsm.state is not fsm.Sta3:
            self.spawn(self._on_associate_request(rq))
            return
        try:
            self._hook(_REQUESTED)
            decided = judge_now(self, rq)
            if decided is None:
                self.spawn(self._on_associate_request(rq, hooked=True))
            else:
                self._answer_request(*decided)
        except Exception as exc:  # as a failed association task would be
            self.log.error("internal error in association task", error=repr(exc))
            self.abort(f"internal error: {exc!r}")

    async def _on_associate_request(self, rq: AssociateRQ, *, hooked: bool = False) -> None:
        """Acceptor: the AE judges the A-ASSOCIATE-RQ, awaiting what it needs to."""
        if not hooked:
            self._hook(_REQUESTED)
        assert self.settings.judge is not None, "an acceptor needs Settings.judge"
        result, neg = await self.settings.judge(self, rq)
        self._answer_request(result, neg)

    def _answer_request(self, result: AssociateAC | AssociateRJ, neg: Negotiated | None) -> None:
        """A-ASSOCIATE response (accept or reject) to the request being judged."""
        if self.fsm.state is not fsm.Sta3:
            return  # the peer aborted or went away while we decided
        if isinstance(result, AssociateRJ):
            self._end_reason = f"rejected: {reject_text(result)}"  # on the "association closed" line
            if result.why:  # the request's own fault (admission refusals were logged by the AE)
                self.warn_refusal(
                    "association rejected", "association rejected", why=result.why, answer=reject_text(result)
                )
            elif self._debug:
                self.log.debug("association rejected", reason=reject_text(result))
            self._run(self.fsm.reject(result, now=self.loop.time()))
            self._hook(_REJECTED)
            return
        assert neg is not None
        self._run(self.fsm.accept(result, now=self.loop.time()))
        self._set_negotiated(neg, "association accepted")

    def _set_negotiated(self, neg: Negotiated, what: str) -> None:
        self.negotiated = neg
        self.session = Session(
            neg.contexts,  # (the session keeps the accepted ones: no list of them made here)
            max_performed=neg.max_ops_performed,
            streamed=self.settings.sinks,
            max_request_dataset=self.settings.max_request_dataset,
        )
        if neg.max_ops_invoked != 1:  # the window of one made with the association otherwise
            self._window = asyncio.Semaphore(neg.max_ops_invoked or 1 << 16)
        self._last_dimse = self.loop.time()
        timer = self._timer
        if timer is not None:  # the idle deadlines start now: the timer must not wake later than they are due
            for deadline in (self._idle_deadline(), self._idle_release_deadline()):
                if deadline is not None and deadline < self._timer_at:
                    timer.cancel()
                    self._timer = None
                    break
        self._schedule()
        if self._debug:  # INFO has the association's one line when it ends (see _finish)
            self.log.debug(
                what,
                contexts=f"{len(neg.accepted)}/{len(neg.contexts)}",
                window=f"{neg.max_ops_invoked},{neg.max_ops_performed}",
            )
            self.log.debug("negotiated", **negotiation_summary(neg))
        self._hook(_ACCEPTED)
        if not self._established.done():
            self._established.set_result(None)

    def request_association(self, rq: AssociateRQ) -> None:
        """Requestor: A-ASSOCIATE request (Evt1, AE-1); the caller then opens the transport."""
        self.associate_rq, self.peer_ae = rq, rq.called_ae
        self._bind({"peer_ae": rq.called_ae, "local_ae": self.local_ae})
        self._run(self.fsm.associate(rq, now=self.loop.time()))

    async def wait_established(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._established), timeout)
        except TimeoutError:
            self.abort(f"association negotiation timeout ({timeout} s)")
            raise AssociationTimeout(f"no A-ASSOCIATE response within {timeout} s") from None

    async def release(self, timeout: float | None = None) -> None:
        """A-RELEASE (PS3.8 §7.2): waits for outstanding requests, then for A-RELEASE-RP.

        A peer that does not answer within ``timeout`` (default: ACSE timeout; without
        one, the ARTIM timeout, PS3.8 §9.1.5: a release is never awaited forever) is
        aborted.
        """
        if timeout is None:
            timeout = self.settings.acse_timeout
            if timeout is None:
                timeout = self.settings.artim_timeout
        if self.fsm.state is fsm.Sta6 and self._waiters:
            # Each is bounded by the DIMSE timeout; without one, by the release's.
            outstanding = asyncio.gather(*(w.done for w in self._waiters.values()), return_exceptions=True)
            bound = self.settings.dimse_timeout
            try:
                await asyncio.wait_for(asyncio.shield(outstanding), timeout if bound is None else None)
            except TimeoutError:
                asked = ", ".join(sorted({w.name for w in self._waiters.values()}))
                self.abort(f"{asked} unanswered within {timeout} s of the release")
                raise AssociationTimeout(f"{asked} unanswered within {timeout} s of the release") from None
        async with self._lock():  # the state is judged after the last message went out
            if self.fsm.state is fsm.Sta6:
                self._release_confirm = self.loop.create_future()
                self._run(self.fsm.release(now=self.loop.time()))
        if self._release_confirm is None:  # released or aborted meanwhile, by either side
            if not self._closed.done() and self.fsm.state is not fsm.Sta1:
                await self.wait_closed()
            return
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
        self._message_start = None  # no P-DATA can follow (Sta8): no message to time out
        incomplete = self.session.receiving
        if incomplete is not None:
            # Its data set was cut by the release (no P-DATA can follow): never performed,
            # never answered (there is no request to answer); what arrived is dropped.
            self.log.warning(
                "peer released with a message incomplete: discarded",
                command=incomplete.command.name,
                received=self.session.assembler.received,
            )
            if self._sink is not None:
                self._sink.discard()
                self._sink = None
        if self._waiters:
            # No P-DATA can follow the peer's A-RELEASE-RQ (Sta8, PS3.8 Table 9-10: AA-8):
            # what we asked for will never be answered.
            asked = ", ".join(sorted({w.name for w in self._waiters.values()}))
            reason = f"the peer released the association with {asked} unanswered"
            self.log.warning("peer released with requests outstanding", outstanding=len(self._waiters), requests=asked)
            self._settle(AssociationAborted(reason), released=True)
        if self.session.idle and not self._sending:  # the usual case: every answer went out already
            self._release_response()
        else:
            self.spawn(self._release_after_handlers())

    async def _release_after_handlers(self) -> None:
        """The peer asked to release (Sta8): every request it sent, running or held back,
        is answered before A-RELEASE-RP (PS3.8 §7.2)."""
        current = asyncio.current_task()
        while not self.session.idle and (others := [t for t in self._tasks if t is not current]):
            await asyncio.wait(others, return_when=asyncio.FIRST_COMPLETED)
        self._release_response()

    def _release_response(self) -> None:
        if self.fsm.state in (fsm.Sta8, fsm.Sta9, fsm.Sta12):
            self._run(self.fsm.release_response(now=self.loop.time()))
            if self._peer_eof and self.transport is not None:
                self.transport.close()  # (after what is buffered) the peer sends nothing more: no ARTIM wait

    def abort(self, reason: str = "aborted by local user") -> None:
        """A-ABORT (PS3.8 §7.3), service-user source. Safe to call in any state."""
        self._end_reason = self._end_reason or reason
        state = self.fsm.state
        if state in (fsm.Sta1, fsm.Sta2, fsm.Sta13):
            if self.transport is not None and state is not fsm.Sta13:
                self.transport.close()
            return
        self.log.info("aborting association", reason=reason)
        self._run(self.fsm.abort(reason, now=self.loop.time()))
        self._aborted(reason, local=True)

    async def _wind_down(self, tasks: list[asyncio.Future[Any]]) -> None:
        """After the end: let the cancelled tasks finish, then the file work they and the
        end queued (the removal of spool files); only then is the association gone."""
        try:
            if tasks:
                await asyncio.wait(tasks, timeout=_WIND_DOWN)
            if self._writer is not None:
                await asyncio.wait_for(self._writer.submit(_nothing), _WIND_DOWN)
        except TimeoutError:
            self.log.warning("file work still under way after the association ended", timeout=_WIND_DOWN)
        finally:
            if self.settings.on_close is not None:
                self.settings.on_close(self)

    async def wait_closed(self) -> None:
        """Until the association has ended and its work is done: its tasks ended and no
        temporary file of its left (a spool of an interrupted instance)."""
        await asyncio.shield(self._closed)
        if self._wound_down is not None:
            await asyncio.shield(self._wound_down)
