"""The DICOM Upper Layer state machine (PS3.8 §9.2), sans I/O.

:data:`TRANSITIONS` is Table 9-10 written as data: ``(state, event) -> action``,
with states, events and actions named exactly as in the standard so the two can be
read side by side. :class:`UpperLayer` runs it: it takes bytes from the peer, local
service primitives and the time, and returns :mod:`output <dimse_async.fsm>`
objects (bytes to send, the transport to close, reading to stop, and
indications/confirmations for the local user). It owns no socket and no clock.

Timers are inputs, as in aioquic: every input takes ``now`` (any monotonic clock),
:meth:`UpperLayer.get_timer` says when the machine next needs to be woken and
:meth:`UpperLayer.handle_timer` runs what is due. Two timers live here: ARTIM
(PS3.8 §9.1.5; shorter once we have sent an A-ABORT, since only the peer's close is
awaited) and the PDU progress timeout (a PDU that has started arriving must be
complete within ``pdu_timeout`` seconds, however slowly its bytes drip in).
"""

from __future__ import annotations

from collections.abc import Callable

from .fsm_outputs import (
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CloseTransport,
    ConnectTransport,
    Output,
    PDataIndication,
    PeerAbort,
    ProviderAbort,
    Refused,
    ReleaseConfirm,
    ReleaseIndication,
    Send,
    StartARTIM,
    StopARTIM,
    StopReading,
    TimerExpired,
)
from .fsm_table import TRANSITIONS, Action, Event, State
from .pdu import (
    ABORT_SOURCE_PROVIDER,
    ABORT_SOURCE_USER,
    PDU,
    Abort,
    AbortReason,
    ACSEReason,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PDataTF,
    PDUError,
    PDUReader,
    RejectResult,
    RejectSource,
    ReleaseRP,
    ReleaseRQ,
)

__all__ = [
    "TRANSITIONS",
    "Action",
    "AssociateAccepted",
    "AssociateIndication",
    "AssociateRejected",
    "CloseTransport",
    "ConnectTransport",
    "Event",
    "InvalidPrimitive",
    "Output",
    "PDataIndication",
    "PeerAbort",
    "ProviderAbort",
    "Refused",
    "ReleaseConfirm",
    "ReleaseIndication",
    "Send",
    "StartARTIM",
    "State",
    "StopARTIM",
    "StopReading",
    "TimerExpired",
    "UpperLayer",
]


S, E, A = State, Event, Action

_PDU_EVENTS: dict[type, Event] = {
    AssociateAC: E.Evt3,
    AssociateRJ: E.Evt4,
    AssociateRQ: E.Evt6,
    PDataTF: E.Evt10,
    ReleaseRQ: E.Evt12,
    ReleaseRP: E.Evt13,
    Abort: E.Evt16,
}


# The states and events as module names, looked up once: reading a member from its class
# goes through EnumType.__getattr__'s slow attribute path on Python 3.11 (~900 instructions,
# ~0.2 us, each; an association's transitions read a dozen).
Sta1, Sta2, Sta3, Sta4, Sta5, Sta6, Sta7, Sta8, Sta9, Sta10, Sta11, Sta12, Sta13 = State
(
    Evt1, Evt2, Evt3, Evt4, Evt5, Evt6, Evt7, Evt8, Evt9, Evt10,
    Evt11, Evt12, Evt13, Evt14, Evt15, Evt16, Evt17, Evt18, Evt19,
) = Event  # fmt: skip
_STA6 = Sta6
_STATE_NAMES = {state: state.name for state in State}  # (a member's .name is slow too)
_UNEXPECTED_PDU = int(AbortReason.UNEXPECTED_PDU)  # the reason an A-ABORT for a PDU out of turn would give
_new = object.__new__
_NO_FRAMES = (Sta1, Sta4)  # no association, or the connection is gone: nothing is framed

# Outputs without data, and PDUs that are always the same bytes: made once.
_START_ARTIM, _STOP_ARTIM = StartARTIM(), StopARTIM()
_RELEASE_RQ, _RELEASE_RP = ReleaseRQ().encode(), ReleaseRP().encode()


