"""Verification service class (PS3.4 Annex A): C-ECHO SCU and SCP (PS3.7 §9.1.5, §9.3.5)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..dimse import Command, CommandField, Message, Status
from ..exceptions import DIMSEFailure
from ..uids import Verification
from .requests import Request

if TYPE_CHECKING:
    from ..acse import PresentationContext
    from ..association import Association

__all__ = ["c_echo", "scp_c_echo"]


async def c_echo(assoc: Association, *, timeout: float | None = None) -> Status:
    ctx = assoc.context_for(Verification)
    rsp = await assoc._request(
        ctx, Command(CommandField.C_ECHO_RQ, affected_sop_class_uid=Verification), timeout=timeout
    )
    if rsp.command.status is None:
        raise DIMSEFailure("C-ECHO-RSP has no status")
    return Status(rsp.command.status, rsp.command.error_comment)


async def scp_c_echo(assoc: Association, ctx: PresentationContext, msg: Message) -> None:
    """Answer a C-ECHO: success, or what the ``@ae.on_c_echo`` handler returns.

    A handler that raises is logged and answered with failure 0x0211 (PS3.7 C.5,
    the generic failure status C-ECHO can carry).
    """
    handler = assoc.ae._handlers.get("c_echo")
    status: Any = Status(Status.SUCCESS)
    if msg.command.affected_sop_class_uid != ctx.abstract_syntax:
        # PS3.7 §9.3.5.1: the Verification SOP Class; anything else is not supported.
        assoc.log.warning("C-ECHO-RQ for another SOP class", sop_class=msg.command.affected_sop_class_uid)
        status = Status(0x0122, "SOP class not supported")
    elif handler is not None:
        try:
            result = await handler(Request(assoc, msg))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            assoc.log.error("C-ECHO handler failed", error=repr(exc))
            result = Status(0x0211, f"handler error: {exc!r}"[:64])
        status = Status.SUCCESS if result is None else result
    rsp = Command(
        CommandField.C_ECHO_RSP,
        message_id_being_responded_to=msg.command.message_id,
        affected_sop_class_uid=msg.command.affected_sop_class_uid or Verification,
        status=int(status),
    )
    await assoc.send_message(ctx.id, rsp)
