"""DICOM Upper Layer PDUs and items: bytes <-> objects (PS3.8 §9.3, Annex D).

Pure code: no sockets, no clocks. :class:`PDUReader` frames a byte stream into
PDUs incrementally and refuses oversized PDUs from the header alone, before any
of the claimed body is buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = [
    "ABORT_SOURCE_PROVIDER",
    "ABORT_SOURCE_USER",
    "APPLICATION_CONTEXT",
    "ACSEReason",
    "Abort",
    "AbortReason",
    "AssociateAC",
    "AssociateRJ",
    "AssociateRQ",
    "AsyncOpsWindow",
    "PDU",
    "PDUError",
    "PDUReader",
    "PDV",
    "PDataTF",
    "PDUType",
    "PresentationContextAC",
    "PresentationContextRQ",
    "PresentationReason",
    "RejectResult",
    "RejectSource",
    "ReleaseRP",
    "ReleaseRQ",
    "RoleSelection",
    "SOPClassCommonExtended",
    "SOPClassExtended",
    "UserIdentityAC",
    "UserIdentityRQ",
    "UserInformation",
    "UserReason",
    "decode_pdu",
    "encode_pdata_header",
]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
"""The DICOM application context name (PS3.7 Annex A.2.1)."""

ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2

_HDR = struct.Struct(">BBI")  # PDU type, reserved, length
_ITEM = struct.Struct(">BBH")  # item type, reserved, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_PDV = struct.Struct(">IBB")  # item length, context id, message control header
_PDATA_HDR = struct.Struct(">BBIIBB")  # PDU header + one PDV header

#: Largest non-P-DATA PDU we accept; an A-ASSOCIATE-RQ with many contexts and a
#: Kerberos/SAML identity fits comfortably.
MAX_CONTROL_PDU = 1 << 20


class PDUType(IntEnum):
    """PDU types (PS3.8 Table 9-11 … 9-26)."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class AbortReason(IntEnum):
    """A-ABORT reason/diag. when the source is the service-provider (PS3.8 §9.3.8)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class PDUError(ValueError):
    """A malformed or unacceptable PDU; ``reason`` is the A-ABORT reason to send."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER_VALUE):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------
# Items and sub-items
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class PresentationContextRQ:
    """Presentation context item of an A-ASSOCIATE-RQ (item 20H, PS3.8 §9.3.2.2)."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass(slots=True)
class PresentationContextAC:
    """Presentation context item of an A-ASSOCIATE-AC (item 21H, PS3.8 §9.3.3.2).

    ``result``: 0 acceptance, 1 user-rejection, 2 no-reason (provider rejection),
    3 abstract-syntax-not-supported, 4 transfer-syntaxes-not-supported.
    """

    id: int
    result: int
    transfer_syntax: str = ""


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


# ---------------------------------------------------------------------------
# PDUs
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class AssociateRQ:
    """A-ASSOCIATE-RQ PDU (PS3.8 §9.3.2)."""

    called_ae: str
    calling_ae: str
    presentation_contexts: list[PresentationContextRQ]
    user_info: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1

    def encode(self) -> bytes:
        body = bytearray()
        body += _U16.pack(self.protocol_version) + b"\x00\x00"
        body += _ae(self.called_ae) + _ae(self.calling_ae) + bytes(32)
        body += _item(0x10, self.application_context.encode("ascii"))
        for pc in self.presentation_contexts:
            sub = _item(0x30, pc.abstract_syntax.encode("ascii"))
            for ts in pc.transfer_syntaxes:
                sub += _item(0x40, ts.encode("ascii"))
            body += _item(0x20, bytes((pc.id, 0, 0, 0)) + sub)
        body += _encode_user_info(self.user_info)
        return _pdu(PDUType.ASSOCIATE_RQ, body)


@dataclass(slots=True)
class AssociateAC:
    """A-ASSOCIATE-AC PDU (PS3.8 §9.3.3)."""

    called_ae: str
    calling_ae: str
    presentation_contexts: list[PresentationContextAC]
    user_info: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1

    def encode(self) -> bytes:
        body = bytearray()
        body += _U16.pack(self.protocol_version) + b"\x00\x00"
        body += _ae(self.called_ae) + _ae(self.calling_ae) + bytes(32)
        body += _item(0x10, self.application_context.encode("ascii"))
        for pc in self.presentation_contexts:
            sub = _item(0x40, pc.transfer_syntax.encode("ascii")) if pc.transfer_syntax else b""
            body += _item(0x21, bytes((pc.id, 0, pc.result, 0)) + sub)
        body += _encode_user_info(self.user_info)
        return _pdu(PDUType.ASSOCIATE_AC, body)


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 Table 9-21)."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 Table 9-21)."""

    USER = 1  # DICOM UL service-user
    ACSE = 2  # DICOM UL service-provider (ACSE related function)
    PRESENTATION = 3  # DICOM UL service-provider (presentation related function)


class UserReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the source is the service-user."""

    NO_REASON_GIVEN = 1
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7


class ACSEReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the source is the service-provider (ACSE)."""

    NO_REASON_GIVEN = 1
    PROTOCOL_VERSION_NOT_SUPPORTED = 2


class PresentationReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the source is the service-provider (presentation)."""

    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


@dataclass(slots=True)
class AssociateRJ:
    """A-ASSOCIATE-RJ PDU (PS3.8 §9.3.4).

    ``result``: 1 rejected-permanent, 2 rejected-transient. ``source``: 1 service-user,
    2 service-provider (ACSE), 3 service-provider (presentation).
    """

    result: int
    source: int
    reason: int

    def encode(self) -> bytes:
        return _pdu(PDUType.ASSOCIATE_RJ, bytes((0, self.result, self.source, self.reason)))


@dataclass(slots=True)
class PDV:
    """One presentation data value item of a P-DATA-TF PDU (PS3.8 §9.3.5, Annex E)."""

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes | memoryview

    @property
    def control(self) -> int:
        return (1 if self.is_command else 0) | (2 if self.is_last else 0)


@dataclass(slots=True)
class PDataTF:
    """P-DATA-TF PDU (PS3.8 §9.3.5)."""

    pdvs: list[PDV]

    def encode(self) -> bytes:
        parts = []
        for pdv in self.pdvs:
            parts.append(_PDV.pack(len(pdv.data) + 2, pdv.context_id, pdv.control))
            parts.append(bytes(pdv.data))
        return _pdu(PDUType.P_DATA_TF, b"".join(parts))


@dataclass(slots=True)
class ReleaseRQ:
    """A-RELEASE-RQ PDU (PS3.8 §9.3.6)."""

    def encode(self) -> bytes:
        return _pdu(PDUType.RELEASE_RQ, bytes(4))


@dataclass(slots=True)
class ReleaseRP:
    """A-RELEASE-RP PDU (PS3.8 §9.3.7)."""

    def encode(self) -> bytes:
        return _pdu(PDUType.RELEASE_RP, bytes(4))


@dataclass(slots=True)
class Abort:
    """A-ABORT PDU (PS3.8 §9.3.8). ``source``: 0 service-user, 2 service-provider."""

    source: int = ABORT_SOURCE_USER
    reason: int = 0

    def encode(self) -> bytes:
        return _pdu(PDUType.ABORT, bytes((0, 0, self.source, self.reason)))


PDU = AssociateRQ | AssociateAC | AssociateRJ | PDataTF | ReleaseRQ | ReleaseRP | Abort


def encode_pdata_header(data_length: int, context_id: int, control: int) -> bytes:
    """Header of a P-DATA-TF PDU carrying exactly one PDV of ``data_length`` bytes.

    Lets a sender write ``header + payload`` without copying the payload.
    """
    return _PDATA_HDR.pack(PDUType.P_DATA_TF, 0, data_length + 6, data_length + 2, context_id, control)


# ---------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------


def _pdu(pdu_type: int, body: bytes | bytearray) -> bytes:
    return _HDR.pack(pdu_type, 0, len(body)) + body


def _item(item_type: int, value: bytes | bytearray) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"item {item_type:#04x} value too long ({len(value)} bytes)")
    return _ITEM.pack(item_type, 0, len(value)) + value


def _ae(title: str) -> bytes:
    raw = title.encode("ascii")
    if len(raw) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    return raw.ljust(16, b" ")


def _uid_field(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return _U16.pack(len(raw)) + raw


def _encode_user_info(ui: UserInformation) -> bytes:
    sub = bytearray()
    if ui.max_length is not None:
        sub += _item(0x51, _U32.pack(ui.max_length))
    sub += _item(0x52, ui.implementation_class_uid.encode("ascii"))
    if ui.async_ops is not None:
        sub += _item(0x53, struct.pack(">HH", ui.async_ops.max_ops_invoked, ui.async_ops.max_ops_performed))
    for role in ui.roles:
        sub += _item(0x54, _uid_field(role.sop_class_uid) + bytes((int(role.scu_role), int(role.scp_role))))
    if ui.implementation_version_name:
        sub += _item(0x55, ui.implementation_version_name.encode("ascii"))
    for ext in ui.extended:
        sub += _item(0x56, _uid_field(ext.sop_class_uid) + bytes(ext.info))
    for cx in ui.common_extended:
        related = b"".join(_uid_field(u) for u in cx.related_general_sop_classes)
        sub += _item(
            0x57,
            _uid_field(cx.sop_class_uid) + _uid_field(cx.service_class_uid) + _U16.pack(len(related)) + related,
        )
    if ui.identity_rq is not None:
        rq = ui.identity_rq
        sub += _item(
            0x58,
            bytes((rq.type, int(rq.positive_response_requested)))
            + _U16.pack(len(rq.primary))
            + rq.primary
            + _U16.pack(len(rq.secondary))
            + rq.secondary,
        )
    if ui.identity_ac is not None:
        resp = ui.identity_ac.server_response
        sub += _item(0x59, _U16.pack(len(resp)) + resp)
    return _item(0x50, sub)


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _text(raw: bytes | memoryview, what: str) -> str:
    try:
        return bytes(raw).decode("ascii").rstrip("\x00 ").lstrip(" ")
    except UnicodeDecodeError:
        raise PDUError(f"{what} is not ASCII") from None


def _items(body: memoryview, what: str) -> Iterator[tuple[int, memoryview]]:
    """Iterate (type, value) over a run of items with 2-byte lengths."""
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 4:
            raise PDUError(f"truncated item header in {what}")
        item_type, _, length = _ITEM.unpack_from(body, pos)
        pos += 4
        if pos + length > end:
            raise PDUError(f"item {item_type:#04x} in {what} claims {length} bytes, only {end - pos} remain")
        yield item_type, body[pos : pos + length]
        pos += length


def _uid_prefixed(value: memoryview, pos: int, what: str) -> tuple[str, int]:
    if pos + 2 > len(value):
        raise PDUError(f"truncated {what}")
    (n,) = _U16.unpack_from(value, pos)
    pos += 2
    if pos + n > len(value):
        raise PDUError(f"{what} length {n} overruns its item")
    return _text(value[pos : pos + n], what), pos + n


def _decode_user_info(value: memoryview) -> UserInformation:
    ui = UserInformation()
    for t, v in _items(value, "user information"):
        if t == 0x51:
            if len(v) != 4:
                raise PDUError("maximum length sub-item must be 4 bytes")
            ui.max_length = _U32.unpack(v)[0]
        elif t == 0x52:
            ui.implementation_class_uid = _text(v, "implementation class UID")
        elif t == 0x53:
            if len(v) != 4:
                raise PDUError("asynchronous operations window sub-item must be 4 bytes")
            ui.async_ops = AsyncOpsWindow(*struct.unpack(">HH", v))
        elif t == 0x54:
            uid, pos = _uid_prefixed(v, 0, "role selection SOP class UID")
            if pos + 2 != len(v):
                raise PDUError("role selection sub-item has bad length")
            ui.roles.append(RoleSelection(uid, bool(v[pos]), bool(v[pos + 1])))
        elif t == 0x55:
            ui.implementation_version_name = _text(v, "implementation version name")
        elif t == 0x56:
            uid, pos = _uid_prefixed(v, 0, "extended negotiation SOP class UID")
            ui.extended.append(SOPClassExtended(uid, bytes(v[pos:])))
        elif t == 0x57:
            sop, pos = _uid_prefixed(v, 0, "common extended SOP class UID")
            service, pos = _uid_prefixed(v, pos, "common extended service class UID")
            if pos + 2 > len(v):
                raise PDUError("truncated related general SOP class list")
            (n,) = _U16.unpack_from(v, pos)
            pos += 2
            end = pos + n
            if end > len(v):
                raise PDUError("related general SOP class list overruns its item")
            related = []
            sub = v[:end]
            while pos < end:
                uid, pos = _uid_prefixed(sub, pos, "related general SOP class UID")
                related.append(uid)
            ui.common_extended.append(SOPClassCommonExtended(sop, service, related))
        elif t == 0x58:
            if len(v) < 4:
                raise PDUError("truncated user identity sub-item")
            id_type, pos_rsp = v[0], v[1]
            (n1,) = _U16.unpack_from(v, 2)
            if 4 + n1 + 2 > len(v):
                raise PDUError("user identity primary field overruns its item")
            primary = bytes(v[4 : 4 + n1])
            (n2,) = _U16.unpack_from(v, 4 + n1)
            if 6 + n1 + n2 != len(v):
                raise PDUError("user identity secondary field has bad length")
            secondary = bytes(v[6 + n1 :])
            ui.identity_rq = UserIdentityRQ(id_type, primary, secondary, bool(pos_rsp))
        elif t == 0x59:
            if len(v) < 2 or _U16.unpack_from(v, 0)[0] != len(v) - 2:
                raise PDUError("user identity response sub-item has bad length")
            ui.identity_ac = UserIdentityAC(bytes(v[2:]))
        # Unknown sub-items are skipped (PS3.7 D.3.3: not fatal).
    return ui


def _decode_associate(pdu_type: int, body: memoryview) -> AssociateRQ | AssociateAC:
    if len(body) < 68:
        raise PDUError("A-ASSOCIATE PDU shorter than its fixed fields")
    (version,) = _U16.unpack_from(body, 0)
    called = _text(body[4:20], "called AE title")
    calling = _text(body[20:36], "calling AE title")
    app_context = None
    user_info = None
    rq_contexts: list[PresentationContextRQ] = []
    ac_contexts: list[PresentationContextAC] = []
    for t, v in _items(body[68:], "A-ASSOCIATE PDU"):
        if t == 0x10:
            app_context = _text(v, "application context name")
        elif t == 0x20 and pdu_type == PDUType.ASSOCIATE_RQ:
            if len(v) < 4:
                raise PDUError("truncated presentation context item")
            abstract = None
            syntaxes = []
            for st, sv in _items(v[4:], "presentation context"):
                if st == 0x30:
                    if abstract is not None:
                        raise PDUError("presentation context has two abstract syntaxes")
                    abstract = _text(sv, "abstract syntax")
                elif st == 0x40:
                    syntaxes.append(_text(sv, "transfer syntax"))
                else:
                    raise PDUError(
                        f"unknown sub-item {st:#04x} in presentation context", AbortReason.UNRECOGNIZED_PDU_PARAMETER
                    )
            if abstract is None or not syntaxes:
                raise PDUError("presentation context lacks an abstract or transfer syntax")
            rq_contexts.append(PresentationContextRQ(v[0], abstract, syntaxes))
        elif t == 0x21 and pdu_type == PDUType.ASSOCIATE_AC:
            if len(v) < 4:
                raise PDUError("truncated presentation context item")
            ts = ""
            for st, sv in _items(v[4:], "presentation context"):
                if st == 0x40:
                    ts = _text(sv, "transfer syntax")
            ac_contexts.append(PresentationContextAC(v[0], v[2], ts))
        elif t == 0x50:
            user_info = _decode_user_info(v)
        else:
            raise PDUError(f"unexpected item {t:#04x} in A-ASSOCIATE PDU", AbortReason.UNEXPECTED_PDU_PARAMETER)
    if app_context is None:
        raise PDUError("A-ASSOCIATE PDU has no application context item")
    if user_info is None:
        raise PDUError("A-ASSOCIATE PDU has no user information item")
    if pdu_type == PDUType.ASSOCIATE_RQ:
        return AssociateRQ(called, calling, rq_contexts, user_info, app_context, version)
    return AssociateAC(called, calling, ac_contexts, user_info, app_context, version)


def _decode_pdata(body: memoryview) -> PDataTF:
    pdvs = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            raise PDUError("truncated PDV item header")
        length, ctx, control = _PDV.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            raise PDUError(f"PDV item length {length} is invalid")
        pdvs.append(PDV(ctx, bool(control & 1), bool(control & 2), body[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    if not pdvs:
        raise PDUError("P-DATA-TF PDU holds no PDV")
    return PDataTF(pdvs)


def decode_pdu(pdu_type: int, body: bytes | memoryview) -> PDU:
    """Decode one PDU body (without its 6-byte header). Raises :class:`PDUError`."""
    mv = memoryview(body)
    if pdu_type == PDUType.P_DATA_TF:
        return _decode_pdata(mv)
    if pdu_type in (PDUType.ASSOCIATE_RQ, PDUType.ASSOCIATE_AC):
        return _decode_associate(pdu_type, mv)
    if pdu_type in (PDUType.ASSOCIATE_RJ, PDUType.RELEASE_RQ, PDUType.RELEASE_RP, PDUType.ABORT):
        if len(mv) != 4:
            raise PDUError(f"PDU type {pdu_type:#04x} must have length 4, not {len(mv)}")
        if pdu_type == PDUType.ASSOCIATE_RJ:
            return AssociateRJ(mv[1], mv[2], mv[3])
        if pdu_type == PDUType.ABORT:
            return Abort(mv[2], mv[3])
        return ReleaseRQ() if pdu_type == PDUType.RELEASE_RQ else ReleaseRP()
    raise PDUError(f"unrecognized PDU type {pdu_type:#04x}", AbortReason.UNRECOGNIZED_PDU)


class PDUReader:
    """Incremental PDU framer (cf. h11's receive buffer).

    Feed it bytes in any split; take complete PDUs with :meth:`next_pdu`. A header is
    judged as soon as its 6 bytes are in: an unknown type or a length over the limit
    raises :class:`PDUError` at once, so a 64 MiB claim costs 6 bytes of memory.

    Received chunks are kept as they came; they are joined only when a PDU spans
    several of them, and PDU bodies (and so P-DATA fragments) are memoryviews into
    them, so each received byte is copied at most once.

    ``max_pdata_length`` is the maximum length we advertised (PS3.8 D.1): the limit
    on the P-DATA-TF PDU-length field. 0 means we advertised "unlimited"; the reader
    still caps it at ``hard_limit``.
    """

    __slots__ = ("_head", "_pos", "_tail", "_avail", "max_pdata_length", "hard_limit")

    def __init__(self, max_pdata_length: int, hard_limit: int = 1 << 26):
        self._head: bytes = b""
        self._pos = 0
        self._tail: list[bytes] = []
        self._avail = 0
        self.max_pdata_length = max_pdata_length
        self.hard_limit = hard_limit

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        chunk = data if type(data) is bytes else bytes(data)
        if self._pos >= len(self._head) and not self._tail:
            self._head, self._pos = chunk, 0
        else:
            self._tail.append(chunk)
        self._avail += len(chunk)

    @property
    def buffered(self) -> int:
        return self._avail

    def _coalesce(self, need: int) -> None:
        """Make at least ``need`` unread bytes contiguous in ``_head``."""
        if len(self._head) - self._pos >= need:
            return
        self._head = self._head[self._pos :] + b"".join(self._tail)
        self._pos = 0
        self._tail = []

    def next_pdu(self) -> PDU | None:
        if self._avail < 6:
            return None
        self._coalesce(6)
        pdu_type, _, length = _HDR.unpack_from(self._head, self._pos)
        if pdu_type == PDUType.P_DATA_TF:
            limit = self.max_pdata_length or self.hard_limit
        elif 1 <= pdu_type <= 7:
            limit = MAX_CONTROL_PDU
        else:
            raise PDUError(f"unrecognized PDU type {pdu_type:#04x}", AbortReason.UNRECOGNIZED_PDU)
        if length > limit:
            raise PDUError(
                f"PDU type {pdu_type:#04x} claims {length} bytes, over our limit of {limit}",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        total = 6 + length
        if self._avail < total:
            return None
        self._coalesce(total)
        start = self._pos + 6
        body = memoryview(self._head)[start : start + length]
        self._pos += total
        self._avail -= total
        if self._pos >= len(self._head):
            self._head, self._pos = (self._tail.pop(0), 0) if self._tail else (b"", 0)
        return decode_pdu(pdu_type, body)
