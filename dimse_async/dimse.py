"""DIMSE messages: command sets, fragmentation and reassembly (PS3.7 §6.3, §9.3, §10.3,
Annex E; PS3.8 Annex E). Pure code.

A command set is group 0000 encoded in implicit VR little endian. :class:`Command`
holds every command field of PS3.7 Annex E; :func:`encode_command` and
:func:`decode_command` convert it. :func:`fragment` cuts a message into P-DATA-TF
PDUs for the peer's maximum length, and :class:`MessageAssembler` rebuilds messages
from received PDVs, checking context ids and ordering.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
from collections.abc import Iterable, Iterator
from enum import IntEnum
from typing import Any, Final, Protocol

from .lazy_dataclass import dataclass
from .pdu import PDV, AbortReason, encode_pdata_header
from .status import Status

__all__ = [
    "affected_mismatch",
    "NO_DATASET",
    "AssemblerEvent",
    "Command",
    "CommandField",
    "CommandReceived",
    "DIMSEError",
    "DataFragment",
    "DatasetSink",
    "DatasetSource",
    "Message",
    "MessageAssembler",
    "Status",
    "response_to",
    "decode_command",
    "encode_command",
    "encode_pdata",
    "encode_response_fields",
    "encode_store_success",
    "fragment",
    "fragment_stream",
]

NO_DATASET = 0x0101
"""Command Data Set Type value meaning "no data set" (PS3.7 E.1)."""


class CommandField(IntEnum):
    """Command Field (0000,0100) values (PS3.7 E.1)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF


_NAMES = {int(f): f.name.replace("_", "-") for f in CommandField}


class DIMSEError(ValueError):
    """A DIMSE protocol violation (bad command set, misordered fragments).

    ``reason``: the A-ABORT reason (service-provider source, PS3.8 Table 9-26) it is
    answered with: unexpected-PDU parameter for a PDV out of turn (a command set where a
    data set is due, a data set fragment on another context or without a command, as
    dcm4che judges them), else reason-not-specified."""

    def __init__(self, message: str, reason: int = 0) -> None:
        super().__init__(message)
        self.reason = reason


# (element number, VR, attribute) for every command element, in tag order.
_ELEMENTS: list[tuple[int, str, str]] = [
    (0x0002, "UI", "affected_sop_class_uid"),
    (0x0003, "UI", "requested_sop_class_uid"),
    (0x0100, "US", "command_field"),
    (0x0110, "US", "message_id"),
    (0x0120, "US", "message_id_being_responded_to"),
    (0x0600, "AE", "move_destination"),
    (0x0700, "US", "priority"),
    (0x0800, "US", "data_set_type"),
    (0x0900, "US", "status"),
    (0x0901, "AT", "offending_element"),
    (0x0902, "LO", "error_comment"),
    (0x0903, "US", "error_id"),
    (0x1000, "UI", "affected_sop_instance_uid"),
    (0x1001, "UI", "requested_sop_instance_uid"),
    (0x1002, "US", "event_type_id"),
    (0x1005, "AT", "attribute_identifier_list"),
    (0x1008, "US", "action_type_id"),
    (0x1020, "US", "remaining"),
    (0x1021, "US", "completed"),
    (0x1022, "US", "failed"),
    (0x1023, "US", "warning"),
    (0x1030, "AE", "move_originator_ae"),
    (0x1031, "US", "move_originator_message_id"),
]
_BY_ELEMENT = {elem: (vr, name) for elem, vr, name in _ELEMENTS}
_ELEM_HDR = struct.Struct("<HHI")
_US = struct.Struct("<H")


@dataclass(slots=True)
class Command:
    """A DIMSE command set (PS3.7 Annex E). Absent fields are ``None``.

    ``offending_element`` and ``attribute_identifier_list`` hold tags as ints
    (``0xGGGGEEEE``).
    """

    command_field: int
    message_id: int | None = None
    message_id_being_responded_to: int | None = None
    affected_sop_class_uid: str | None = None
    requested_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    requested_sop_instance_uid: str | None = None
    data_set_type: int = NO_DATASET
    status: int | None = None
    priority: int | None = None
    move_destination: str | None = None
    offending_element: list[int] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    event_type_id: int | None = None
    attribute_identifier_list: list[int] | None = None
    action_type_id: int | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None

    @property
    def has_dataset(self) -> bool:
        return self.data_set_type != NO_DATASET

    @property
    def is_response(self) -> bool:
        return bool(self.command_field & 0x8000)

    @property
    def name(self) -> str:
        name = _NAMES.get(self.command_field)
        return name if name is not None else f"command {self.command_field:#06x}"


