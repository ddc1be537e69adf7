"""The DICOM Upper Layer state machine (PS3.8 §9.2), sans I/O.

:data:`TRANSITIONS` is Table 9-10 written as data: ``(state, event) -> action``,
with states, events and actions named exactly as in the standard so the two can be
read side by side. :class:`UpperLayer` runs it: it takes bytes from the peer, local
service primitives and timer expiries, and returns :mod:`output <dimse_async.fsm>`
objects (bytes to send, timers to start or stop, the transport to close, and
indications/confirmations for the local user). It owns no socket and no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "ReleaseConfirm",
    "ReleaseIndication",
    "Send",
    "StartARTIM",
    "State",
    "StopARTIM",
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


# ---------------------------------------------------------------------------
# Outputs: what the adapter must do, and what the local user is told
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    data: bytes


@dataclass(slots=True)
class ConnectTransport:
    pass


@dataclass(slots=True)
class CloseTransport:
    """Close the connection; with ``discard`` drop what is still queued to send (the
    peer aborted, or ARTIM expired on a peer that does not read)."""

    discard: bool = False


@dataclass(slots=True)
class StartARTIM:
    pass


@dataclass(slots=True)
class StopARTIM:
    pass


@dataclass(slots=True)
class AssociateIndication:
    rq: AssociateRQ


@dataclass(slots=True)
class AssociateAccepted:
    ac: AssociateAC


@dataclass(slots=True)
class AssociateRejected:
    rj: AssociateRJ


@dataclass(slots=True)
class PDataIndication:
    pdu: PDataTF


@dataclass(slots=True)
class ReleaseIndication:
    collision: bool = False


@dataclass(slots=True)
class ReleaseConfirm:
    pass


@dataclass(slots=True)
class PeerAbort:
    """A-ABORT indication: the peer's service-user (or provider) sent an A-ABORT PDU."""

    source: int
    reason: int


@dataclass(slots=True)
class ProviderAbort:
    """A-P-ABORT indication: the local provider aborted, ``reason`` says why."""

    reason: str


Output = (
    Send
    | ConnectTransport
    | CloseTransport
    | StartARTIM
    | StopARTIM
    | AssociateIndication
    | AssociateAccepted
    | AssociateRejected
    | PDataIndication
    | ReleaseIndication
    | ReleaseConfirm
    | PeerAbort
    | ProviderAbort
)


class InvalidPrimitive(RuntimeError):
    """A local service primitive that Table 9-10 does not allow in the current state."""


# ---------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------


