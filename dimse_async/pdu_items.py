"""User information sub-items of A-ASSOCIATE-RQ/AC and the item helpers PDUs share
(PS3.8 Annex D, PS3.7 Annex D). Pure code."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import field
from enum import IntEnum

from .lazy_dataclass import dataclass

__all__ = [
    "ITEM",
    "AbortReason",
    "U16",
    "U32",
    "AsyncOpsWindow",
    "PDUError",
    "RoleSelection",
    "SOPClassCommonExtended",
    "SOPClassExtended",
    "UserIdentityAC",
    "UserIdentityRQ",
    "UserInformation",
    "decode_user_info",
    "encode_user_info",
    "item",
    "items",
    "text",
    "uid_field",
    "uid_prefixed",
]

ITEM = struct.Struct(">BBH")  # item type, reserved, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")


class AbortReason(IntEnum):
    """A-ABORT reason/diag. when the source is the service-provider (PS3.8 §9.3.8)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


@dataclass(slots=True)
class AsyncOpsWindow:
    """Asynchronous operations window sub-item (53H, PS3.7 D.3.3.3). 0 = unlimited."""

    max_ops_invoked: int = 1
    max_ops_performed: int = 1


@dataclass(slots=True)
class RoleSelection:
    """SCP/SCU role selection sub-item (54H, PS3.7 D.3.3.4)."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(slots=True)
class SOPClassExtended:
    """SOP class extended negotiation sub-item (56H, PS3.7 D.3.3.5)."""

    sop_class_uid: str
    info: bytes


@dataclass(slots=True)
class SOPClassCommonExtended:
    """SOP class common extended negotiation sub-item (57H, PS3.7 D.3.3.6)."""

    sop_class_uid: str
    service_class_uid: str
    related_general_sop_classes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class UserIdentityRQ:
    """User identity negotiation sub-item, RQ (58H, PS3.7 D.3.3.7.1).

    ``type``: 1 username, 2 username+passcode, 3 Kerberos, 4 SAML, 5 JWT.
    """

    type: int
    primary: bytes
    secondary: bytes = b""
    positive_response_requested: bool = False


@dataclass(slots=True)
class UserIdentityAC:
    """User identity negotiation sub-item, AC (59H, PS3.7 D.3.3.7.2)."""

    server_response: bytes = b""


@dataclass(slots=True)
class UserInformation:
    """User information item (50H) and its sub-items (PS3.8 Annex D, PS3.7 Annex D)."""

    max_length: int | None = None
    implementation_class_uid: str = ""
    implementation_version_name: str | None = None
    async_ops: AsyncOpsWindow | None = None
    roles: list[RoleSelection] = field(default_factory=list)
    extended: list[SOPClassExtended] = field(default_factory=list)
    common_extended: list[SOPClassCommonExtended] = field(default_factory=list)
    identity_rq: UserIdentityRQ | None = None
    identity_ac: UserIdentityAC | None = None


class PDUError(ValueError):
    """A malformed or unacceptable PDU; ``reason`` is the A-ABORT reason to send."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER_VALUE):
        super().__init__(message)
        self.reason = reason


def item(item_type: int, value: bytes | bytearray) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"item {item_type:#04x} value too long ({len(value)} bytes)")
    return ITEM.pack(item_type, 0, len(value)) + value


