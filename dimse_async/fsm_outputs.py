"""What the upper layer state machine (:mod:`dimse_async.fsm`) returns: bytes to send,
the transport to open, close or stop reading, timers that ran out, and the
indications and confirmations for the local user (PS3.8 §9.1, Tables 9-6 .. 9-9)."""

from __future__ import annotations

from .pdu import AssociateAC, AssociateRJ, AssociateRQ, PDataTF
from .records import Record

__all__ = [
    "AssociateAccepted",
    "AssociateIndication",
    "AssociateRejected",
    "CloseTransport",
    "ConnectTransport",
    "Output",
    "PDataIndication",
    "PeerAbort",
    "ProviderAbort",
    "ReleaseConfirm",
    "ReleaseIndication",
    "Send",
    "StartARTIM",
    "StopARTIM",
    "StopReading",
    "TimerExpired",
]


class Send(Record):
    """Bytes for the peer: one buffer, or a list of buffers written in order (PDU
    headers and the value slices between them, not joined)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | list[bytes | memoryview]) -> None:
        self.data = data


class ConnectTransport(Record):
    __slots__ = ()


class CloseTransport(Record):
    """Close the connection; with ``discard`` drop what is still queued to send (the
    peer aborted, or ARTIM expired on a peer that does not read)."""

    __slots__ = ("discard",)

    def __init__(self, discard: bool = False) -> None:
        self.discard = discard


class StartARTIM(Record):
    __slots__ = ()


class StopARTIM(Record):
    __slots__ = ()


class StopReading(Record):
    """Stop reading from the peer for good: we sent an A-ABORT and it keeps sending
    (Sta13); ARTIM closes the connection."""

    __slots__ = ()


class TimerExpired(Record):
    """A timer ran out (from :meth:`UpperLayer.handle_timer`), for the log; what it
    causes follows as further outputs."""

    __slots__ = ("timer", "reason")

    def __init__(self, timer: str, reason: str) -> None:
        self.timer = timer  # "ARTIM" or "PDU progress"
        self.reason = reason


class AssociateIndication(Record):
    __slots__ = ("rq",)

    def __init__(self, rq: AssociateRQ) -> None:
        self.rq = rq


class AssociateAccepted(Record):
    __slots__ = ("ac",)

    def __init__(self, ac: AssociateAC) -> None:
        self.ac = ac


class AssociateRejected(Record):
    __slots__ = ("rj",)

    def __init__(self, rj: AssociateRJ) -> None:
        self.rj = rj


class PDataIndication(Record):
    __slots__ = ("pdu",)

    def __init__(self, pdu: PDataTF) -> None:
        self.pdu = pdu


class ReleaseIndication(Record):
    __slots__ = ("collision",)

    def __init__(self, collision: bool = False) -> None:
        self.collision = collision


class ReleaseConfirm(Record):
    __slots__ = ()


class PeerAbort(Record):
    """A-ABORT indication: the peer's service-user (or provider) sent an A-ABORT PDU."""

    __slots__ = ("source", "reason")

    def __init__(self, source: int, reason: int) -> None:
        self.source = source
        self.reason = reason


class ProviderAbort(Record):
    """A-P-ABORT indication: the local provider aborted, ``reason`` says why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Output = (
    Send
    | ConnectTransport
    | CloseTransport
    | StartARTIM
    | StopARTIM
    | StopReading
    | TimerExpired
    | AssociateIndication
    | AssociateAccepted
    | AssociateRejected
    | PDataIndication
    | ReleaseIndication
    | ReleaseConfirm
    | PeerAbort
    | ProviderAbort
)
