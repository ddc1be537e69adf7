"""dimse_async: an asyncio-native DICOM networking framework (PS3.7, PS3.8)."""

from collections.abc import Coroutine
from typing import Any, TypeVar

from .acse import ContextSpec, PresentationContext
from .ae import AE
from .exceptions import (
    AssociationAborted,
    AssociationError,
    AssociationRejected,
    AssociationTimeout,
    ConnectionFailed,
    DIMSEFailure,
    NoAcceptedContext,
)
from .interface import AssociationEvent
from .operations import Association
from .pdu import UserIdentityRQ
from .server import Server
from .services.requests import Request
from .services.scp import StatusError
from .status import Code, Status, StatusCategory
from .uids import Verification

__version__ = "0.1.0"

T = TypeVar("T")

__all__ = [
    "AE",
    "Association",
    "AssociationAborted",
    "AssociationEvent",
    "AssociationError",
    "AssociationRejected",
    "AssociationTimeout",
    "Code",
    "ConnectionFailed",
    "ContextSpec",
    "DIMSEFailure",
    "NoAcceptedContext",
    "PresentationContext",
    "Request",
    "Server",
    "Status",
    "StatusCategory",
    "StatusError",
    "UserIdentityRQ",
    "Verification",
    "run",
]


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on the default loop."""
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - platform dependent
        return asyncio.run(main)
    return uvloop.run(main)