def uid_field(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return U16.pack(len(raw)) + raw


def encode_user_info(ui: UserInformation) -> bytes:
    sub = bytearray()
    if ui.max_length is not None:
        sub += item(0x51, U32.pack(ui.max_length))
    sub += item(0x52, ui.implementation_class_uid.encode("ascii"))
    if ui.async_ops is not None:
        sub += item(0x53, struct.pack(">HH", ui.async_ops.max_ops_invoked, ui.async_ops.max_ops_performed))
    for role in ui.roles:
        sub += item(0x54, uid_field(role.sop_class_uid) + bytes((int(role.scu_role), int(role.scp_role))))
    if ui.implementation_version_name:
        sub += item(0x55, ui.implementation_version_name.encode("ascii"))
    for ext in ui.extended:
        sub += item(0x56, uid_field(ext.sop_class_uid) + bytes(ext.info))
    for cx in ui.common_extended:
        related = b"".join(uid_field(u) for u in cx.related_general_sop_classes)
        sub += item(
            0x57,
            uid_field(cx.sop_class_uid) + uid_field(cx.service_class_uid) + U16.pack(len(related)) + related,
        )
    if ui.identity_rq is not None:
        rq = ui.identity_rq
        sub += item(
            0x58,
            bytes((rq.type, int(rq.positive_response_requested)))
            + U16.pack(len(rq.primary))
            + rq.primary
            + U16.pack(len(rq.secondary))
            + rq.secondary,
        )
    if ui.identity_ac is not None:
        resp = ui.identity_ac.server_response
        sub += item(0x59, U16.pack(len(resp)) + resp)
    return item(0x50, sub)


def text(raw: bytes | memoryview, what: str) -> str:
    try:
        return bytes(raw).decode("ascii").rstrip("\x00 ").lstrip(" ")
    except UnicodeDecodeError:
        raise PDUError(f"{what} is not ASCII") from None


def items(body: memoryview, what: str) -> Iterator[tuple[int, memoryview]]:
    """Iterate (type, value) over a run of items with 2-byte lengths."""
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 4:
            raise PDUError(f"truncated item header in {what}")
        item_type, _, length = ITEM.unpack_from(body, pos)
        pos += 4
        if pos + length > end:
            raise PDUError(f"item {item_type:#04x} in {what} claims {length} bytes, only {end - pos} remain")
        yield item_type, body[pos : pos + length]
        pos += length


def uid_prefixed(value: memoryview, pos: int, what: str) -> tuple[str, int]:
    if pos + 2 > len(value):
        raise PDUError(f"truncated {what}")
    (n,) = U16.unpack_from(value, pos)
    pos += 2
    if pos + n > len(value):
        raise PDUError(f"{what} length {n} overruns its item")
    return text(value[pos : pos + n], what), pos + n


def decode_user_info(value: memoryview) -> UserInformation:
    ui = UserInformation()
    for t, v in items(value, "user information"):
        if t == 0x51:
            if len(v) != 4:
                raise PDUError("maximum length sub-item must be 4 bytes")
            ui.max_length = U32.unpack(v)[0]
        elif t == 0x52:
            ui.implementation_class_uid = text(v, "implementation class UID")
        elif t == 0x53:
            if len(v) != 4:
                raise PDUError("asynchronous operations window sub-item must be 4 bytes")
            ui.async_ops = AsyncOpsWindow(*struct.unpack(">HH", v))
        elif t == 0x54:
            uid, pos = uid_prefixed(v, 0, "role selection SOP class UID")
            if pos + 2 != len(v):
                raise PDUError("role selection sub-item has bad length")
            ui.roles.append(RoleSelection(uid, bool(v[pos]), bool(v[pos + 1])))
        elif t == 0x55:
            ui.implementation_version_name = text(v, "implementation version name")
        elif t == 0x56:
            uid, pos = uid_prefixed(v, 0, "extended negotiation SOP class UID")
            ui.extended.append(SOPClassExtended(uid, bytes(v[pos:])))
        elif t == 0x57:
            sop, pos = uid_prefixed(v, 0, "common extended SOP class UID")
            service, pos = uid_prefixed(v, pos, "common extended service class UID")
            if pos + 2 > len(v):
                raise PDUError("truncated related general SOP class list")
            (n,) = U16.unpack_from(v, pos)
            pos += 2
            end = pos + n
            if end > len(v):
                raise PDUError("related general SOP class list overruns its item")
            related = []
            sub = v[:end]
            while pos < end:
                uid, pos = uid_prefixed(sub, pos, "related general SOP class UID")
                related.append(uid)
            ui.common_extended.append(SOPClassCommonExtended(sop, service, related))
        elif t == 0x58:
            if len(v) < 4:
                raise PDUError("truncated user identity sub-item")
            id_type, pos_rsp = v[0], v[1]
            (n1,) = U16.unpack_from(v, 2)
            if 4 + n1 + 2 > len(v):
                raise PDUError("user identity primary field overruns its item")
            primary = bytes(v[4 : 4 + n1])
            (n2,) = U16.unpack_from(v, 4 + n1)
            if 6 + n1 + n2 != len(v):
                raise PDUError("user identity secondary field has bad length")
            secondary = bytes(v[6 + n1 :])
            ui.identity_rq = UserIdentityRQ(id_type, primary, secondary, bool(pos_rsp))
        elif t == 0x59:
            if len(v) < 2 or U16.unpack_from(v, 0)[0] != len(v) - 2:
                raise PDUError("user identity response sub-item has bad length")
            ui.identity_ac = UserIdentityAC(bytes(v[2:]))
        # Unknown sub-items are skipped (PS3.7 D.3.3: not fatal).
    return ui
