"""Verification service class (PS3.4 Annex A): C-ECHO SCU and SCP (PS3.7 §9.1.5, §9.3.5)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..dimse import NO_DATASET, Command, CommandField, encode_response_fields
from ..interface import DIMSEProvider
from ..session import Operation
from ..status import Code, Status, response_status
from ..uids import Verification
from .requests import Request
from .scp import response, run_handler

__all__ = ["EchoService", "c_echo", "scp_c_echo", "start_c_echo"]


async def c_echo(assoc: DIMSEProvider, *, timeout: float | None = None) -> Status:
    """C-ECHO (PS3.7 §9.1.5): the response status."""
    ctx = assoc.context_for(Verification)
    rsp = await assoc.request(
        ctx, Command(CommandField.C_ECHO_RQ, affected_sop_class_uid=Verification), timeout=timeout
    )
    return response_status(rsp.command.status, rsp.command.error_comment)


def _echo_status(assoc: DIMSEProvider, op: Operation) -> Status | None:
    """The status for a C-ECHO-RQ of another SOP class (logged), else ``None``."""
    sop_class = op.message.command.affected_sop_class_uid
    if sop_class != op.context.abstract_syntax:
        # PS3.7 §9.3.5.1: the Verification SOP Class; anything else is not supported.
        assoc.log.warning("C-ECHO-RQ for another SOP class", sop_class=sop_class)
        return Status(Code.SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
    return None


def _echo_response(cmd: Command, status: Status) -> Command:
    if not status:  # success: what response() makes, in one step (one C-ECHO per association is usual)
        return Command(
            _C_ECHO_RSP,
            message_id_being_responded_to=cmd.message_id,
            affected_sop_class_uid=cmd.affected_sop_class_uid or Verification,
            status=0,
        )
    rsp = response(cmd, status)
    rsp.affected_sop_class_uid = cmd.affected_sop_class_uid or Verification
    return rsp


def start_c_echo(
    assoc: DIMSEProvider, op: Operation, handler: Callable[[Request], Awaitable[Any]] | None, done: asyncio.Future[None]
) -> bool:
    """Answer a C-ECHO at once, without a task, when no handler is registered (see
    :meth:`~dimse_async.messaging.DIMSEMessaging.answer`); ``False`` otherwise."""
    if handler is not None:
        return False
    cmd = op.message.command
    status = _echo_status(assoc, op)
    if status is None:
        mid = cmd.message_id
        # Success, from its encoded bytes alone when nobody would look at its Command
        # (as a C-STORE stored inline is answered: see DIMSEMessaging.answer_encoded).
        if mid is not None and assoc.answer_encoded(
            op,
            done,
            encode_response_fields(_C_ECHO_RSP, cmd.affected_sop_class_uid or Verification, NO_DATASET, mid, 0),
        ):
            return True
        status = _SUCCESS
    assoc.answer(op, _echo_response(cmd, status), done)
    return True


_SUCCESS = Status(Status.SUCCESS)
_C_ECHO_RSP = int(CommandField.C_ECHO_RSP)  # not read from the enum class per response (slow on 3.11)


async def scp_c_echo(
    assoc: DIMSEProvider, op: Operation, handler: Callable[[Request], Awaitable[Any]] | None = None
) -> None:
    """Answer a C-ECHO: success, or what the ``@ae.on_c_echo`` handler answers.

    A handler that raises is logged and answered with failure 0x0211 (PS3.7 C.5,
    the generic failure status C-ECHO can carry).
    """
    status = _echo_status(assoc, op)
    if status is None:
        status = _SUCCESS
        if handler is not None:
            status = await run_handler(CommandField.C_ECHO_RQ, handler, Request(assoc, op.message), assoc)
    await assoc.send(op.context.id, _echo_response(op.command, status))


class EchoService:
    """The C-ECHO entry of an AE's dispatch table: :func:`scp_c_echo` in a task, or
    :func:`start_c_echo` without one; ``handler()`` gives the handler registered at the
    time of the request."""

    __slots__ = ("_handler",)

    def __init__(self, handler: Callable[[], Callable[[Request], Awaitable[Any]] | None]):
        self._handler = handler

    def __call__(self, assoc: DIMSEProvider, op: Operation) -> Awaitable[None]:
        return scp_c_echo(assoc, op, self._handler())

    def start(self, assoc: DIMSEProvider, op: Operation, done: asyncio.Future[None]) -> bool:
        return start_c_echo(assoc, op, self._handler(), done)