def _encode_value(vr: str, value: Any) -> bytes:
    if vr == "US":
        return _US.pack(value)
    if vr == "AT":
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in value)
    # A value echoed from a malformed request may hold bytes decoded as U+FFFD: never
    # fail to answer over it (PS3.7 §6.3.1, command strings are the default repertoire).
    raw = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw


_US_ELEM = struct.Struct("<HHIH")  # a whole US element: tag, length 2, value
_GROUP_LENGTH = struct.Struct("<HHII")  # (0000,0000) UL
_ALL_VALUES = operator.attrgetter(*(name for _, _, name in _ELEMENTS))  # every field in one C call
_ENCODING = [(elem, vr == "US", vr) for elem, vr, _ in _ELEMENTS]


def encode_command(cmd: Command) -> bytes:
    """Encode a command set, group length first (implicit VR little endian)."""
    field = cmd.command_field
    if field & 0x8000:  # a response: from the parts kept for its shape
        got = _encode_response(cmd)
        if got is not None:
            return got
    elif field == 0x0001:  # C-STORE-RQ: from the parts kept for its shape
        got = _encode_store_rq(cmd)
        if got is not None:
            return got
    body = _encode_elements(zip(_ENCODING, _ALL_VALUES(cmd)))
    return _GROUP_LENGTH.pack(0, 0, 4, len(body)) + body


def _encode_elements(fields: Iterable[tuple[tuple[int, bool, str], Any]]) -> bytearray:
    """The elements of the (element number, is US, VR), value pairs given a value."""
    body = bytearray()
    for (elem, us, vr), value in fields:
        if value is None:
            continue
        if us:
            body += _US_ELEM.pack(0, elem, 2, value)
        else:
            raw = _encode_value(vr, value)
            body += _ELEM_HDR.pack(0, elem, len(raw))
            body += raw
    return body


# C-STORE-RQ (PS3.7 9.3.1.1): of a batch's requests only the Message ID (0000,0110) and the
# Affected SOP Instance UID (0000,1000) change from one to the next. The elements before,
# between and after them are encoded once per (SOP class, priority, data set type, move
# originator) and kept; a request with any other field set takes the general encoder.
_STORE_RQ_FIXED = ("affected_sop_class_uid", "priority", "data_set_type", "move_originator_ae", "move_originator_message_id")
_STORE_RQ_KEY = operator.attrgetter(*_STORE_RQ_FIXED)
_STORE_RQ_OTHERS = operator.attrgetter(
    *(n for _, _, n in _ELEMENTS if n not in {*_STORE_RQ_FIXED, "command_field", "message_id", "affected_sop_instance_uid"})
)
_STORE_RQ_ABSENT = (None,) * len(_STORE_RQ_OTHERS(Command(0)))
_STORE_RQ_PARTS: dict[tuple[Any, ...], tuple[bytes, bytes, bytes, int]] = {}
_STORE_RQ_SHAPES = 256  # shapes kept at most (a batch has one per SOP class)


