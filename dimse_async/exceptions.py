"""Exceptions raised to users of associations and AEs."""

from __future__ import annotations

import errno

from .acse import InvalidAETitle
from .pdu import AssociateRJ

__all__ = [
    "AssociationAborted",
    "AssociationError",
    "AssociationRejected",
    "AssociationTimeout",
    "ConnectionFailed",
    "DIMSEFailure",
    "InvalidAETitle",
    "ListenError",
    "NoAcceptedContext",
]


class AssociationError(Exception):
    """Base class of every association-level failure."""


class ConnectionFailed(AssociationError):
    """The TCP connection to the peer could not be opened."""


class AssociationRejected(AssociationError):
    """The peer answered A-ASSOCIATE-RJ (PS3.8 §9.3.4)."""

    def __init__(self, rj: AssociateRJ):
        from .acse import reject_text

        self.result, self.source, self.reason = rj.result, rj.source, rj.reason
        super().__init__(f"association rejected: {reject_text(rj)}")


class AssociationAborted(AssociationError):
    """The association was aborted (A-ABORT from the peer, or A-P-ABORT locally)."""


class AssociationTimeout(AssociationError, TimeoutError):
    """A connect, negotiation, DIMSE or idle timeout expired; the association is aborted."""


class NoAcceptedContext(AssociationError):
    """No accepted presentation context fits the requested operation."""


class DIMSEFailure(AssociationError):
    """A DIMSE exchange could not be completed (bad response, protocol violation)."""


class ListenError(OSError):
    """A listening socket could not be bound: ``cannot listen on HOST:PORT: why``."""

    def __init__(self, host: str, port: int, cause: OSError):
        why = (cause.strerror or str(cause)).lower()
        if cause.errno == errno.EADDRINUSE:
            why = "address already in use"
        super().__init__(cause.errno or 0, f"cannot listen on {host}:{port}: {why}")