class InvalidPrimitive(RuntimeError):
    """A local service primitive that Table 9-10 does not allow in the current state."""


# ---------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------


class UpperLayer:
    """One association's upper-layer protocol machine (PS3.8 §9.2).

    Inputs are methods: :meth:`receive_data` (bytes from the peer),
    :meth:`connection_made` / :meth:`connection_lost` (transport), :meth:`handle_timer`
    (or :meth:`artim_expired` directly), and the local primitives :meth:`associate`,
    :meth:`accept`, :meth:`reject`, :meth:`send_pdata`, :meth:`release`,
    :meth:`release_response`, :meth:`abort`. Each returns the list of outputs to carry
    out, in order, and takes ``now`` (seconds; without it the last time given is used).

    ``artim_timeout`` is the ARTIM value, ``abort_artim_timeout`` the one used after we
    sent an A-ABORT; ``pdu_timeout`` bounds the arrival of one PDU (``None``: no bound);
    after our A-ABORT at most ``after_abort_read`` more bytes are taken from the peer;
    ``decode_rq`` goes to the :class:`~dimse_async.pdu.PDUReader`.
    """

    def __init__(
        self,
        *,
        requestor: bool,
        max_pdu_receive: int,
        artim_timeout: float = 30.0,
        abort_artim_timeout: float = 5.0,
        pdu_timeout: float | None = None,
        after_abort_read: int = 64 << 10,
        decode_rq: Callable[[memoryview], AssociateRQ] | None = None,
    ):
        self.requestor = requestor
        self.state = Sta1
        self.reader = PDUReader(max_pdu_receive, decode_rq=decode_rq)
        self.artim_timeout = artim_timeout
        # (not min(): a builtin that parses its arguments slowly on 3.11, per association)
        self.abort_artim_timeout = abort_artim_timeout if abort_artim_timeout < artim_timeout else artim_timeout
        self.pdu_timeout = pdu_timeout
        self.after_abort_read = after_abort_read
        #: Set by the adapter while it does not read (our backpressure, not the peer's
        #: slowness): the PDU progress timeout then starts over instead of aborting.
        self.reading_paused = False
        self.now = 0.0
        self.artim_running = False
        self.artim_deadline: float | None = None
        self.pdu_deadline: float | None = None
        self._after_abort: int | None = None  # bytes received since we sent an A-ABORT
        self._unframeable = False
        #: Why the association ended, when it ended abnormally; for logs.
        self.failure: str | None = None
        #: (state, event, action) of every transition, newest last; bounded.
        self.history: list[tuple[State, Event, Action]] = []
        self._out: list[Output] = []
        self._pdu: PDU | None = None
        #: The P-DATA-TF PDUs of the pending P-DATA request (Evt9), until sent.
        self._outgoing: bytes | list[bytes | memoryview] = b""
        self._abort_source = ABORT_SOURCE_USER
        self._abort_reason = 0
        self._why: str | None = ""  # why an abort or close happens (None: see _reason)
        self._out_of_turn: tuple[type, State] = (PDataTF, Sta1)  # the last PDU that may come out of turn

    # -- inputs from the peer and the transport ------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, *, now: float | None = None) -> list[Output]:
        """Feed bytes received from the peer; decode and dispatch every whole PDU."""
        self._tick(now)
        out = self._count_after_abort(len(data))
        if self.state in _NO_FRAMES or self._unframeable:
            return out  # no association, or the stream cannot be framed again: ignored
        before = self.reader.buffered + len(data)
        self.reader.feed(data)
        out += self._take_pdus()
        self._pdu_progress(before)
        return out

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the transport should receive the next bytes (see :meth:`buffer_updated`)."""
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int, now: float | None = None) -> list[Output]:
        """``nbytes`` were received into :meth:`get_buffer`'s view: like :meth:`receive_data`
        (``now`` may be given by position: the adapter's call per read)."""
        if now is not None:
            self.now = now
        if self._after_abort is not None:
            out = self._count_after_abort(nbytes)
            if self.state in _NO_FRAMES or self._unframeable:
                return out  # ignored: the bytes are not kept
        elif self.state in _NO_FRAMES or self._unframeable:
            return []
        else:
            out = None
        reader = self.reader
        end = reader.end = reader.end + nbytes  # reader.buffer_updated(nbytes), inlined: per read
        before = end - reader.start  # pending plus received
        pdus = self._take_pdus()
        # _pdu_progress(before), inlined: this runs for every read
        after = reader.end - reader.start
        if after == 0 or after < before or self.pdu_timeout is None:
            self.pdu_deadline = None
            if after and self.pdu_timeout is not None:
                self.pdu_deadline = self.now + self.pdu_timeout
        elif self.pdu_deadline is None:
            self.pdu_deadline = self.now + self.pdu_timeout
        if out:
            out += pdus
            return out
        return pdus

    def _count_after_abort(self, n: int) -> list[Output]:
        """After our A-ABORT (Sta13) the peer's close is noticed, but what it keeps
        sending is not absorbed: past a little, reading stops (TCP pushes back) until
        ARTIM closes the connection."""
        if self._after_abort is None:
            return []
        over = self._after_abort <= self.after_abort_read < self._after_abort + n
        self._after_abort += n
        return [StopReading()] if over else []

    def _take_pdus(self) -> list[Output]:
        out: list[Output] = []
        reader = self.reader
        while self.state not in _NO_FRAMES:
            if reader.end - reader.start < 6:
                break  # not even a PDU header: next_pdu() would say None (no call)
            try:
                pdu = reader.next_pdu()
            except PDUError as exc:
                self._unframeable = True
                self._abort_source, self._abort_reason = ABORT_SOURCE_PROVIDER, int(exc.reason)
                self._why = f"invalid PDU: {exc}"
                out += self._handle(Evt19)
                break
            if pdu is None:
                break
            self._pdu = pdu
            if type(pdu) is PDataTF and self.state is _STA6:
                # Evt10 in Sta6 is DT-2 (P-DATA indication, stay in Sta6): the usual case,
                # run here without the table lookup (see _handle).
                history = self.history
                history.append(_DT_2)
                if len(history) > 64:
                    del history[:32]
                indication = _new(PDataIndication)  # (no __init__ frame: see pdu.PDUReader.next_pdu)
                indication.pdu = pdu
                out.append(indication)
                continue
            if type(pdu) is Abort:
                self._why = f"A-ABORT received (source {pdu.source}, reason {pdu.reason})"
            else:
                self._abort_source, self._abort_reason = ABORT_SOURCE_PROVIDER, _UNEXPECTED_PDU
                self._why, self._out_of_turn = None, (type(pdu), self.state)  # said if needed: see _reason
            out += self._handle(_PDU_EVENTS[type(pdu)])
        return out

    def connection_made(self, *, now: float | None = None) -> list[Output]:
        """Evt2 for the requestor (connect confirmation), Evt5 for the acceptor."""
        self._tick(now)
        return self._handle(Evt2 if self.requestor else Evt5)

    def connection_lost(self, *, now: float | None = None) -> list[Output]:
        """Evt17. Ignored once idle (the close we asked for ourselves)."""
        self._tick(now)
        self.pdu_deadline = None
        if self.state is Sta1:
            return []
        self._why = "transport connection closed by peer"
        return self._handle(Evt17)

    def artim_expired(self, *, now: float | None = None) -> list[Output]:
        """Evt18. A stale expiry (timer already stopped) is ignored."""
        self._tick(now)
        if not self.artim_running:
            return []
        self.artim_running = False
        self.artim_deadline = None
        self._why = f"ARTIM timer expired in {self.state.name}"
        return self._handle(Evt18)

    # -- time --------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next be called (``None``: no timer runs)."""
        artim, pdu = self.artim_deadline, self.pdu_deadline
        if artim is None or pdu is None:
            return pdu if artim is None else artim
        return artim if artim < pdu else pdu

    def handle_timer(self, now: float) -> list[Output]:
        """Run the timers due at ``now``: ARTIM expiry (Evt18: AA-2 closes in Sta2 and
        Sta13), then the PDU progress timeout (A-ABORT, or the close in Sta2/Sta13
        where ARTIM runs anyway). Early or repeated calls do nothing."""
        self._tick(now)
        if self.artim_deadline is not None and now >= self.artim_deadline:
            state = self.state.name
            return [TimerExpired("ARTIM", f"ARTIM timer expired in {state}"), *self.artim_expired()]
        if self.pdu_deadline is not None and now >= self.pdu_deadline:
            return self._pdu_stalled(now)
        return []

    def _tick(self, now: float | None) -> None:
        if now is not None:
            self.now = now

    def _pdu_progress(self, before: int) -> None:
        """Restart the PDU progress timer when a PDU completed, stop it when nothing is
        pending, start it when a PDU has begun (``before``: bytes pending plus received)."""
        after = self.reader.buffered
        if after == 0 or after < before or self.pdu_timeout is None:
            self.pdu_deadline = None
            if after == 0 or self.pdu_timeout is None:
                return
        if self.pdu_deadline is None:
            self.pdu_deadline = self.now + self.pdu_timeout

    def _pdu_stalled(self, now: float) -> list[Output]:
        self.pdu_deadline = None
        timeout = self.pdu_timeout
        if not self.reader.buffered or timeout is None or self.state in (Sta1, Sta4):
            return []
        if self.reading_paused:  # we stopped reading, not the peer: not its fault
            self.pdu_deadline = now + timeout
            return []
        reason = f"PDU not completed within {timeout:g} s ({self.reader.buffered} bytes received)"
        out: list[Output] = [TimerExpired("PDU progress", reason)]
        if self.state in (Sta2, Sta13):  # ARTIM runs: end as its expiry would (AA-2)
            self.failure = self.failure or reason
            return out + self.artim_expired()
        return out + self.provider_abort(reason, AbortReason.NOT_SPECIFIED)

    # -- local service primitives ---------------------------------------------------

    def associate(self, rq: AssociateRQ, *, now: float | None = None) -> list[Output]:
        """A-ASSOCIATE request (Evt1); the RQ is sent once the transport is up."""
        self._tick(now)
        self._pdu = rq
        return self._handle(Evt1)

    def accept(self, ac: AssociateAC, *, now: float | None = None) -> list[Output]:
        """A-ASSOCIATE response, accept (Evt7)."""
        self._tick(now)
        self._pdu = ac
        return self._handle(Evt7)

    def reject(self, rj: AssociateRJ, *, now: float | None = None) -> list[Output]:
        """A-ASSOCIATE response, reject (Evt8)."""
        self._tick(now)
        self._pdu = rj
        return self._handle(Evt8)

    def send_pdata(self, data: bytes | list[bytes | memoryview]) -> list[Output]:
        """P-DATA request (Evt9); ``data`` is one or more encoded P-DATA-TF PDUs, as one
        buffer or as a list of buffers that are the PDUs in order (sent as they are)."""
        if self.state is _STA6:  # DT-1 (send, stay in Sta6): the usual case, as DT-2 in _take_pdus
            history = self.history
            history.append(_DT_1)
            if len(history) > 64:
                del history[:32]
            send = _new(Send)  # Send(data), without its __init__ frame
            send.data = data
            return [send]
        self._outgoing = data
        return self._handle(Evt9)

    def release(self, *, now: float | None = None) -> list[Output]:
        """A-RELEASE request (Evt11)."""
        self._tick(now)
        return self._handle(Evt11)

    def release_response(self, *, now: float | None = None) -> list[Output]:
        """A-RELEASE response (Evt14)."""
        self._tick(now)
        return self._handle(Evt14)

    def abort(self, reason: str = "aborted by local user", *, now: float | None = None) -> list[Output]:
        """A-ABORT request (Evt15), service-user source."""
        self._tick(now)
        self._abort_source, self._abort_reason = ABORT_SOURCE_USER, 0
        self._why = reason
        return self._handle(Evt15)

    def provider_abort(
        self, reason: str, diag: AbortReason = AbortReason.NOT_SPECIFIED, *, now: float | None = None
    ) -> list[Output]:
        """Abort on a protocol violation found above the PDU layer (e.g. DIMSE framing).

        Runs the Evt19 column: A-ABORT with service-provider source and an A-P-ABORT
        indication.
        """
        self._tick(now)
        self._abort_source, self._abort_reason = ABORT_SOURCE_PROVIDER, int(diag)
        self._why = reason
        return self._handle(Evt19)

    # -- transition function ---------------------------------------------------------

    def _handle(self, event: Event) -> list[Output]:
        state = self.state
        action = TRANSITIONS.get((state, event))
        if action is None:
            raise InvalidPrimitive(f"{event.name} ({event.value}) is not valid in {state.name} ({state.value})")
        self.history.append((state, event, action))
        if len(self.history) > 64:
            del self.history[:32]
        out: list[Output] = []
        self._out = out
        self.state = _ACTIONS[action](self)
        return out

    def _reason(self) -> str:
        """Why the abort or close under way happens; for a PDU out of turn said only now
        (most PDUs that could come out of turn do not: an A-ASSOCIATE-RQ, an A-RELEASE-RQ)."""
        if self._why is None:
            kind, state = self._out_of_turn
            self._why = f"unexpected {kind.__name__} PDU in {_STATE_NAMES[state]}"
        return self._why

    # -- actions (Tables 9-6 … 9-9); each returns the next state ------------------------

    def _start_artim(self) -> None:
        self.artim_running = True
        timeout = self.abort_artim_timeout if self._after_abort is not None else self.artim_timeout
        self.artim_deadline = self.now + timeout
        self._out.append(_START_ARTIM)

    def _stop_artim(self) -> None:
        if self.artim_running:
            self.artim_running = False
            self.artim_deadline = None
            self._out.append(_STOP_ARTIM)

    def _send_abort(self, source: int, reason: int) -> None:
        self._out.append(Send(Abort(source, reason).encode()))
        if self._after_abort is None:
            self._after_abort = 0  # see receive_data

    def _ae_1(self) -> State:
        self._out.append(ConnectTransport())
        return Sta4

    def _ae_2(self) -> State:
        assert isinstance(self._pdu, AssociateRQ)
        self._out.append(Send(self._pdu.encode()))
        return Sta5

    def _ae_3(self) -> State:
        assert isinstance(self._pdu, AssociateAC)
        self._out.append(AssociateAccepted(self._pdu))
        return Sta6

    def _ae_4(self) -> State:
        assert isinstance(self._pdu, AssociateRJ)
        self._out += [AssociateRejected(self._pdu), CloseTransport()]
        return Sta1

    def _ae_5(self) -> State:
        self._start_artim()
        return Sta2

    def _ae_6(self) -> State:
        """Stop ARTIM; the provider rejects a request it cannot accept itself, else the
        A-ASSOCIATE indication. Rejected-permanent, service-provider (ACSE) source
        (PS3.8 Table 9-21): protocol-version-not-supported when bit 0 (version 1) is
        not set (Table 9-11), no-reason-given when it proposes no presentation context
        (§9.3.2: one or more)."""
        rq = self._pdu
        assert isinstance(rq, AssociateRQ)
        self._stop_artim()
        reason = 0
        if not rq.protocol_version & 1:
            reason = ACSEReason.PROTOCOL_VERSION_NOT_SUPPORTED
            self.failure = f"protocol version {rq.protocol_version:#06x} not supported"
        elif not rq.presentation_contexts and not rq.over_limit:  # over a limit: the AE rejects it
            reason = ACSEReason.NO_REASON_GIVEN
            self.failure = "A-ASSOCIATE-RQ proposes no presentation context"
        if reason:
            self._out.append(Send(AssociateRJ(RejectResult.PERMANENT, RejectSource.ACSE, reason).encode()))
            self._start_artim()
            self._out.append(Refused(f"{self.failure}: A-ASSOCIATE-RJ sent"))
            return Sta13
        self._out.append(AssociateIndication(rq))
        return Sta3

    def _ae_7(self) -> State:
        assert isinstance(self._pdu, AssociateAC)
        self._out.append(Send(self._pdu.encode()))
        return Sta6

    def _ae_8(self) -> State:
        assert isinstance(self._pdu, AssociateRJ)
        self._out.append(Send(self._pdu.encode()))
        self._start_artim()
        return Sta13

    def _dt_1(self) -> State:
        self._out.append(Send(self._take_outgoing()))
        return Sta6

    def _dt_2(self) -> State:
        assert isinstance(self._pdu, PDataTF)
        self._out.append(PDataIndication(self._pdu))
        return Sta6

    def _ar_1(self) -> State:
        self._out.append(Send(_RELEASE_RQ))
        return Sta7

    def _ar_2(self) -> State:
        self._out.append(ReleaseIndication())
        return Sta8

    def _ar_3(self) -> State:
        self._out += [ReleaseConfirm(), CloseTransport()]
        return Sta1

    def _ar_4(self) -> State:
        self._out.append(Send(_RELEASE_RP))
        self._start_artim()
        return Sta13

    def _ar_5(self) -> State:
        self._stop_artim()
        return Sta1

    def _ar_6(self) -> State:
        assert isinstance(self._pdu, PDataTF)
        self._out.append(PDataIndication(self._pdu))
        return Sta7

    def _ar_7(self) -> State:
        self._out.append(Send(self._take_outgoing()))
        return Sta8

    def _take_outgoing(self) -> bytes | list[bytes | memoryview]:
        data, self._outgoing = self._outgoing, b""
        return data

    def _ar_8(self) -> State:
        self._out.append(ReleaseIndication(collision=True))
        return Sta9 if self.requestor else Sta10

    def _ar_9(self) -> State:
        self._out.append(Send(_RELEASE_RP))
        return Sta11

    def _ar_10(self) -> State:
        self._out.append(ReleaseConfirm())
        return Sta12

    def _aa_1(self) -> State:
        unassociated = self.state is Sta2
        if unassociated:
            # Not yet associated: the provider answers the stray PDU itself.
            self._send_abort(ABORT_SOURCE_PROVIDER, self._abort_reason)
        else:
            self._send_abort(ABORT_SOURCE_USER, 0)
        self.failure = self._reason()
        self._stop_artim()
        self._start_artim()
        if unassociated:  # nobody else hears of it: say why
            self._out.append(Refused(f"{self._reason()}: A-ABORT sent"))
        return Sta13

    def _aa_2(self) -> State:
        self._stop_artim()
        if self.failure is None and self._reason():
            self.failure = self._reason()
        self._out.append(CloseTransport(discard=True))
        return Sta1

    def _aa_3(self) -> State:
        assert isinstance(self._pdu, Abort)
        self.failure = f"aborted by peer (source {self._pdu.source}, reason {self._pdu.reason})"
        if self._pdu.source == ABORT_SOURCE_PROVIDER:
            self._out.append(ProviderAbort(f"peer provider abort, reason {self._pdu.reason}"))
        else:
            self._out.append(PeerAbort(self._pdu.source, self._pdu.reason))
        self._out.append(CloseTransport(discard=True))
        return Sta1

    def _aa_4(self) -> State:
        self.failure = self._reason()
        self._out.append(ProviderAbort(self._reason()))
        return Sta1

    def _aa_5(self) -> State:
        self._stop_artim()
        return Sta1

    def _aa_6(self) -> State:
        return Sta13

    def _aa_7(self) -> State:
        self._send_abort(ABORT_SOURCE_PROVIDER, self._abort_reason)
        return Sta13

    def _aa_8(self) -> State:
        self.failure = self._reason()
        self._send_abort(ABORT_SOURCE_PROVIDER, self._abort_reason)
        self._out.append(ProviderAbort(self._reason()))
        self._stop_artim()
        self._start_artim()
        return Sta13


_ACTIONS = {action: getattr(UpperLayer, "_" + action.name.lower()) for action in Action}
_DT_1 = (Sta6, Evt9, A.DT_1)
_DT_2 = (Sta6, Evt10, A.DT_2)