def _encode_store_rq(cmd: Command) -> bytes | None:
    """:func:`encode_command` of a C-STORE-RQ from the parts kept for its shape; ``None``
    when it is not of that shape (no Message ID or SOP Instance UID, another field set)."""
    if cmd.message_id is None or cmd.affected_sop_instance_uid is None or _STORE_RQ_OTHERS(cmd) != _STORE_RQ_ABSENT:
        return None
    key = _STORE_RQ_KEY(cmd)
    parts = _STORE_RQ_PARTS.get(key)
    if parts is None:
        if len(_STORE_RQ_PARTS) >= _STORE_RQ_SHAPES:
            _STORE_RQ_PARTS.clear()
        fields = list(zip(_ENCODING, _ALL_VALUES(Command(0x0001, **dict(zip(_STORE_RQ_FIXED, key))))))
        head = bytes(_encode_elements(f for f in fields if f[0][0] < 0x0110))
        middle = bytes(_encode_elements(f for f in fields if 0x0110 < f[0][0] < 0x1000))
        tail = bytes(_encode_elements(f for f in fields if f[0][0] > 0x1000))
        parts = _STORE_RQ_PARTS[key] = (head, middle, tail, len(head) + 10 + len(middle) + 8 + len(tail))
    head, middle, tail, fixed = parts
    raw = _encode_value("UI", cmd.affected_sop_instance_uid)
    return b"".join(
        (
            _GROUP_LENGTH.pack(0, 0, 4, fixed + len(raw)),
            head,
            _US_ELEM.pack(0, 0x0110, 2, cmd.message_id),
            middle,
            _ELEM_HDR.pack(0, 0x1000, len(raw)),
            raw,
            tail,
        )
    )


# A response (PS3.7 9.3, 10.3) as a C-STORE, C-ECHO or N-service SCP usually sends it:
# Command Field, Message ID Being Responded To, Affected SOP Class UID, Command Data Set
# Type, Status, and perhaps an Error Comment and the Affected SOP Instance UID. The
# elements up to (0000,0120) and the Data Set Type's are encoded once per (command field,
# SOP class, data set type) and kept; a response with any other field set (C-FIND /
# C-MOVE counts, an Offending Element ...) takes the general encoder.
_RSP_VARYING = ("message_id_being_responded_to", "status", "error_comment", "affected_sop_instance_uid")
_RSP_FIELDS = operator.attrgetter("affected_sop_class_uid", "data_set_type", *_RSP_VARYING)
_RSP_OTHERS = operator.attrgetter(
    *(n for _, _, n in _ELEMENTS if n not in {*_RSP_VARYING, "command_field", "affected_sop_class_uid", "data_set_type"})
)
_RSP_ABSENT = (None,) * len(_RSP_OTHERS(Command(0)))
_RSP_PARTS: dict[tuple[int, str | None, int], tuple[bytes, bytes]] = {}
_RSP_SHAPES = 256  # shapes kept at most (one per SOP class and response kind in use)


def _encode_response(cmd: Command) -> bytes | None:
    """:func:`encode_command` of a response from the parts kept for its shape; ``None``
    when it is not of that shape (no Message ID Being Responded To or Status, another
    field set)."""
    sop_class, data_set_type, mid, status, comment, instance = _RSP_FIELDS(cmd)
    if mid is None or status is None or _RSP_OTHERS(cmd) != _RSP_ABSENT:
        return None
    return encode_response_fields(cmd.command_field, sop_class, data_set_type, mid, status, comment, instance)


def encode_response_fields(
    command_field: int,
    sop_class: str | None,
    data_set_type: int,
    mid: int,
    status: int,
    comment: str | None = None,
    instance: str | None = None,
) -> bytes:
    """:func:`encode_command` of the response whose fields are these, all others absent
    (``None``), from the parts kept for its shape: for a sender that knows its response
    is of that shape (a C-STORE-RSP it made), without the check of the other fields."""
    key = (command_field, sop_class, data_set_type)
    parts = _RSP_PARTS.get(key)
    if parts is None:
        if len(_RSP_PARTS) >= _RSP_SHAPES:
            _RSP_PARTS.clear()
        fields = list(zip(_ENCODING, _ALL_VALUES(Command(key[0], affected_sop_class_uid=sop_class, data_set_type=data_set_type))))
        head = bytes(_encode_elements(f for f in fields if f[0][0] < 0x0120))
        dst = bytes(_encode_elements(f for f in fields if f[0][0] == 0x0800))
        parts = _RSP_PARTS[key] = (head, dst)
    head, dst = parts
    body = [head, _US_ELEM.pack(0, 0x0120, 2, mid), dst, _SUCCESS_ELEM if status == 0 else _US_ELEM.pack(0, 0x0900, 2, status)]
    size = len(head) + 20 + len(dst)
    if comment is not None:
        raw = _encode_value("LO", comment)
        body += (_ELEM_HDR.pack(0, 0x0902, len(raw)), raw)
        size += 8 + len(raw)
    if instance is not None:
        raw = instance.encode("ascii", "replace") if type(instance) is str else _encode_value("UI", instance)
        if len(raw) % 2:
            raw += b"\x00"
        body += (_ELEM_HDR.pack(0, 0x1000, len(raw)), raw)
        size += 8 + len(raw)
    return _GROUP_LENGTH.pack(0, 0, 4, size) + b"".join(body)


