"""dimse_async: an asyncio-native DICOM networking framework (PS3.7, PS3.8)."""

from collections.abc import Coroutine
from importlib import import_module
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
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

#: Public name -> (module, attribute): imported on first use (PEP 562), so that a
#: program using one part of the package (``dimse-async send``, a bare SCU) does not
#: pay for loading the others (pydicom, the query/retrieve services, structlog).
_LAZY: dict[str, tuple[str, str]] = {
    "ContextSpec": (".acse", "ContextSpec"),
    "PresentationContext": (".acse", "PresentationContext"),
    "AE": (".ae", "AE"),
    "TRANSFER_SYNTAX_PRESETS": (".ae", "TRANSFER_SYNTAX_PRESETS"),
    **{
        name: (".exceptions", name)
        for name in (
            "AssociationAborted",
            "AssociationError",
            "AssociationRejected",
            "AssociationTimeout",
            "ConnectionFailed",
            "DIMSEFailure",
            "InvalidAETitle",
            "NoAcceptedContext",
        )
    },
    "AssociationEvent": (".interface", "AssociationEvent"),
    "configure_logging": (".log", "configure_logging"),
    "Association": (".operations", "Association"),
    "UserIdentityRQ": (".pdu", "UserIdentityRQ"),
    "AssociationPool": (".pool", "AssociationPool"),
    "PoolClosed": (".pool", "PoolClosed"),
    "Server": (".server", "Server"),
    "QR_MODELS": (".services.qr", "MODELS"),
    "Progress": (".services.qr", "Progress"),
    "QueryRequest": (".services.qr", "QueryRequest"),
    "Responses": (".services.qr", "Responses"),
    "RetrieveRequest": (".services.qr", "RetrieveRequest"),
    "Request": (".services.requests", "Request"),
    "StatusError": (".services.scp", "StatusError"),
    "STORAGE_SOP_CLASSES": (".services.storage", "STORAGE_SOP_CLASSES"),
    "STORE_TRANSFER_SYNTAXES": (".services.storage", "STORE_TRANSFER_SYNTAXES"),
    "DirectoryStore": (".services.storage", "DirectoryStore"),
    "StoreRequest": (".services.storage", "StoreRequest"),
    "Code": (".status", "Code"),
    "Status": (".status", "Status"),
    "StatusCategory": (".status", "StatusCategory"),
    "DEFAULT_TRANSFER_SYNTAXES": (".uids", "DEFAULT_TRANSFER_SYNTAXES"),
    "UNCOMPRESSED_TRANSFER_SYNTAXES": (".uids", "UNCOMPRESSED_TRANSFER_SYNTAXES"),
    "Verification": (".uids", "Verification"),
}


def __getattr__(name: str) -> Any:
    """Load a public name's module on first access (PEP 562)."""
    if name == "QR_MODEL_NAMES":
        value: Any = tuple(import_module(".services.qr", __name__).MODELS)
    elif name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module, __name__), attr)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

T = TypeVar("T")

#: Query/retrieve information model names accepted by ``c_find``/``c_get``/``c_move``
#: (``model=``): "patient", "study", "patient-study" and "worklist" (C-FIND only).
QR_MODEL_NAMES: tuple[str, ...]

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
