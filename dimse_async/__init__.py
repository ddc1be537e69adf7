"""dimse_async: an asyncio-native DICOM networking framework (PS3.7, PS3.8)."""

from collections.abc import Coroutine
from typing import Any, TypeVar

from .acse import ContextSpec, PresentationContext
from .ae import AE, TRANSFER_SYNTAX_PRESETS
from .exceptions import (
    AssociationAborted,
    AssociationError,
    AssociationRejected,
    AssociationTimeout,
    ConnectionFailed,
    DIMSEFailure,
    InvalidAETitle,
    NoAcceptedContext,
)
from .interface import AssociationEvent
from .log import configure_logging
from .operations import Association
from .pdu import UserIdentityRQ
from .pool import AssociationPool, PoolClosed
from .server import Server
from .services.qr import MODELS as QR_MODELS
from .services.qr import Progress, QueryRequest, Responses, RetrieveRequest
from .services.requests import Request
from .services.scp import StatusError
from .services.storage import STORAGE_SOP_CLASSES, STORE_TRANSFER_SYNTAXES, DirectoryStore, StoreRequest
from .status import Code, Status, StatusCategory
from .uids import DEFAULT_TRANSFER_SYNTAXES, UNCOMPRESSED_TRANSFER_SYNTAXES, Verification

__version__ = "0.1.0"

T = TypeVar("T")

#: Query/retrieve information model names accepted by ``c_find``/``c_get``/``c_move``
#: (``model=``): "patient", "study", "patient-study" and "worklist" (C-FIND only).
QR_MODEL_NAMES = tuple(QR_MODELS)

__all__ = [
    "AE",
    "DEFAULT_TRANSFER_SYNTAXES",
    "QR_MODELS",
    "QR_MODEL_NAMES",
    "STORAGE_SOP_CLASSES",
    "STORE_TRANSFER_SYNTAXES",
    "TRANSFER_SYNTAX_PRESETS",
    "UNCOMPRESSED_TRANSFER_SYNTAXES",
    "Association",
    "AssociationAborted",
    "AssociationEvent",
    "AssociationError",
    "AssociationPool",
    "AssociationRejected",
    "AssociationTimeout",
    "Code",
    "ConnectionFailed",
    "ContextSpec",
    "DIMSEFailure",
    "DirectoryStore",
    "InvalidAETitle",
    "NoAcceptedContext",
    "PoolClosed",
    "PresentationContext",
    "Progress",
    "QueryRequest",
    "Request",
    "Responses",
    "RetrieveRequest",
    "Server",
    "Status",
    "StatusCategory",
    "StatusError",
    "StoreRequest",
    "UserIdentityRQ",
    "Verification",
    "configure_logging",
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