_SUCCESS_ELEM = _US_ELEM.pack(0, 0x0900, 2, 0)  # Status (0000,0900) Success

# SOP Class UID -> (the elements before the Message ID Being Responded To, those after it
# up to the SOP Instance UID, the group's length less that UID's value): see below.
_STORE_SUCCESS_PARTS: dict[str | None, tuple[bytes, bytes, int]] = {}


def encode_store_success(sop_class: str | None, mid: int, instance: str) -> bytes:
    """``encode_response_fields(0x8001, sop_class, NO_DATASET, mid, 0, None, instance)``:
    the C-STORE-RSP Success (PS3.7 §9.3.1.2), a receiver's usual response, from the
    parts kept per SOP Class (no key, list or size sum made per response)."""
    parts = _STORE_SUCCESS_PARTS.get(sop_class)
    if parts is None:
        encode_response_fields(0x8001, sop_class, NO_DATASET, 0, 0)  # (its parts kept)
        head, dst = _RSP_PARTS[(0x8001, sop_class, NO_DATASET)]
        if len(_STORE_SUCCESS_PARTS) >= _RSP_SHAPES:
            _STORE_SUCCESS_PARTS.clear()
        parts = _STORE_SUCCESS_PARTS[sop_class] = (head, dst + _SUCCESS_ELEM, len(head) + 10 + len(dst) + 10 + 8)
    head, tail, size = parts
    raw = instance.encode("ascii", "replace") if type(instance) is str else _encode_value("UI", instance)
    n = len(raw)
    if n % 2:
        raw += b"\x00"
        n += 1
    return b"".join((_GROUP_LENGTH.pack(0, 0, 4, size + n), head, _US_ELEM.pack(0, 0x0120, 2, mid), tail, _ELEM_HDR.pack(0, 0x1000, n), raw))


_US_KIND, _AT_KIND, _STR_KIND = 0, 1, 2
# element number -> (kind, attribute), for decoding
_DECODING = {elem: (_US_KIND if vr == "US" else _AT_KIND if vr == "AT" else _STR_KIND, name) for elem, vr, name in _ELEMENTS}


