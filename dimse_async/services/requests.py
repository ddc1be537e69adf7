"""What an SCP handler receives: one request on one association."""

from __future__ import annotations

from ..dimse import Command, Message
from ..interface import DIMSEProvider

__all__ = ["Request"]


class Request:
    """A DIMSE request as seen by an ``async def`` handler.

    ``assoc`` is the association (peer AE title, address, negotiated contexts),
    ``command`` the decoded command set, ``context_id`` / ``transfer_syntax`` the
    presentation context it came on.
    """

    __slots__ = ("assoc", "message")

    def __init__(self, assoc: DIMSEProvider, message: Message):
        self.assoc = assoc
        self.message = message

    @property
    def command(self) -> Command:
        return self.message.command

    @property
    def message_id(self) -> int | None:
        return self.message.command.message_id

    @property
    def context_id(self) -> int:
        return self.message.context_id

    @property
    def transfer_syntax(self) -> str:
        return self.assoc.context(self.message.context_id).transfer_syntax

    @property
    def calling_ae(self) -> str:
        return self.assoc.peer_ae

    def __repr__(self) -> str:
        return f"<Request {self.command.name} id={self.message_id} on {self.assoc!r}>"