class UpperLayer:
    """One association's upper-layer protocol machine (PS3.8 §9.2).

    Inputs are methods: :meth:`receive_data` (bytes from the peer),
    :meth:`connection_made` / :meth:`connection_lost` (transport), :meth:`artim_expired`,
    and the local primitives :meth:`associate`, :meth:`accept`, :meth:`reject`,
    :meth:`send_pdata`, :meth:`release`, :meth:`release_response`, :meth:`abort`. Each
    returns the list of outputs to carry out, in order.
    """

    def __init__(self, *, requestor: bool, max_pdu_receive: int):
        self.requestor = requestor
        self.state = State.Sta1
        self.reader = PDUReader(max_pdu_receive)
        self.artim_running = False
        self._unframeable = False
        #: Why the association ended, when it ended abnormally; for logs.
        self.failure: str | None = None
        #: (state, event, action) of every transition, newest last; bounded.
        self.history: list[tuple[State, Event, Action]] = []
        self._out: list[Output] = []
        self._pdu: PDU | None = None
        self._abort_source = ABORT_SOURCE_USER
        self._abort_reason = 0
        self._why = ""

    # -- inputs from the peer and the transport ------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Output]:
        """Feed bytes received from the peer; decode and dispatch every whole PDU."""
        if self.state in (State.Sta1, State.Sta4) or self._unframeable:
            return []  # no association, or the stream cannot be framed again: ignored
        self.reader.feed(data)
        return self._take_pdus()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the transport should receive the next bytes (see :meth:`buffer_updated`)."""
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> list[Output]:
        """``nbytes`` were received into :meth:`get_buffer`'s view: like :meth:`receive_data`."""
        if self.state in (State.Sta1, State.Sta4) or self._unframeable:
            return []  # ignored: the bytes are not kept
        self.reader.buffer_updated(nbytes)
        return self._take_pdus()

    def _take_pdus(self) -> list[Output]:
        out: list[Output] = []
        while self.state not in (State.Sta1, State.Sta4):
            try:
                pdu = self.reader.next_pdu()
            except PDUError as exc:
                self._unframeable = True
                self._abort_source, self._abort_reason = ABORT_SOURCE_PROVIDER, int(exc.reason)
                self._why = f"invalid PDU: {exc}"
                out += self._handle(E.Evt19)
                break
            if pdu is None:
                break
            self._pdu = pdu
            if type(pdu) is Abort:
                self._why = f"A-ABORT received (source {pdu.source}, reason {pdu.reason})"
            else:
                self._abort_source, self._abort_reason = ABORT_SOURCE_PROVIDER, AbortReason.UNEXPECTED_PDU
                self._why = f"unexpected {type(pdu).__name__} PDU in {self.state.name}"
            out += self._handle(_PDU_EVENTS[type(pdu)])
        return out

    def connection_made(self) -> list[Output]:
        """Evt2 for the requestor (connect confirmation), Evt5 for the acceptor."""
        return self._handle(E.Evt2 if self.requestor else E.Evt5)

    def connection_lost(self) -> list[Output]:
        """Evt17. Ignored once idle (the close we asked for ourselves)."""
        if self.state is State.Sta1:
            return []
        self._why = "transport connection closed by peer"
        return self._handle(E.Evt17)

    def artim_expired(self) -> list[Output]:
        """Evt18. A stale expiry (timer already stopped) is ignored."""
        if not self.artim_running:
            return []
        self.artim_running = False
        self._why = f"ARTIM timer expired in {self.state.name}"
        return self._handle(E.Evt18)

    # -- local service primitives ---------------------------------------------------

    def associate(self, rq: AssociateRQ) -> list[Output]:
        """A-ASSOCIATE request (Evt1); the RQ is sent once the transport is up."""
        self._pdu = rq
        return self._handle(E.Evt1)

    def accept(self, ac: AssociateAC) -> list[Output]:
        """A-ASSOCIATE response, accept (Evt7)."""
        self._pdu = ac
        return self._handle(E.Evt7)

    def reject(self, rj: AssociateRJ) -> list[Output]:
        """A-ASSOCIATE response, reject (Evt8)."""
        self._pdu = rj
        return self._handle(E.Evt8)

    def send_pdata(self, data: bytes) -> list[Output]:
        """P-DATA request (Evt9); ``data`` is one or more encoded P-DATA-TF PDUs."""
        self._pdu = data  # type: ignore[assignment]
        return self._handle(E.Evt9)

    def release(self) -> list[Output]:
        """A-RELEASE request (Evt11)."""
        return self._handle(E.Evt11)

    def release_response(self) -> list[Output]:
        """A-RELEASE response (Evt14)."""
        return self._handle(E.Evt14)

    def abort(self, reason: str = "aborted by local user") -> list[Output]:
        """A-ABORT request (Evt15), service-user source."""
        self._abort_source, self._abort_reason = ABORT_SOURCE_USER, 0
        self._why = reason
        return self._handle(E.Evt15)

    def provider_abort(self, reason: str, diag: AbortReason = AbortReason.NOT_SPECIFIED) -> list[Output]:
        """Abort on a protocol violation found above the PDU layer (e.g. DIMSE framing).

        Runs the Evt19 column: A-ABORT with service-provider source and an A-P-ABORT
        indication.
        """
        self._abort_source, self._abort_reason = ABORT_SOURCE_PROVIDER, int(diag)
        self._why = reason
        return self._handle(E.Evt19)

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

    # -- actions (Tables 9-6 … 9-9); each returns the next state ------------------------

    def _start_artim(self) -> None:
        self.artim_running = True
        self._out.append(StartARTIM())

    def _stop_artim(self) -> None:
        if self.artim_running:
            self.artim_running = False
            self._out.append(StopARTIM())

    def _send_abort(self, source: int, reason: int) -> None:
        self._out.append(Send(Abort(source, reason).encode()))

    def _ae_1(self) -> State:
        self._out.append(ConnectTransport())
        return S.Sta4

    def _ae_2(self) -> State:
        assert isinstance(self._pdu, AssociateRQ)
        self._out.append(Send(self._pdu.encode()))
        return S.Sta5

    def _ae_3(self) -> State:
        assert isinstance(self._pdu, AssociateAC)
        self._out.append(AssociateAccepted(self._pdu))
        return S.Sta6

    def _ae_4(self) -> State:
        assert isinstance(self._pdu, AssociateRJ)
        self._out += [AssociateRejected(self._pdu), CloseTransport()]
        return S.Sta1

    def _ae_5(self) -> State:
        self._start_artim()
        return S.Sta2

    def _ae_6(self) -> State:
        assert isinstance(self._pdu, AssociateRQ)
        self._stop_artim()
        if not self._pdu.protocol_version & 1:
            # Rejected by the service-provider (ACSE): protocol-version-not-supported.
            self.failure = f"protocol version {self._pdu.protocol_version:#06x} not supported"
            self._out.append(
                Send(
                    AssociateRJ(
                        RejectResult.PERMANENT, RejectSource.ACSE, ACSEReason.PROTOCOL_VERSION_NOT_SUPPORTED
                    ).encode()
                )
            )
            self._start_artim()
            return S.Sta13
        self._out.append(AssociateIndication(self._pdu))
        return S.Sta3

    def _ae_7(self) -> State:
        assert isinstance(self._pdu, AssociateAC)
        self._out.append(Send(self._pdu.encode()))
        return S.Sta6

    def _ae_8(self) -> State:
        assert isinstance(self._pdu, AssociateRJ)
        self._out.append(Send(self._pdu.encode()))
        self._start_artim()
        return S.Sta13

    def _dt_1(self) -> State:
        self._out.append(Send(self._pdu))  # type: ignore[arg-type]
        return S.Sta6

    def _dt_2(self) -> State:
        assert isinstance(self._pdu, PDataTF)
        self._out.append(PDataIndication(self._pdu))
        return S.Sta6

    def _ar_1(self) -> State:
        self._out.append(Send(ReleaseRQ().encode()))
        return S.Sta7

    def _ar_2(self) -> State:
        self._out.append(ReleaseIndication())
        return S.Sta8

    def _ar_3(self) -> State:
        self._out += [ReleaseConfirm(), CloseTransport()]
        return S.Sta1

    def _ar_4(self) -> State:
        self._out.append(Send(ReleaseRP().encode()))
        self._start_artim()
        return S.Sta13

    def _ar_5(self) -> State:
        self._stop_artim()
        return S.Sta1

    def _ar_6(self) -> State:
        assert isinstance(self._pdu, PDataTF)
        self._out.append(PDataIndication(self._pdu))
        return S.Sta7

    def _ar_7(self) -> State:
        self._out.append(Send(self._pdu))  # type: ignore[arg-type]
        return S.Sta8

    def _ar_8(self) -> State:
        self._out.append(ReleaseIndication(collision=True))
        return S.Sta9 if self.requestor else S.Sta10

    def _ar_9(self) -> State:
        self._out.append(Send(ReleaseRP().encode()))
        return S.Sta11

    def _ar_10(self) -> State:
        self._out.append(ReleaseConfirm())
        return S.Sta12

    def _aa_1(self) -> State:
        if self.state is S.Sta2:
            # Not yet associated: the provider answers the stray PDU itself.
            self._send_abort(ABORT_SOURCE_PROVIDER, self._abort_reason)
        else:
            self._send_abort(ABORT_SOURCE_USER, 0)
        self.failure = self._why
        self._stop_artim()
        self._start_artim()
        return S.Sta13

    def _aa_2(self) -> State:
        self._stop_artim()
        if self.failure is None and self._why:
            self.failure = self._why
        self._out.append(CloseTransport(discard=True))
        return S.Sta1

    def _aa_3(self) -> State:
        assert isinstance(self._pdu, Abort)
        self.failure = f"aborted by peer (source {self._pdu.source}, reason {self._pdu.reason})"
        if self._pdu.source == ABORT_SOURCE_PROVIDER:
            self._out.append(ProviderAbort(f"peer provider abort, reason {self._pdu.reason}"))
        else:
            self._out.append(PeerAbort(self._pdu.source, self._pdu.reason))
        self._out.append(CloseTransport(discard=True))
        return S.Sta1

    def _aa_4(self) -> State:
        self.failure = self._why
        self._out.append(ProviderAbort(self._why))
        return S.Sta1

    def _aa_5(self) -> State:
        self._stop_artim()
        return S.Sta1

    def _aa_6(self) -> State:
        return S.Sta13

    def _aa_7(self) -> State:
        self._send_abort(ABORT_SOURCE_PROVIDER, self._abort_reason)
        return S.Sta13

    def _aa_8(self) -> State:
        self.failure = self._why
        self._send_abort(ABORT_SOURCE_PROVIDER, self._abort_reason)
        self._out.append(ProviderAbort(self._why))
        self._stop_artim()
        self._start_artim()
        return S.Sta13


_ACTIONS = {action: getattr(UpperLayer, "_" + action.name.lower()) for action in Action}