# C-ECHO-RQ command sets decoded before, by their bytes: a client that checks a server with
# a C-ECHO per association sends the same bytes every time (message id 1, its SOP class).
_ECHO_RQ_SEEN: dict[bytes, dict[str, Any]] = {}
_ECHO_RQ_KEPT = 64


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Decode a command set. Unknown group-0000 elements are skipped."""
    raw = data if type(data) is bytes else bytes(data)
    if len(raw) > 40 and raw.startswith(_GROUP_LENGTH_HEADER):  # a C-STORE-RQ of a shape seen before?
        at = 38 + (raw[16] | raw[17] << 8)
        shape = _STORE_RQ_SEEN.get(raw[12:at])
        if shape is not None:
            cmd = _store_rq_of_shape(raw, at, shape)
            if cmd is not None:
                return cmd
    seen = _ECHO_RQ_SEEN.get(raw)  # a C-ECHO-RQ seen before?
    if seen is not None:
        return Command(**seen)  # a command of its own: the values are plain ints and strings
    return _decode_elements(raw)


# C-STORE-RQs received (PS3.7 9.3.1.1): a sender's requests differ from one to the next
# in the Message ID, the SOP Instance UID and the group length only. Once one is decoded
# in full, the bytes around those three are kept as its shape, keyed by its elements up
# to the Message ID's value: (0000,0000) of 4 bytes first, then the SOP Class UID,
# Command Field and the Message ID's header, in that order. A request whose bytes are
# the shape's, apart from those three values, decodes to the same fields (the elements'
# boundaries follow from those very bytes); the two values are decoded as the general
# decoder does. Any other request is decoded in full.
_GROUP_LENGTH_HEADER = _ELEM_HDR.pack(0, 0, 4)
_COMMAND_FIELDS = [f.name for f in dataclasses.fields(Command)]
_ALL_FIELDS = operator.attrgetter(*_COMMAND_FIELDS)
# elements up to the Message ID's value -> (bytes from after it to the SOP Instance UID's
# length, the bytes after that UID, the other fields in Command's order)
_STORE_RQ_SEEN: dict[bytes, tuple[bytes, bytes, tuple[Any, ...]]] = {}


def _store_rq_of_shape(raw: bytes, at: int, shape: tuple[bytes, bytes, tuple[Any, ...]]) -> Command | None:
    """The C-STORE-RQ ``raw``, whose bytes up to its Message ID's value (at ``at``) are
    those of ``shape``; ``None`` when the rest is not of that shape."""
    middle, tail, fields = shape
    if not raw.startswith(middle, at + 2):
        return None
    start = at + 6 + len(middle)  # the SOP Instance UID's value
    if start > len(raw):
        return None  # cut inside the UID's length: the general decoder says how
    stop = start + _UL_AT(raw, start - 4)[0]
    if stop + len(tail) != len(raw) or not raw.endswith(tail):
        return None
    # Command(*fields) with the two values replaced, made without its __init__ (a frame
    # of 24 locals): every field set here, in Command's order (_COMMAND_FIELDS).
    cmd = _new(Command)
    (
        cmd.command_field, cmd.message_id, cmd.message_id_being_responded_to, cmd.affected_sop_class_uid,
        cmd.requested_sop_class_uid, cmd.affected_sop_instance_uid, cmd.requested_sop_instance_uid,
        cmd.data_set_type, cmd.status, cmd.priority, cmd.move_destination, cmd.offending_element,
        cmd.error_comment, cmd.error_id, cmd.event_type_id, cmd.attribute_identifier_list, cmd.action_type_id,
        cmd.remaining, cmd.completed, cmd.failed, cmd.warning, cmd.move_originator_ae,
        cmd.move_originator_message_id,
    ) = fields  # fmt: skip
    cmd.message_id = raw[at] | raw[at + 1] << 8
    cmd.affected_sop_instance_uid = raw[start:stop].decode("ascii", "replace").rstrip("\x00 ").lstrip(" ")
    return cmd


_new = object.__new__
_UL_AT = struct.Struct("<I").unpack_from


def _decode_elements(raw: bytes) -> Command:
    """:func:`decode_command`, element by element (a C-STORE-RQ's shape is kept)."""
    pos, end = 0, len(raw)
    values: dict[str, object] = {}
    unpack_header, decoding = _ELEM_HDR.unpack_from, _DECODING
    message_id_at = instance_uid_at = instance_uid_end = -1
    repeated = False
    while pos < end:
        if end - pos < 8:
            raise DIMSEError("truncated command element")
        group, elem, length = unpack_header(raw, pos)
        pos += 8
        stop = pos + length
        if group != 0 or stop > end:
            raise DIMSEError(f"invalid command element ({group:04X},{elem:04X}) length {length}")
        spec = decoding.get(elem)
        if spec is not None:
            kind, name = spec
            repeated = repeated or name in values
            if kind == _US_KIND:
                if length != 2:
                    raise DIMSEError(f"command element (0000,{elem:04X}) has bad length {length}")
                values[name] = raw[pos] | raw[pos + 1] << 8
                if elem == 0x0110:
                    message_id_at = pos
            elif kind == _STR_KIND:
                values[name] = raw[pos:stop].decode("ascii", "replace").rstrip("\x00 ").lstrip(" ")
                if elem == 0x1000:
                    instance_uid_at, instance_uid_end = pos, stop
            else:
                if length % 4:
                    raise DIMSEError(f"command element (0000,{elem:04X}) has bad length {length}")
                values[name] = [(g << 16) | e for g, e in struct.iter_unpack("<HH", raw[pos:stop])]
                repeated = True  # (a list: never shared by the commands of one shape)
        pos = stop
    if "command_field" not in values:
        raise DIMSEError("command set has no Command Field (0000,0100)")
    if "data_set_type" not in values:
        raise DIMSEError("command set has no Command Data Set Type (0000,0800)")
    cmd = Command(**values)  # type: ignore[arg-type]
    if cmd.command_field == 0x0030 and cmd.data_set_type == NO_DATASET:
        if len(_ECHO_RQ_SEEN) >= _ECHO_RQ_KEPT:
            _ECHO_RQ_SEEN.clear()
        _ECHO_RQ_SEEN[raw] = dict(values)
    if (
        cmd.command_field == 0x0001
        and not repeated
        and instance_uid_at > message_id_at == 38 + (raw[16] | raw[17] << 8)
        and raw.startswith(_GROUP_LENGTH_HEADER)
    ):
        if len(_STORE_RQ_SEEN) >= _STORE_RQ_SHAPES:
            _STORE_RQ_SEEN.clear()
        _STORE_RQ_SEEN[raw[12:message_id_at]] = (
            raw[message_id_at + 2 : instance_uid_at - 4],
            raw[instance_uid_end:],
            _ALL_FIELDS(cmd),
        )
    return cmd


# ---------------------------------------------------------------------------
# Fragmentation and reassembly (PS3.8 Annex E)
# ---------------------------------------------------------------------------


def fragment(context_id: int, data: bytes | memoryview, is_command: bool, max_pdu: int) -> Iterator[bytes]:
    """Cut one command or data set into P-DATA-TF PDUs of one PDV each.

    ``max_pdu`` is the peer's maximum length (0 = unlimited; a large finite value
    is then used). The last fragment has the "last" bit set.
    """
    for header, chunk in fragment_parts(context_id, data, is_command, max_pdu):
        yield header + chunk


def encode_pdata(context_id: int, data: bytes, is_command: bool, max_pdu: int) -> bytes:
    """:func:`fragment` joined: every P-DATA-TF PDU of one command or data set, as one
    ``bytes`` (a single PDU, the usual case for a command set, costs one concatenation)."""
    n = len(data)
    if 0 < n <= (max_pdu or (1 << 22)) - 6:
        return encode_pdata_header(n, context_id, 3 if is_command else 2) + data
    return b"".join(fragment(context_id, data, is_command, max_pdu))


def fragment_parts(
    context_id: int, data: bytes | memoryview, is_command: bool, max_pdu: int
) -> Iterator[tuple[bytes, memoryview]]:
    """:func:`fragment` as (PDU and PDV header, value slice) pairs: the value is not
    copied, so a sender joins each write's PDUs in one copy."""
    max_data = (max_pdu or (1 << 22)) - 6
    if max_data < 1:
        raise ValueError(f"peer maximum PDU length {max_pdu} is too small")
    mv = memoryview(data)
    total = len(mv)
    base = 1 if is_command else 0
    pos = 0
    while True:
        chunk = mv[pos : pos + max_data]
        pos += len(chunk)
        control = base | (2 if pos >= total else 0)
        yield encode_pdata_header(len(chunk), context_id, control), chunk
        if pos >= total:
            return


def fragment_stream(context_id: int, payload: DatasetSource, max_pdu: int) -> Iterator[bytes]:
    """Like :func:`fragment` for a data set read in pieces (a file being streamed)."""
    for header, chunk in fragment_stream_parts(context_id, payload, max_pdu):
        yield header + chunk


def fragment_stream_parts(
    context_id: int, payload: DatasetSource, max_pdu: int
) -> Iterator[tuple[bytes, bytes | memoryview]]:
    """:func:`fragment_stream` as (header, value) pairs, like :func:`fragment_parts`."""
    max_data = (max_pdu or (1 << 22)) - 6
    if max_data < 1:
        raise ValueError(f"peer maximum PDU length {max_pdu} is too small")
    remaining = payload.length
    while True:
        n = min(max_data, remaining)
        remaining -= n
        # No local keeps the value while suspended: a slice of a piece read ahead would
        # keep the whole piece in memory while the sender waits for its peer.
        yield encode_pdata_header(n, context_id, 2 if remaining == 0 else 0), _exactly(payload.read(n), n, remaining)
        if remaining == 0:
            return


def _exactly(chunk: bytes | memoryview, n: int, remaining: int) -> bytes | memoryview:
    if len(chunk) != n:
        raise DIMSEError(f"data set source ended {remaining + n - len(chunk)} bytes early")
    return chunk


class DatasetSource(Protocol):
    """A data set to send, read in pieces: its total ``length`` and ``read(n)``."""

    length: int

    def read(self, n: int) -> bytes | memoryview: ...


class DatasetSink(Protocol):
    """Where the fragments of a received data set go (e.g. a C-STORE spool)."""

    def write(self, data: bytes | memoryview) -> object: ...

    def discard(self) -> None: ...


@dataclass(slots=True)
class Message:
    """A complete DIMSE message: its context, command set and data set (if collected)."""

    context_id: int
    command: Command
    dataset: bytes | None = None
    #: Where the data set went instead, when it was streamed (e.g. a C-STORE spool).
    sink: DatasetSink | None = None


# The events of the receive path are read-only by type (``Final``: mypy refuses an
# assignment) but not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__, about three times the cost of a plain slot store, and several such
# events are made per received instance. ``unsafe_hash``: hashable by value, as frozen.
@dataclass(slots=True, unsafe_hash=True)
class CommandReceived:
    """A command set is complete; if ``command.has_dataset`` its fragments follow."""

    context_id: Final[int]
    command: Final[Command]


@dataclass(slots=True, unsafe_hash=True)
class DataFragment:
    """One data set fragment, as received (a view into the PDU, not a copy)."""

    context_id: Final[int]
    data: Final[bytes | memoryview]
    last: Final[bool]


AssemblerEvent = CommandReceived | DataFragment


def affected_mismatch(request: Command, response: Command) -> str | None:
    """Why ``response`` does not answer for what ``request`` named, or ``None``: its
    Affected SOP Class / Instance UID, when present, must be the request's (Requested, or
    Affected for C-STORE, N-EVENT-REPORT and N-CREATE; PS3.7 §9.3.1.2, §10.1, §10.3
    "U(=)"). A request without an instance UID (N-CREATE) leaves it to the peer."""
    for what, sent, answered in (
        ("Instance", request.requested_sop_instance_uid or request.affected_sop_instance_uid,
         response.affected_sop_instance_uid),
        ("Class", request.requested_sop_class_uid or request.affected_sop_class_uid,
         response.affected_sop_class_uid),
    ):  # fmt: skip
        if sent and answered and answered != sent:
            status = "none" if response.status is None else f"0x{response.status:04X}"
            return f"names Affected SOP {what} UID {answered!r}, not {sent!r} (its status {status} disregarded)"
    return None


def response_to(request: Command, status: int, error_comment: str | None = None) -> Command:
    """The response command set answering ``request`` with ``status`` (PS3.7 §9.3, §10.3)."""
    # (by position: keywords to a class cost a dict per call; the fields in Command's order)
    return Command(
        request.command_field | 0x8000,
        None,  # message_id
        request.message_id,  # message_id_being_responded_to
        request.affected_sop_class_uid,
        None,  # requested_sop_class_uid
        None,  # affected_sop_instance_uid
        None,  # requested_sop_instance_uid
        NO_DATASET,  # data_set_type
        status,
        None,  # priority
        None,  # move_destination
        None,  # offending_element
        error_comment,
    )


#: The A-ABORT reason for a PDV out of turn: unexpected-PDU parameter (PS3.8 Table 9-26).
_OUT_OF_TURN = int(AbortReason.UNEXPECTED_PDU_PARAMETER)


class MessageAssembler:
    """Rebuild DIMSE messages from PDVs (PS3.7 §9.3 / PS3.8 Annex E); never calls out.

    :meth:`receive` turns one PDU's PDVs into typed events: :class:`CommandReceived`
    when a command set is complete, then a :class:`DataFragment` per data set fragment
    (``last`` on the final one). Any ordering violation raises :class:`DIMSEError`.
    """

    __slots__ = ("_cmd", "_cmd_context", "_data_context", "current", "messages", "received")

    def __init__(self) -> None:
        self._cmd = bytearray()
        self._cmd_context: int | None = None  # context of the command set being received
        self._data_context: int | None = None  # context of the data set being received
        #: Data set bytes received so far for the current message.
        self.received = 0
        #: Command sets received so far (which message is the current one).
        self.messages = 0
        #: The number of the message arriving (its command set or data set not complete:
        #: ``messages`` once its command set is), 0 between messages. An attribute, not a
        #: property: the adapter reads it after every PDU (its DIMSE deadline watch).
        self.current = 0

    @property
    def in_dataset(self) -> bool:
        return self._data_context is not None

    @property
    def incomplete(self) -> bool:
        """A message has begun and is not complete: its command set or its data set is arriving."""
        return self.current != 0

    def stream_fragment(self, pdv: PDV) -> bool:
        """A data PDV of the data set being received on its context: counted (the last
        one ends the message), ``True``: what :meth:`receive` does for it, without the event."""
        if pdv.context_id != self._data_context:
            return False
        self.received += len(pdv.data)
        if pdv.is_last:
            self._data_context = None
            self.current = 0
        return True

    def command(self, pdv: PDV) -> Command | None:
        """:meth:`receive` of ``[pdv]``, a lone PDV holding a whole command set (the
        usual command), between messages: its command, without the event. ``None``
        when a command set or data set is under way: :meth:`receive` takes it."""
        if self._data_context is not None or self._cmd_context is not None:
            return None
        data = pdv.data
        if len(data) > 1 << 20:
            raise DIMSEError("command set larger than 1 MiB")
        cmd = decode_command(data)
        self.messages += 1
        if cmd.data_set_type != NO_DATASET:
            self._data_context = pdv.context_id
            self.received = 0
            self.current = self.messages
        else:
            self.current = 0
        return cmd

    def receive(self, pdvs: list[PDV]) -> list[AssemblerEvent]:
        events: list[AssemblerEvent] = []
        for pdv in pdvs:
            if pdv.is_command:
                if self._data_context is not None:
                    raise DIMSEError(
                        f"command set received where a data set was due ({self.received} bytes of it received)",
                        _OUT_OF_TURN,
                    )
                if self._cmd_context is not None and pdv.context_id != self._cmd_context:
                    raise DIMSEError("command fragments on different presentation contexts", _OUT_OF_TURN)
                if pdv.is_last and not self._cmd:  # the usual command set: one PDV
                    if len(pdv.data) > 1 << 20:
                        raise DIMSEError("command set larger than 1 MiB")
                    cmd = decode_command(pdv.data)
                    self._cmd_context = None
                else:
                    if self._cmd_context is None:  # its first fragment: the message begins
                        self.current = self.messages + 1
                    self._cmd_context = pdv.context_id
                    self._cmd += pdv.data
                    if len(self._cmd) > 1 << 20:
                        raise DIMSEError("command set larger than 1 MiB")
                    if not pdv.is_last:
                        continue
                    cmd = decode_command(self._cmd)
                    self._cmd = bytearray()
                    self._cmd_context = None
                events.append(CommandReceived(pdv.context_id, cmd))
                self.messages += 1
                if cmd.data_set_type != NO_DATASET:  # (has_dataset, without the property call)
                    self._data_context = pdv.context_id
                    self.received = 0
                    self.current = self.messages
                else:
                    self.current = 0
            else:
                if self._data_context is None:
                    raise DIMSEError("data set fragment received without a command", _OUT_OF_TURN)
                if pdv.context_id != self._data_context:
                    raise DIMSEError(
                        f"data set fragment on context {pdv.context_id}, command was on {self._data_context}",
                        _OUT_OF_TURN,
                    )
                self.received += len(pdv.data)
                if pdv.is_last:
                    self._data_context = None
                    self.current = 0
                events.append(DataFragment(pdv.context_id, pdv.data, pdv.is_last))
        return events
