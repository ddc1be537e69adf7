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
from enum import Enum

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


class State(Enum):
    """PS3.8 Tables 9-1 … 9-5."""

    Sta1 = "Idle"
    Sta2 = "Transport connection open (awaiting A-ASSOCIATE-RQ PDU)"
    Sta3 = "Awaiting local A-ASSOCIATE response primitive"
    Sta4 = "Awaiting transport connection opening to complete"
    Sta5 = "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU"
    Sta6 = "Association established and ready for data transfer"
    Sta7 = "Awaiting A-RELEASE-RP PDU"
    Sta8 = "Awaiting local A-RELEASE response primitive"
    Sta9 = "Release collision requestor side; awaiting A-RELEASE response"
    Sta10 = "Release collision acceptor side; awaiting A-RELEASE-RP PDU"
    Sta11 = "Release collision requestor side; awaiting A-RELEASE-RP PDU"
    Sta12 = "Release collision acceptor side; awaiting A-RELEASE response primitive"
    Sta13 = "Awaiting transport connection close indication"


class Event(Enum):
    """PS3.8 Table 9-10, the event rows."""

    Evt1 = "A-ASSOCIATE request (local user)"
    Evt2 = "Transport connect confirmation (local transport service)"
    Evt3 = "A-ASSOCIATE-AC PDU (received on transport connection)"
    Evt4 = "A-ASSOCIATE-RJ PDU (received on transport connection)"
    Evt5 = "Transport connection indication (local transport service)"
    Evt6 = "A-ASSOCIATE-RQ PDU (received on transport connection)"
    Evt7 = "A-ASSOCIATE response primitive (accept)"
    Evt8 = "A-ASSOCIATE response primitive (reject)"
    Evt9 = "P-DATA request primitive"
    Evt10 = "P-DATA-TF PDU"
    Evt11 = "A-RELEASE request primitive"
    Evt12 = "A-RELEASE-RQ PDU (received on open transport connection)"
    Evt13 = "A-RELEASE-RP PDU (received on transport connection)"
    Evt14 = "A-RELEASE response primitive"
    Evt15 = "A-ABORT request primitive"
    Evt16 = "A-ABORT PDU (received on open transport connection)"
    Evt17 = "Transport connection closed indication (local transport service)"
    Evt18 = "ARTIM timer expired (association reject/release timer)"
    Evt19 = "Unrecognized or invalid PDU received"


class Action(Enum):
    """PS3.8 Tables 9-6 … 9-9."""

    AE_1 = "Issue TRANSPORT CONNECT request primitive to local transport service"
    AE_2 = "Send A-ASSOCIATE-RQ-PDU"
    AE_3 = "Issue A-ASSOCIATE confirmation (accept) primitive"
    AE_4 = "Issue A-ASSOCIATE confirmation (reject) primitive and close transport connection"
    AE_5 = "Issue Transport connection response primitive; start ARTIM timer"
    AE_6 = "Stop ARTIM timer; if A-ASSOCIATE-RQ acceptable issue A-ASSOCIATE indication, else send A-ASSOCIATE-RJ and start ARTIM"
    AE_7 = "Send A-ASSOCIATE-AC PDU"
    AE_8 = "Send A-ASSOCIATE-RJ PDU and start ARTIM timer"
    DT_1 = "Send P-DATA-TF PDU"
    DT_2 = "Send P-DATA indication primitive"
    AR_1 = "Send A-RELEASE-RQ PDU"
    AR_2 = "Issue A-RELEASE indication primitive"
    AR_3 = "Issue A-RELEASE confirmation primitive, and close transport connection"
    AR_4 = "Issue A-RELEASE-RP PDU and start ARTIM timer"
    AR_5 = "Stop ARTIM timer"
    AR_6 = "Issue P-DATA indication"
    AR_7 = "Issue P-DATA-TF PDU"
    AR_8 = "Issue A-RELEASE indication (release collision)"
    AR_9 = "Send A-RELEASE-RP PDU"
    AR_10 = "Issue A-RELEASE confirmation primitive"
    AA_1 = "Send A-ABORT PDU (service-user source) and start (or restart) ARTIM timer"
    AA_2 = "Stop ARTIM timer if running. Close transport connection"
    AA_3 = "Issue A-ABORT or A-P-ABORT indication and close transport connection"
    AA_4 = "Issue A-P-ABORT indication primitive"
    # The standard words AA-5 exactly like AR-5; Enum members with equal values are
    # aliases, so the value must differ or AA-5 would silently become AR-5.
    AA_5 = "Stop ARTIM timer (transport connection closed in Sta2)"
    AA_6 = "Ignore PDU"
    AA_7 = "Send A-ABORT PDU"
    AA_8 = "Send A-ABORT PDU (service-provider source), issue an A-P-ABORT indication, and start ARTIM timer"


