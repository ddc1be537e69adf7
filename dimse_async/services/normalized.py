"""The six DIMSE-N services, SCU and SCP (PS3.7 §10.1, §10.3).

SCU: :func:`n_event_report`, :func:`n_get`, :func:`n_set`, :func:`n_action`,
:func:`n_create`, :func:`n_delete` each send one request and return an
:class:`NResult` (status, affected SOP instance, the reply data set).

SCP: :func:`scp_n_service` answers any received N-request from the handler the AE
has registered for its command field and SOP class (``@ae.on_n_get`` and friends).
A handler gets an :class:`NRequest` and returns a status, a data set (success with
that reply), or ``(status, data set)``; a :class:`~dimse_async.status.Status` with
``attributes`` names the offending tags in Attribute Identifier List (0000,1005) for
the statuses PS3.7 Annex C gives that field (0x0105, 0x0106, 0x0107, 0x0116, 0x0120,
0x0121), as an :class:`NResult`'s ``status.attributes`` does on the SCU side; raising works as for every service
(:mod:`dimse_async.services.scp`). No handler: 0x0211 (unrecognized operation) when
the AE handles other N-services of that class, else 0x0122 (SOP class not supported).

Role rules (PS3.7 §10.1): N-EVENT-REPORT is invoked by the SCP of the SOP class and
performed by its SCU; the other five are invoked by the SCU. The session enforces
this on every accepted context (:mod:`dimse_async.session`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from ..codec import encode_dataset
from ..dataset_check import TooManyItems
from ..dimse import Command, CommandField, affected_mismatch
from ..exceptions import DIMSEFailure
from ..interface import DIMSEProvider
from ..lazy_dataclass import dataclass
from ..part10 import plausible_uid
from ..session import Operation
from ..status import ATTRIBUTE_LIST_CODES, Code, Status, response_status
from .requests import Request
from .scp import (
    MAX_N_REPLY_ITEMS,
    MAX_N_REQUEST_ITEMS,
    brief_error,
    decode_received,
    decode_received_async,
    error_comment,
    failure_status,
    final_status,
    off_loop,
    own_cancellation,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "N_REQUESTS",
    "NCode",
    "NHandler",
    "NRequest",
    "NResult",
    "n_action",
    "n_create",
    "n_delete",
    "n_event_report",
    "n_get",
    "n_set",
    "scp_n_service",
]


class NCode(IntEnum):
    """Status codes of the DIMSE-N services (PS3.7 Annex C, §10.1 status tables)."""

    SUCCESS = 0x0000
    ATTRIBUTE_LIST_ERROR = 0x0107  # warning
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116  # warning
    NO_SUCH_ATTRIBUTE = 0x0105
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    NO_SUCH_EVENT_TYPE = 0x0113
    NO_SUCH_ARGUMENT = 0x0114
    INVALID_ARGUMENT_VALUE = 0x0115
    INVALID_OBJECT_INSTANCE = 0x0117
    NO_SUCH_SOP_CLASS = 0x0118
    CLASS_INSTANCE_CONFLICT = 0x0119
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NO_SUCH_ACTION_TYPE = 0x0123
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213


#: The N-request command fields, with the service names used for handlers.
N_REQUESTS: Mapping[int, str] = {
    CommandField.N_EVENT_REPORT_RQ: "n_event_report",
    CommandField.N_GET_RQ: "n_get",
    CommandField.N_SET_RQ: "n_set",
    CommandField.N_ACTION_RQ: "n_action",
    CommandField.N_CREATE_RQ: "n_create",
    CommandField.N_DELETE_RQ: "n_delete",
}

# Requests that name their SOP class and instance as "Requested" rather than "Affected" (PS3.7 §10.3).
_REQUESTED = frozenset(
    {CommandField.N_GET_RQ, CommandField.N_SET_RQ, CommandField.N_ACTION_RQ, CommandField.N_DELETE_RQ}
)


@dataclass(slots=True)
class NResult:
    """What an N-request got back: the status, the affected SOP class and instance the
    response names, the event/action type it echoes and the reply data set (or ``None``)."""

    status: Status
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    type_id: int | None = None
    dataset: Dataset | None = None

    @property
    def is_success(self) -> bool:
        return self.status.is_success


# ---------------------------------------------------------------------------
# SCU
# ---------------------------------------------------------------------------


async def _invoke(
    assoc: DIMSEProvider, cmd: Command, sop_class: str, dataset: Dataset | None, *, as_scp: bool, timeout: float | None
) -> NResult:
    ctx = assoc.context_for(sop_class, as_scp=as_scp)
    payload = None if dataset is None else encode_dataset(dataset, ctx.transfer_syntax)
    rsp = await assoc.request(ctx, cmd, payload, timeout=timeout)
    c = rsp.command
    mismatch = affected_mismatch(cmd, c)
    if mismatch is not None:
        raise DIMSEFailure(f"{c.name} {mismatch}")
    if (
        cmd.command_field == CommandField.N_CREATE_RQ
        and not cmd.affected_sop_instance_uid
        and not c.affected_sop_instance_uid
        and c.status is not None
        and not response_status(c.status).is_failure
    ):  # PS3.7 §10.1.5.1.4: the SCP assigned it and shall say which; without it, nothing names the instance
        raise DIMSEFailure(f"{c.name}: status 0x{c.status:04X} without the Affected SOP Instance UID the SCP assigned")
    reply = None
    if rsp.dataset is not None:
        try:
            reply = await decode_received_async(rsp.dataset, ctx.transfer_syntax, MAX_N_REPLY_ITEMS)
        except TooManyItems as exc:
            assoc.log.warning(f"{c.name} reply data set refused", error=str(exc))
            raise DIMSEFailure(f"{c.name}: the reply data set is refused: {exc} (MAX_N_REPLY_ITEMS)") from exc
        except Exception as exc:
            raise DIMSEFailure(f"{c.name}: the reply data set is malformed: {exc}") from exc
    type_id = c.event_type_id if cmd.command_field == CommandField.N_EVENT_REPORT_RQ else c.action_type_id
    return NResult(
        response_status(c.status, c.error_comment, c.attribute_identifier_list, c.error_id),
        c.affected_sop_class_uid,
        c.affected_sop_instance_uid,
        type_id,
        reply,
    )


async def n_event_report(
    assoc: DIMSEProvider,
    sop_class: str,
    sop_instance: str,
    event_type_id: int,
    event_information: Dataset | None = None,
    *,
    timeout: float | None = None,
) -> NResult:
    """N-EVENT-REPORT (PS3.7 §10.1.1): we are the SCP of ``sop_class`` reporting an event."""
    cmd = Command(
        CommandField.N_EVENT_REPORT_RQ,
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=sop_instance,
        event_type_id=event_type_id,
    )
    return await _invoke(assoc, cmd, sop_class, event_information, as_scp=True, timeout=timeout)


async def n_get(
    assoc: DIMSEProvider,
    sop_class: str,
    sop_instance: str,
    attributes: list[int] | None = None,
    *,
    timeout: float | None = None,
) -> NResult:
    """N-GET (PS3.7 §10.1.2): the values of ``attributes`` (tags as ints; ``None``: all)."""
    cmd = Command(
        CommandField.N_GET_RQ,
        requested_sop_class_uid=sop_class,
        requested_sop_instance_uid=sop_instance,
        attribute_identifier_list=list(attributes) if attributes else None,
    )
    return await _invoke(assoc, cmd, sop_class, None, as_scp=False, timeout=timeout)


async def n_set(
    assoc: DIMSEProvider, sop_class: str, sop_instance: str, modifications: Dataset, *, timeout: float | None = None
) -> NResult:
    """N-SET (PS3.7 §10.1.3): replace the values of the attributes in ``modifications``."""
    cmd = Command(CommandField.N_SET_RQ, requested_sop_class_uid=sop_class, requested_sop_instance_uid=sop_instance)
    return await _invoke(assoc, cmd, sop_class, modifications, as_scp=False, timeout=timeout)


async def n_action(
    assoc: DIMSEProvider,
    sop_class: str,
    sop_instance: str,
    action_type_id: int,
    action_information: Dataset | None = None,
    *,
    timeout: float | None = None,
) -> NResult:
    """N-ACTION (PS3.7 §10.1.4): ask the SCP to perform action ``action_type_id``."""
    cmd = Command(
        CommandField.N_ACTION_RQ,
        requested_sop_class_uid=sop_class,
        requested_sop_instance_uid=sop_instance,
        action_type_id=action_type_id,
    )
    return await _invoke(assoc, cmd, sop_class, action_information, as_scp=False, timeout=timeout)


async def n_create(
    assoc: DIMSEProvider,
    sop_class: str,
    sop_instance: str | None = None,
    attributes: Dataset | None = None,
    *,
    timeout: float | None = None,
) -> NResult:
    """N-CREATE (PS3.7 §10.1.5); without ``sop_instance`` the SCP assigns one (in the result)."""
    cmd = Command(CommandField.N_CREATE_RQ, affected_sop_class_uid=sop_class, affected_sop_instance_uid=sop_instance)
    return await _invoke(assoc, cmd, sop_class, attributes, as_scp=False, timeout=timeout)


async def n_delete(assoc: DIMSEProvider, sop_class: str, sop_instance: str, *, timeout: float | None = None) -> NResult:
    """N-DELETE (PS3.7 §10.1.6)."""
    cmd = Command(CommandField.N_DELETE_RQ, requested_sop_class_uid=sop_class, requested_sop_instance_uid=sop_instance)
    return await _invoke(assoc, cmd, sop_class, None, as_scp=False, timeout=timeout)


# ---------------------------------------------------------------------------
# SCP
# ---------------------------------------------------------------------------


class NRequest(Request):
    """An N-request as an ``@ae.on_n_*`` handler sees it (PS3.7 §10.1).

    ``sop_class_uid`` / ``sop_instance_uid`` are the Affected or Requested ones,
    whichever the request carries (for N-CREATE without an instance UID: the one we
    assigned, which the response returns); ``dataset`` the decoded event information,
    modification list, action information or attribute list (``None`` if absent);
    ``attribute_identifier_list`` (N-GET), ``action_type_id``, ``event_type_id``.
    """

    __slots__ = ("dataset", "sop_class_uid", "sop_instance_uid")

    def __init__(self, assoc: DIMSEProvider, operation: Operation, dataset: Dataset | None):
        super().__init__(assoc, operation.message)
        cmd = operation.command
        requested = cmd.command_field in _REQUESTED
        self.sop_class_uid: str = (cmd.requested_sop_class_uid if requested else cmd.affected_sop_class_uid) or ""
        self.sop_instance_uid: str | None = (
            cmd.requested_sop_instance_uid if requested else cmd.affected_sop_instance_uid
        )
        self.dataset = dataset

    @property
    def service(self) -> str:
        return N_REQUESTS[self.command.command_field]

    @property
    def attribute_identifier_list(self) -> list[int]:
        return list(self.command.attribute_identifier_list or [])

    @property
    def action_type_id(self) -> int | None:
        return self.command.action_type_id

    @property
    def event_type_id(self) -> int | None:
        return self.command.event_type_id


#: ``async def handler(request: NRequest) -> status | Dataset | (status, Dataset) | None``.
NHandler = Callable[[NRequest], Awaitable[Any]]


def _outcome(result: Any, assoc: DIMSEProvider, name: str) -> tuple[Status, Dataset | None]:
    from pydicom.dataset import Dataset

    if result is None:
        return Status(Code.SUCCESS), None
    if isinstance(result, Dataset):
        return Status(Code.SUCCESS), result
    if isinstance(result, tuple) and len(result) == 2 and (result[1] is None or isinstance(result[1], Dataset)):
        status, ds = result
        if isinstance(status, int) and not isinstance(status, bool) and 0 <= status <= 0xFFFF:
            return (status if isinstance(status, Status) else Status(status)), ds
    if isinstance(result, int) and not isinstance(result, bool) and 0 <= result <= 0xFFFF:
        return (result if isinstance(result, Status) else Status(result)), None
    assoc.log.error(f"{name} handler returned a non-status", result=repr(result)[:100])
    return Status(NCode.PROCESSING_FAILURE, f"handler returned {type(result).__name__}, not a status"), None


def _response(op: Operation, status: Status, sop_class: str | None, sop_instance: str | None) -> Command:
    """The N-response command set (PS3.7 §10.3): affected class and instance echo the
    request (an N-CREATE failure names no instance: none was created, §10.1.5.1.4); a status of :data:`ATTRIBUTE_LIST_CODES` names its ``attributes`` in
    Attribute Identifier List (0000,1005) (PS3.7 Annex C)."""
    cmd = op.command
    if cmd.command_field == CommandField.N_CREATE_RQ and status.is_failure:
        sop_instance = None  # PS3.7 §10.1.5.1.4: only in a success; nothing was created
    rsp = Command(
        cmd.command_field | 0x8000,
        message_id_being_responded_to=cmd.message_id,
        affected_sop_class_uid=sop_class or None,
        affected_sop_instance_uid=sop_instance or None,
        status=int(status),
        error_comment=error_comment(status),
        error_id=status.error_id if isinstance(status, Status) and status.is_failure else None,
    )
    if status.attributes and int(status) in ATTRIBUTE_LIST_CODES:
        rsp.attribute_identifier_list = list(status.attributes)
    if cmd.command_field == CommandField.N_EVENT_REPORT_RQ:
        rsp.event_type_id = cmd.event_type_id
    elif cmd.command_field == CommandField.N_ACTION_RQ:
        rsp.action_type_id = cmd.action_type_id
    return rsp


def _decode_whole(data: bytes, transfer_syntax: str) -> Dataset:
    dataset = decode_received(data, transfer_syntax, MAX_N_REQUEST_ITEMS)
    # Touch every element: a malformed data set fails here, not in the handler.
    for _ in dataset.iterall():
        pass
    return dataset


async def scp_n_service(
    assoc: DIMSEProvider, op: Operation, handler: NHandler | None, *, class_served: bool = False
) -> None:
    """Perform one received N-request with ``handler`` and send its response (PS3.7 §10.1).

    No handler: 0x0211 Unrecognized Operation when ``class_served`` (the AE has handlers
    for other N-services of the class, e.g. an N-GET on MPPS, whose class has only
    N-CREATE and N-SET, PS3.4 Table F.7.1-1), else 0x0122 SOP Class Not Supported."""
    cmd = op.command
    field = cmd.command_field
    name = cmd.name[:-3]
    ctx = op.context
    dataset: Dataset | None = None
    status: Status | None = None
    request: NRequest | None = None
    if field == CommandField.N_EVENT_REPORT_RQ and not ctx.as_scu:
        # (the session let it through: a Storage Commitment report on an association the
        # reporting SCP opened without role selection; see session._report_by_default)
        assoc.log.warning(
            f"{name} without SCP/SCU role selection for its class: taken (PS3.4 J.2.1 asks for it)",
            sop_class=ctx.abstract_syntax,
            peer_ae=assoc.peer_ae,
        )
    if field in (CommandField.N_SET_RQ,) and op.message.dataset is None:
        status = Status(NCode.MISSING_ATTRIBUTE, "N-SET without a modification list")
    elif op.message.dataset is not None:
        try:
            if off_loop(op.message.dataset, ctx.transfer_syntax):
                dataset = await asyncio.to_thread(_decode_whole, op.message.dataset, ctx.transfer_syntax)
            else:
                dataset = _decode_whole(op.message.dataset, ctx.transfer_syntax)
        except TooManyItems as exc:
            assoc.log.warning(f"{name} data set refused", error=str(exc))
            status = Status(NCode.PROCESSING_FAILURE, f"data set refused: {exc}")
        except Exception as exc:
            assoc.log.warning(f"{name} data set cannot be decoded", error=str(exc)[:200])
            status = Status(NCode.MISTYPED_ARGUMENT, "data set cannot be decoded")
    if status is None:
        request = NRequest(assoc, op, dataset)
        if field == CommandField.N_CREATE_RQ and not request.sop_instance_uid:
            from pydicom.uid import generate_uid

            request.sop_instance_uid = generate_uid()  # the SCP assigns it (PS3.7 §10.1.5.1.2)
        if not request.sop_class_uid:
            status = Status(NCode.MISSING_ATTRIBUTE, "no SOP Class UID in the command")
        elif field != CommandField.N_CREATE_RQ and not request.sop_instance_uid:
            status = Status(NCode.MISSING_ATTRIBUTE, "no SOP Instance UID in the command")
        elif not plausible_uid(request.sop_instance_uid or ""):
            # PS3.7 §10.1: 0x0117 Invalid SOP Instance (every N-service); a handler
            # never sees letters, slashes or 65+ characters as an instance's name.
            status = Status(NCode.INVALID_OBJECT_INSTANCE, "invalid SOP Instance UID")
        elif request.sop_class_uid != ctx.abstract_syntax:
            status = Status(NCode.SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context's")
        elif handler is None and class_served:
            # PS3.7 Annex C: 0x0211, the operation is not one of those agreed for the class.
            status = Status(NCode.UNRECOGNIZED_OPERATION, f"{name} is not an operation of this SOP class here")
        elif handler is None:
            status = Status(NCode.SOP_CLASS_NOT_SUPPORTED, f"no {name} handler for this SOP class")
    reply: Dataset | None = None
    payload: bytes | None = None
    if status is None:
        assert request is not None and handler is not None
        try:
            result = handler(request)
            if hasattr(result, "__await__"):  # an async def's; a plain def's result is the outcome
                result = await result
        except asyncio.CancelledError as exc:
            if own_cancellation():
                raise
            status = failure_status(field, exc, assoc)
        except Exception as exc:
            status = failure_status(field, exc, assoc)
        else:
            status, reply = _outcome(result, assoc, name)
            status = final_status(field, status, assoc.log)
            if reply is not None and not status.is_failure:
                try:  # the handler's reply, encoded now: one pydicom cannot write is its failure
                    payload = encode_dataset(reply, ctx.transfer_syntax)
                except Exception as exc:  # (pydicom raises OSError for it: no lack of resources)
                    cause = ValueError(f"reply data set cannot be encoded: {brief_error(exc)}")
                    status, reply = failure_status(field, cause, assoc), None
    sop_class = request.sop_class_uid if request else (cmd.requested_sop_class_uid or cmd.affected_sop_class_uid)
    sop_instance = (
        request.sop_instance_uid if request else (cmd.requested_sop_instance_uid or cmd.affected_sop_instance_uid)
    )
    if status.is_failure:
        payload = None  # a failure carries no reply data set (PS3.7 §10.1)
    if not status.is_success:
        assoc.log.info(f"{name} answered", status=repr(status), sop_class=sop_class)
    rsp = _response(op, status, sop_class, sop_instance)
    await assoc.send(ctx.id, rsp, payload)
