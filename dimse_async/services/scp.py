"""One path from an SCP handler's outcome to a DIMSE status, for every service.

A handler returns a status (or ``None`` for success), raises :class:`StatusError` to
answer a specific status, or raises anything else: ``OSError`` answers the service's
out-of-resources code, other exceptions its generic failure code (a ``CancelledError``
too, unless the association itself is ending), and a returned value that is not a
status, or a pending status as the final one, answers 0xC000 (PS3.7 C.5.2); the
association stays up either way. Error comments go with warning and failure statuses only, at most 64
characters (PS3.7 C.4, LO).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..dimse import Command, CommandField, response_to
from ..interface import DIMSEProvider
from ..status import PENDING_CODES, Code, Status, StatusCategory, offending_element_allowed
from ..uids import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "FAILURE_CODES",
    "StatusError",
    "DECODE_ON_LOOP",
    "MAX_IDENTIFIER_ITEMS",
    "MAX_N_REQUEST_ITEMS",
    "MAX_N_REPLY_ITEMS",
    "decode_received",
    "decode_received_async",
    "off_loop",
    "error_comment",
    "brief_error",
    "failure_status",
    "final_status",
    "outcome_status",
    "own_cancellation",
    "response",
    "run_handler",
]


#: Sequence items (all depths together) a received C-FIND / C-GET / C-MOVE identifier
#: may hold, request or response: past it the data set is refused before pydicom reads
#: it (about 50 µs of CPU per item: a 1 MiB request of 100,000 tiny undefined-length
#: items, PS3.5 §7.5.2, held a worker thread for seconds; real identifiers have a few).
MAX_IDENTIFIER_ITEMS = 10_000
#: ... an N-service request's data set (SCP; MPPS and Storage Commitment list every
#: image, about 100 bytes an item: the default 1 MiB request limit holds ~10,000).
MAX_N_REQUEST_ITEMS = 20_000
#: ... an N-service reply's data set (SCU: no 1 MiB limit; an N-GET of a large MPPS).
MAX_N_REPLY_ITEMS = 50_000


def decode_received(data: bytes, transfer_syntax: str, max_items: int | None = None) -> Dataset:
    """A data set received from a peer (an identifier, an N-service attribute list),
    once it has been walked to its end, elements ascending and once each (PS3.5 §7.1,
    §7.5; the check stored data sets get), else a
    :class:`~dimse_async.dataset_check.DataSetError` (a ``ValueError``) naming the
    fault. pydicom alone reads lazily and leniently: a value running past the end, an
    unknown VR or a stray item tag surfaced later in a handler, or never. A deflated
    one is inflated within the default limits first. More than ``max_items`` (default
    :data:`MAX_IDENTIFIER_ITEMS`) sequence items, all depths together:
    :class:`~dimse_async.dataset_check.TooManyItems`, before pydicom reads any."""
    from ..codec import decode_identifier  # here: a sender that never receives one loads no pydicom
    from ..dataset_check import check_dataset_bytes
    from ..inflate import inflate

    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        data, transfer_syntax = inflate(data), ExplicitVRLittleEndian
    limit = MAX_IDENTIFIER_ITEMS if max_items is None else max_items
    check_dataset_bytes(data, transfer_syntax, ordered=True, max_items=limit)
    return decode_identifier(data, transfer_syntax)


#: Received data sets (identifiers, N-service attribute lists, replies) larger than
#: this, or deflated, are checked and decoded in a worker thread: walking a few MiB (and
#: pydicom reading undefined-length sequences, superlinear in their items) would hold up
#: every other association on the event loop for as long.
DECODE_ON_LOOP = 64 << 10


def off_loop(data: bytes | None, transfer_syntax: str) -> bool:
    """Whether decoding ``data`` belongs in a worker thread (see :data:`DECODE_ON_LOOP`)."""
    return data is not None and (len(data) > DECODE_ON_LOOP or transfer_syntax == DeflatedExplicitVRLittleEndian)


async def decode_received_async(data: bytes, transfer_syntax: str, max_items: int | None = None) -> Dataset:
    """:func:`decode_received`, in a worker thread when ``data`` is large or deflated."""
    if off_loop(data, transfer_syntax):
        return await asyncio.to_thread(decode_received, data, transfer_syntax, max_items)
    return decode_received(data, transfer_syntax, max_items)


class StatusError(Exception):
    """Raise from a handler to answer with a specific ``status`` (any service)."""

    def __init__(self, status: Status | int, comment: str | None = None):
        self.status = status if isinstance(status, Status) else Status(status, comment)
        super().__init__(self.status.error_comment or repr(self.status))


#: Per service: (status for a failed handler, status for an OSError) (PS3.4 A.2.1, B.2.3, C.4).
FAILURE_CODES: dict[int, tuple[int, int]] = {
    CommandField.C_ECHO_RQ: (Code.UNRECOGNIZED_OPERATION, Code.UNRECOGNIZED_OPERATION),
    CommandField.C_STORE_RQ: (Code.CANNOT_UNDERSTAND, Code.OUT_OF_RESOURCES),
    CommandField.C_FIND_RQ: (Code.CANNOT_UNDERSTAND, Code.OUT_OF_RESOURCES),
    CommandField.C_GET_RQ: (Code.CANNOT_UNDERSTAND, Code.OUT_OF_RESOURCES_MATCHES),
    CommandField.C_MOVE_RQ: (Code.CANNOT_UNDERSTAND, Code.OUT_OF_RESOURCES_MATCHES),
    # DIMSE-N: processing failure, resource limitation (PS3.7 C.5.9, C.5.13).
    **{field: (Code.PROCESSING_FAILURE, 0x0213) for field in range(0x0100, 0x0151, 0x10)},
}


def error_comment(status: Status) -> str | None:
    """The one error-comment rule: warning and failure statuses carry theirs, cut to 64 chars."""
    if status.category in (StatusCategory.WARNING, StatusCategory.FAILURE) and status.error_comment:
        return status.error_comment[:64]
    return None


_C_STORE_RQ = int(CommandField.C_STORE_RQ)  # per response: not read from the enum class each time (slow on 3.11)


def response(request: Command, status: Status) -> Command:
    """The response to ``request`` carrying ``status`` and, by the rule, its comment;
    the status's ``attributes`` as Offending Element (0000,0901) where its code allows
    one (:func:`~dimse_async.status.offending_element_allowed`, PS3.7 Annex C)."""
    rsp = response_to(request, int(status), error_comment(status) if status else None)
    store = request.command_field == _C_STORE_RQ
    if store:
        rsp.affected_sop_instance_uid = request.affected_sop_instance_uid
    if status.attributes and offending_element_allowed(int(status), store):
        rsp.offending_element = list(status.attributes)
    return rsp


def own_cancellation() -> bool:
    """Whether a ``CancelledError`` raised in a handler is its task's own cancellation
    (the association ended, the server stops): then it propagates. Otherwise something
    the handler awaited was cancelled by another party (a pool or task of the
    application's closed under it): a failure of the handler as any other exception,
    answered with a status and logged (a request is answered, PS3.7 §9.1)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def final_status(service: int, status: Status, log: Any) -> Status:
    """``status`` as a handler's final answer: a pending status (0xFF00, 0xFF01) cannot be
    one (PS3.7 §9.1.2.1.6: the peer would wait for a final response that never comes):
    logged, 0xC000."""
    if int(status) not in PENDING_CODES:
        return status
    name = CommandField(service).name.replace("_", "-")[:-3]
    log.error(f"{name} handler answered a pending status as its final one", status=f"0x{int(status):04X}")
    return Status(Code.CANNOT_UNDERSTAND, f"handler answered pending 0x{int(status):04X} as final status")


def brief_error(exc: BaseException) -> str:
    """``repr(exc)``, or for an exception whose text runs over several lines (pydicom's
    writer puts the traceback of the exception it wraps into its message) its type and
    first line: a log line stays one line about the fault."""
    text = str(exc)
    if "\n" not in text:
        return repr(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}"


def failure_status(service: int, exc: BaseException, assoc: DIMSEProvider) -> Status:
    """The status answering a handler that raised ``exc``; logged with the service name."""
    log = assoc.log
    name = CommandField(service).name.replace("_", "-")[:-3]
    if isinstance(exc, StatusError):
        log.info("handler refused", service=name, status=repr(exc.status))
        return final_status(service, exc.status, log)
    generic, resources = FAILURE_CODES.get(service, (Code.CANNOT_UNDERSTAND, Code.OUT_OF_RESOURCES))
    if isinstance(exc, asyncio.CancelledError):
        log.error(f"{name} handler failed", error=f"cancelled by another task than the association's ({exc!r})")
        return Status(generic, "Unable to process: the handler was cancelled")
    log.error(f"{name} handler failed", error=brief_error(exc))
    if isinstance(exc, OSError):
        if service == CommandField.C_STORE_RQ:
            assoc.note_error("storage")
        return Status(resources, f"Out of resources: {exc.strerror or exc}")
    text = str(exc)
    return Status(generic, f"Unable to process: {text.splitlines()[0] if text else ''}")


def outcome_status(service: int, result: object, log: Any) -> Status:
    """The status a handler's return value stands for: ``None`` is success."""
    if result is None:
        return Status(Code.SUCCESS)
    if isinstance(result, Status):
        return final_status(service, result, log)
    if isinstance(result, int) and not isinstance(result, bool) and 0 <= result <= 0xFFFF:
        return final_status(service, Status(result), log)
    name = CommandField(service).name.replace("_", "-")[:-3]
    log.error(f"{name} handler returned a non-status", result=repr(result)[:100])
    return Status(Code.CANNOT_UNDERSTAND, f"handler returned {type(result).__name__}, not a status")


async def run_handler(
    service: int, handler: Callable[[Any], Awaitable[Any]], request: Any, assoc: DIMSEProvider
) -> Status:
    """Await ``handler(request)`` and turn its outcome into a status."""
    try:
        result = handler(request)
        if hasattr(result, "__await__"):  # an async def's; a plain def's result is the outcome
            result = await result
    except asyncio.CancelledError as exc:
        if own_cancellation():
            raise
        return failure_status(service, exc, assoc)
    except Exception as exc:
        return failure_status(service, exc, assoc)
    return outcome_status(service, result, assoc.log)