S, E, A = State, Event, Action


def _row(event: Event, cells: dict[State, Action]) -> dict[tuple[State, Event], Action]:
    return {(state, event): action for state, action in cells.items()}


def _many(states: str, action: Action) -> dict[State, Action]:
    """``_many("6-12", A.AA_8)``: the same action in a run of states."""
    lo, hi = (int(x) for x in states.split("-"))
    return {State[f"Sta{n}"]: action for n in range(lo, hi + 1)}


# PS3.8 Table 9-10, one row per event. Cells left blank in the standard are absent.
TRANSITIONS: dict[tuple[State, Event], Action] = {
    **_row(E.Evt1, {S.Sta1: A.AE_1}),
    **_row(E.Evt2, {S.Sta4: A.AE_2}),
    **_row(E.Evt3, {S.Sta2: A.AA_1, S.Sta3: A.AA_8, S.Sta5: A.AE_3, **_many("6-12", A.AA_8), S.Sta13: A.AA_6}),
    **_row(E.Evt4, {S.Sta2: A.AA_1, S.Sta3: A.AA_8, S.Sta5: A.AE_4, **_many("6-12", A.AA_8), S.Sta13: A.AA_6}),
    **_row(E.Evt5, {S.Sta1: A.AE_5}),
    **_row(E.Evt6, {S.Sta2: A.AE_6, S.Sta3: A.AA_8, **_many("5-12", A.AA_8), S.Sta13: A.AA_7}),
    **_row(E.Evt7, {S.Sta3: A.AE_7}),
    **_row(E.Evt8, {S.Sta3: A.AE_8}),
    **_row(E.Evt9, {S.Sta6: A.DT_1, S.Sta8: A.AR_7}),
    **_row(
        E.Evt10,
        {
            S.Sta2: A.AA_1,
            S.Sta3: A.AA_8,
            S.Sta5: A.AA_8,
            S.Sta6: A.DT_2,
            S.Sta7: A.AR_6,
            **_many("8-12", A.AA_8),
            S.Sta13: A.AA_6,
        },
    ),
    **_row(E.Evt11, {S.Sta6: A.AR_1}),
    **_row(
        E.Evt12,
        {
            S.Sta2: A.AA_1,
            S.Sta3: A.AA_8,
            S.Sta5: A.AA_8,
            S.Sta6: A.AR_2,
            S.Sta7: A.AR_8,
            **_many("8-12", A.AA_8),
            S.Sta13: A.AA_6,
        },
    ),
    **_row(
        E.Evt13,
        {
            S.Sta2: A.AA_1,
            S.Sta3: A.AA_8,
            S.Sta5: A.AA_8,
            S.Sta6: A.AA_8,
            S.Sta7: A.AR_3,
            S.Sta8: A.AA_8,
            S.Sta9: A.AA_8,
            S.Sta10: A.AR_10,
            S.Sta11: A.AR_3,
            S.Sta12: A.AA_8,
            S.Sta13: A.AA_6,
        },
    ),
    **_row(E.Evt14, {S.Sta8: A.AR_4, S.Sta9: A.AR_9, S.Sta12: A.AR_4}),
    **_row(E.Evt15, {S.Sta3: A.AA_1, S.Sta4: A.AA_2, **_many("5-12", A.AA_1)}),
    **_row(E.Evt16, {S.Sta2: A.AA_2, S.Sta3: A.AA_3, **_many("5-12", A.AA_3), S.Sta13: A.AA_2}),
    **_row(E.Evt17, {S.Sta2: A.AA_5, **_many("3-12", A.AA_4), S.Sta13: A.AR_5}),
    **_row(E.Evt18, {S.Sta2: A.AA_2, S.Sta13: A.AA_2}),
    **_row(E.Evt19, {S.Sta2: A.AA_1, S.Sta3: A.AA_8, **_many("5-12", A.AA_8), S.Sta13: A.AA_7}),
}

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
    pass


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
        out: list[Output] = []
        if self.state in (State.Sta1, State.Sta4):
            return out  # no association, nothing to interpret
        if self._unframeable:
            return out  # after an invalid PDU the stream cannot be framed again
        self.reader.feed(data)
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
        self._out.append(CloseTransport())
        return S.Sta1

    def _aa_3(self) -> State:
        assert isinstance(self._pdu, Abort)
        self.failure = f"aborted by peer (source {self._pdu.source}, reason {self._pdu.reason})"
        if self._pdu.source == ABORT_SOURCE_PROVIDER:
            self._out.append(ProviderAbort(f"peer provider abort, reason {self._pdu.reason}"))
        else:
            self._out.append(PeerAbort(self._pdu.source, self._pdu.reason))
        self._out.append(CloseTransport())
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
