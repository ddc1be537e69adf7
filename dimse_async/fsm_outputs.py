"""What the upper layer state machine (:mod:`dimse_async.fsm`) returns: bytes to send,
the transport to open, close or stop reading, timers that ran out, and the
indications and confirmations for the local user (PS3.8 §9.1, Tables 9-6 .. 9-9)."""

from __future__ import annotations

from .lazy_dataclass import dataclass
from .pdu import AssociateAC, AssociateRJ, AssociateRQ, PDataTF

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
    "Refused",
    "ReleaseConfirm",
    "ReleaseIndication",
    "Send",
    "StartARTIM",
    "StopARTIM",
    "StopReading",
    "TimerExpired",
]


@dataclass(slots=True)
class Send:
    """Bytes for the peer: one buffer, or a list of buffers written in order (PDU
    headers and the value slices between them, not joined)."""

    data: bytes | list[bytes | memoryview]


@dataclass(slots=True)
class ConnectTransport:
    """Open the transport connection to the peer (AE-1, PS3.8 Table 9-6)."""


@dataclass(slots=True)
class CloseTransport:
    """Close the connection; with ``discard`` drop what is still queued to send (the
    peer aborted, or ARTIM expired on a peer that does not read)."""

    discard: bool = False


@dataclass(slots=True)
class StartARTIM:
    """Start (or restart) the ARTIM timer (PS3.8 §9.1.5)."""


@dataclass(slots=True)
class StopARTIM:
    """Stop the ARTIM timer (PS3.8 §9.1.5)."""


@dataclass(slots=True)
class StopReading:
    """Stop reading from the peer for good: we sent an A-ABORT and it keeps sending
    (Sta13); ARTIM closes the connection."""


@dataclass(slots=True)
class TimerExpired:
    """A timer ran out (from :meth:`UpperLayer.handle_timer`), for the log; what it
    causes follows as further outputs."""

    timer: str  # "ARTIM" or "PDU progress"
    reason: str


@dataclass(slots=True)
class Refused:
    """The provider itself answered a peer that has no association yet: AE-6's
    A-ASSOCIATE-RJ, or AA-1's A-ABORT for a stray or invalid PDU in Sta2. For the log:
    ``reason`` says why (no indication reaches the user, PS3.8 Table 9-7, 9-9)."""

    reason: str


@dataclass(slots=True)
class AssociateIndication:
    """A-ASSOCIATE indication: the peer's A-ASSOCIATE-RQ, for the acceptor to judge."""

    rq: AssociateRQ


@dataclass(slots=True)
class AssociateAccepted:
    """A-ASSOCIATE confirmation (accept): the peer's A-ASSOCIATE-AC."""

    ac: AssociateAC


@dataclass(slots=True)
class AssociateRejected:
    """A-ASSOCIATE confirmation (reject): the peer's A-ASSOCIATE-RJ."""

    rj: AssociateRJ


@dataclass(slots=True)
class PDataIndication:
    """P-DATA indication: a P-DATA-TF PDU from the peer."""

    pdu: PDataTF


@dataclass(slots=True)
class ReleaseIndication:
    """A-RELEASE indication: the peer asks to release (``collision``: both sides asked at
    once, a release collision, Sta9-Sta12)."""

    collision: bool = False


@dataclass(slots=True)
class ReleaseConfirm:
    """A-RELEASE confirmation: the peer's A-RELEASE-RP."""


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
    | StopReading
    | TimerExpired
    | Refused
    | AssociateIndication
    | AssociateAccepted
    | AssociateRejected
    | PDataIndication
    | ReleaseIndication
    | ReleaseConfirm
    | PeerAbort
    | ProviderAbort
)
