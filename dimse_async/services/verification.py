"""Verification service class (PS3.4 Annex A): C-ECHO SCU and SCP (PS3.7 §9.1.5, §9.3.5)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..dimse import Command, CommandField
from ..interface import DIMSEProvider
from ..session import Operation
from ..status import Code, Status, response_status
from ..uids import Verification
from .requests import Request
from .scp import response, run_handler

__all__ = ["c_echo", "scp_c_echo"]


async def c_echo(assoc: DIMSEProvider, *, timeout: float | None = None) -> Status:
    """C-ECHO (PS3.7 §9.1.5): the response status."""
    ctx = assoc.context_for(Verification)
    rsp = await assoc.request(
        ctx, Command(CommandField.C_ECHO_RQ, affected_sop_class_uid=Verification), timeout=timeout
    )
    return response_status(rsp.command.status, rsp.command.error_comment)


async def scp_c_echo(
    assoc: DIMSEProvider, op: Operation, handler: Callable[[Request], Awaitable[Any]] | None = None
) -> None:
    """Answer a C-ECHO: success, or what the ``@ae.on_c_echo`` handler answers.

    A handler that raises is logged and answered with failure 0x0211 (PS3.7 C.5,
    the generic failure status C-ECHO can carry).
    """
    status = Status(Status.SUCCESS)
    if op.command.affected_sop_class_uid != op.context.abstract_syntax:
        # PS3.7 §9.3.5.1: the Verification SOP Class; anything else is not supported.
        assoc.log.warning("C-ECHO-RQ for another SOP class", sop_class=op.command.affected_sop_class_uid)
        status = Status(Code.SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
    elif handler is not None:
        status = await run_handler(CommandField.C_ECHO_RQ, handler, Request(assoc, op.message), assoc)
    cmd = op.command
    rsp = response(cmd, status)
    rsp.affected_sop_class_uid = cmd.affected_sop_class_uid or Verification
    await assoc.send(op.context.id, rsp)
