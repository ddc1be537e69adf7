"""DICOM Upper Layer PDUs and items: bytes <-> objects (PS3.8 §9.3, Annex D).

Pure code: no sockets, no clocks. :class:`PDUReader` frames a byte stream into
PDUs incrementally and refuses oversized PDUs from the header alone, before any
of the claimed body is buffered.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import field
from enum import IntEnum

from .lazy_dataclass import dataclass
from .pdu_items import (
    U16,
    AbortReason,
    AsyncOpsWindow,
    PDUError,
    RoleSelection,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
    decode_user_info,
    encode_user_info,
    item,
    items,
    text,
)

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
    "MAX_RQ_CONTEXTS",
    "MAX_RQ_DISTINCT_TRANSFER_SYNTAXES",
    "MAX_RQ_TRANSFER_SYNTAXES",
    "MAX_TRANSFER_SYNTAXES",
    "BufferPool",
    "PDU",
    "PDUError",
    "PDUReader",
    "RQ_DECODED_BY_CALLER_UP_TO",
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
_LEN = struct.Struct(">I")
_PDV = struct.Struct(">IBB")  # item length, context id, message control header
_PDATA_HDR = struct.Struct(">BBIIBB")  # PDU header + one PDV header

#: Largest non-P-DATA PDU we accept; an A-ASSOCIATE-RQ with many contexts and a
#: Kerberos/SAML identity fits comfortably.
MAX_CONTROL_PDU = 1 << 20

#: An A-ASSOCIATE-RQ proposing more presentation contexts than this, more transfer
#: syntaxes than :data:`MAX_TRANSFER_SYNTAXES` in one of them, more than
#: :data:`MAX_RQ_TRANSFER_SYNTAXES` in all or more than
#: :data:`MAX_RQ_DISTINCT_TRANSFER_SYNTAXES` different ones is not read further
#: (``AssociateRQ.over_limit``) and is rejected (rejected-permanent, service-user,
#: no-reason-given, PS3.8 9.3.4). Context IDs are the odd numbers 1-255 (PS3.8
#: 9.3.2.2), so 128 distinct contexts; PS3.6 Table A-1 lists some 60 transfer
#: syntaxes. DCMTK's storescu proposes 128 contexts of at most 4 syntaxes (11 KB),
#: its echoscu at most 128 contexts of 38; pynetdicom at most 128 contexts. Decoding
#: a request within the limits takes a few milliseconds of the event loop at most
#: (the attack this answers, 128 contexts of 100 different 64-character syntaxes,
#: 0.9 MB, took 25 ms; now refused after its first context).
MAX_RQ_CONTEXTS = 256
MAX_TRANSFER_SYNTAXES = 64
MAX_RQ_TRANSFER_SYNTAXES = 128 * MAX_TRANSFER_SYNTAXES
MAX_RQ_DISTINCT_TRANSFER_SYNTAXES = 256


class PDUType(IntEnum):
    """PDU types (PS3.8 Table 9-11 … 9-26)."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


# Read per PDU, as plain ints: reading a member from its enum class goes through
# EnumType.__getattr__'s slow attribute path on Python 3.11 (~0.2 us each).
_P_DATA_TF = int(PDUType.P_DATA_TF)
_ASSOCIATE_RQ = int(PDUType.ASSOCIATE_RQ)
# Read per PDU: not from the enum class each time (EnumType's slow attribute path on 3.11).
_ASSOCIATE_AC, _ASSOCIATE_RJ = int(PDUType.ASSOCIATE_AC), int(PDUType.ASSOCIATE_RJ)
_RELEASE_RQ, _RELEASE_RP, _ABORT = int(PDUType.RELEASE_RQ), int(PDUType.RELEASE_RP), int(PDUType.ABORT)


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
    ``transfer_syntax``: the item's one sub-item (PS3.8 Table 9-18; not significant
    unless accepted); ``""`` only for a peer's item without it (read leniently), which
    is encoded without it again: the acceptor's negotiation always names one.
    """

    id: int
    result: int
    transfer_syntax: str = ""


# ---------------------------------------------------------------------------
# PDUs
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class AssociateRQ:
    """A-ASSOCIATE-RQ PDU (PS3.8 §9.3.2).

    ``raw``: the PDU body this request was decoded from, when it was (``None`` for one
    built here); equal bytes mean an equal request (see :class:`~dimse_async.acse.NegotiationCache`).
    ``over_limit``: why a received request was not read to its end (past
    :data:`MAX_RQ_CONTEXTS` and the like; it is then rejected), else empty.
    """

    called_ae: str
    calling_ae: str
    presentation_contexts: list[PresentationContextRQ]
    user_info: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1
    raw: bytes | None = field(default=None, compare=False, repr=False)
    over_limit: str = field(default="", compare=False)

    def encode(self) -> bytes:
        body = bytearray()
        body += U16.pack(self.protocol_version) + b"\x00\x00"
        body += _ae(self.called_ae) + _ae(self.calling_ae) + bytes(32)
        body += item(0x10, self.application_context.encode("ascii"))
        for pc in self.presentation_contexts:
            sub = item(0x30, pc.abstract_syntax.encode("ascii"))
            for ts in pc.transfer_syntaxes:
                sub += item(0x40, ts.encode("ascii"))
            body += item(0x20, bytes((pc.id, 0, 0, 0)) + sub)
        body += encode_user_info(self.user_info)
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
        body += U16.pack(self.protocol_version) + b"\x00\x00"
        body += _ae(self.called_ae) + _ae(self.calling_ae) + bytes(32)
        body += item(0x10, self.application_context.encode("ascii"))
        for pc in self.presentation_contexts:
            sub = item(0x40, pc.transfer_syntax.encode("ascii")) if pc.transfer_syntax else b""
            body += item(0x21, bytes((pc.id, 0, pc.result, 0)) + sub)
        body += encode_user_info(self.user_info)
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
    2 service-provider (ACSE), 3 service-provider (presentation). ``why``: for the
    acceptor's log, not sent (what made us reject, e.g. the offending value).
    """

    result: int
    source: int
    reason: int
    why: str = field(default="", compare=False, repr=False)

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
    return _PDATA_HDR.pack(_P_DATA_TF, 0, data_length + 6, data_length + 2, context_id, control)


# ---------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------


def _pdu(pdu_type: int, body: bytes | bytearray) -> bytes:
    return _HDR.pack(pdu_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    raw = title.encode("ascii")
    if len(raw) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    return raw.ljust(16, b" ")


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _ae_field(raw: memoryview) -> str:
    """An AE title field as received, less its non-significant spaces (PS3.8 Table 9-11).

    Never raises: in an A-ASSOCIATE-RQ a title the AE VR does not allow is the
    acceptor's to refuse with an A-ASSOCIATE-RJ (see :func:`dimse_async.acse.negotiate`),
    and in an A-ASSOCIATE-AC the fields are not to be tested (PS3.8 Table 9-17). Each
    byte becomes one character (ISO 8859-1), so a bad byte stays visible in logs.
    """
    return bytes(raw).decode("latin-1").strip(" ")


def _rq_context(v: memoryview, names: dict[bytes, str]) -> PresentationContextRQ:
    """A presentation context item of an A-ASSOCIATE-RQ (PS3.8 Table 9-13): its
    sub-items read from one copy of its bytes, each transfer syntax decoded once per
    PDU (``names``)."""
    raw = bytes(v)
    end = len(raw)
    if end < 4:
        raise PDUError("truncated presentation context item")
    abstract = None
    syntaxes: list[str] = []
    pos = 4
    while pos < end:
        if end - pos < 4:
            raise PDUError("truncated item header in presentation context")
        st, n = raw[pos], (raw[pos + 2] << 8) | raw[pos + 3]
        pos += 4
        if pos + n > end:
            raise PDUError(f"item {st:#04x} in presentation context claims {n} bytes, only {end - pos} remain")
        value = raw[pos : pos + n]
        pos += n
        if st == 0x40:
            name = names.get(value)
            if name is None:
                name = names[value] = text(value, "transfer syntax")
                if len(names) > MAX_RQ_DISTINCT_TRANSFER_SYNTAXES:  # refused: not read further
                    return PresentationContextRQ(raw[0], abstract or "", syntaxes)
            syntaxes.append(name)
            if len(syntaxes) > MAX_TRANSFER_SYNTAXES:  # refused: not read further
                return PresentationContextRQ(raw[0], abstract or "", syntaxes)
        elif st == 0x30:
            if abstract is not None:
                raise PDUError("presentation context has two abstract syntaxes")
            abstract = text(value, "abstract syntax")
        else:
            raise PDUError(f"unknown sub-item {st:#04x} in presentation context", AbortReason.UNRECOGNIZED_PDU_PARAMETER)
    if abstract is None or not syntaxes:
        raise PDUError("presentation context lacks an abstract or transfer syntax")
    return PresentationContextRQ(raw[0], abstract, syntaxes)


def _decode_associate(pdu_type: int, body: memoryview) -> AssociateRQ | AssociateAC:
    if len(body) < 68:
        raise PDUError("A-ASSOCIATE PDU shorter than its fixed fields")
    (version,) = U16.unpack_from(body, 0)
    called, calling = _ae_field(body[4:20]), _ae_field(body[20:36])
    app_context = None
    user_info = None
    rq_contexts: list[PresentationContextRQ] = []
    ac_contexts: list[PresentationContextAC] = []
    names: dict[bytes, str] = {}  # the syntaxes decoded so far: most contexts repeat them
    syntaxes_seen = 0
    over_limit = ""
    for t, v in items(body[68:], "A-ASSOCIATE PDU"):
        if t == 0x10:
            app_context = text(v, "application context name")
        elif t == 0x20 and pdu_type == _ASSOCIATE_RQ:
            if len(rq_contexts) >= MAX_RQ_CONTEXTS:
                over_limit = f"more than {MAX_RQ_CONTEXTS} presentation contexts"
                break
            pc = _rq_context(v, names)
            syntaxes_seen += len(pc.transfer_syntaxes)
            if len(pc.transfer_syntaxes) > MAX_TRANSFER_SYNTAXES:
                over_limit = f"more than {MAX_TRANSFER_SYNTAXES} transfer syntaxes in presentation context {pc.id}"
                break
            if syntaxes_seen > MAX_RQ_TRANSFER_SYNTAXES:
                over_limit = f"more than {MAX_RQ_TRANSFER_SYNTAXES} transfer syntaxes in all"
                break
            if len(names) > MAX_RQ_DISTINCT_TRANSFER_SYNTAXES:
                over_limit = f"more than {MAX_RQ_DISTINCT_TRANSFER_SYNTAXES} distinct transfer syntaxes"
                break
            rq_contexts.append(pc)
        elif t == 0x21 and pdu_type == _ASSOCIATE_AC:
            if len(v) < 4:
                raise PDUError("truncated presentation context item")
            ts = ""
            for st, sv in items(v[4:], "presentation context"):
                if st == 0x40:
                    ts = text(sv, "transfer syntax")
            ac_contexts.append(PresentationContextAC(v[0], v[2], ts))
        elif t == 0x50:
            user_info = decode_user_info(v)
        else:
            raise PDUError(f"unexpected item {t:#04x} in A-ASSOCIATE PDU", AbortReason.UNEXPECTED_PDU_PARAMETER)
    if app_context is None:
        raise PDUError("A-ASSOCIATE PDU has no application context item")
    if over_limit:  # the rest is not read: the request is refused (see MAX_RQ_CONTEXTS)
        return AssociateRQ(called, calling, rq_contexts, user_info or UserInformation(), app_context, version,
                           over_limit=over_limit)  # fmt: skip
    if user_info is None:
        raise PDUError("A-ASSOCIATE PDU has no user information item")
    if pdu_type == _ASSOCIATE_RQ:
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
        pdvs.append(PDV(ctx, control & 1 != 0, control & 2 != 0, body[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    if not pdvs:
        raise PDUError("P-DATA-TF PDU holds no PDV")
    return PDataTF(pdvs)


_new = object.__new__


def _unrecognized(head: bytes) -> str:
    """Why the first 6 bytes are no PDU (PS3.8 9.3.1), naming the protocols a
    misconfigured peer or load balancer most often sends instead."""
    why = f"unrecognized PDU type {head[0]:#04x}"
    if head.startswith(b"PROXY ") or head.startswith(b"\r\n\r\n\x00\r"):
        return why + " (a PROXY protocol header: this port does not expect one)"
    if head[0] == 0x16 and head[1] == 0x03:
        return why + " (a TLS handshake: this port does not use TLS)"
    if head[:4] in (b"GET ", b"POST", b"HEAD", b"PUT "):
        return why + " (an HTTP request)"
    return why


def decode_pdu(pdu_type: int, body: bytes | memoryview) -> PDU:
    """Decode one PDU body (without its 6-byte header). Raises :class:`PDUError`."""
    mv = memoryview(body)
    if pdu_type == _P_DATA_TF:
        return _decode_pdata(mv)
    if pdu_type in (_ASSOCIATE_RQ, _ASSOCIATE_AC):
        return _decode_associate(pdu_type, mv)
    if pdu_type in (_RELEASE_RQ, _RELEASE_RP, _ASSOCIATE_RJ, _ABORT):
        if len(mv) != 4:
            raise PDUError(f"PDU type {pdu_type:#04x} must have length 4, not {len(mv)}")
        if pdu_type == _ASSOCIATE_RJ:
            return AssociateRJ(mv[1], mv[2], mv[3])
        if pdu_type == _ABORT:
            return Abort(mv[2], mv[3])
        return ReleaseRQ() if pdu_type == _RELEASE_RQ else ReleaseRP()
    raise PDUError(f"unrecognized PDU type {pdu_type:#04x}", AbortReason.UNRECOGNIZED_PDU)


#: A-ASSOCIATE-RQs up to this long go to a :class:`PDUReader`'s ``decode_rq`` (see there).
#: DCMTK's storescu proposes 128 presentation contexts by default (a 9.6 KB request);
#: a request of up to 256 contexts with a few transfer syntaxes each fits.
RQ_DECODED_BY_CALLER_UP_TO = 64 << 10


_FRESH = 64 << 10  # a new receive buffer at a PDU boundary: one small PDU or the start of a big one
_WHOLE = 1 << 20  # a PDU up to this long gets a buffer of its full length at once (larger ones grow)
_MAX_BUFFER = 4 << 20  # a fresh buffer holds a few PDUs of the last size seen, up to this much
# How many PDUs of the last size seen a fresh buffer holds: a peer sending faster than we
# read (storescu's 128 KiB PDUs of a large instance) is taken in reads of up to 1 MiB
# instead of 256 KiB (fewer reads, pool takes and Python steps per instance), and a PDU
# cut by a buffer's end is copied once per 8 PDUs instead of once per 2.
_AHEAD = 8


class BufferPool:
    """Receive buffers let go by :class:`PDUReader` objects, kept for reuse.

    A buffer a reader has finished with may still be referenced: the P-DATA fragments
    handed out are memoryviews into it, held until their bytes are written. A
    ``bytearray`` with live views cannot be resized (CPython refuses with
    ``BufferError``), which is the test used here: only a buffer nobody views any more
    is handed out again, so reused memory never overwrites a fragment still in use.
    Reuse saves allocating and zeroing a new buffer per few PDUs (for a streamed
    instance, one per 256 KiB).

    Bounded: at most ``max_bytes`` in all, no single buffer over ``max_buffer``; the
    oldest buffers are dropped first. A take looks at no more than a few of the oldest
    (views are released roughly in the order they were made). Shared by every reader
    of the process (``RECEIVE_BUFFERS``), so an idle association holds none; safe to
    use from several threads.
    """

    __slots__ = ("_free", "_bytes", "_lock", "max_bytes", "max_buffer", "reused", "allocated")

    _TRIES = 4

    def __init__(self, max_bytes: int = 16 << 20, max_buffer: int = _MAX_BUFFER):
        self._free: deque[bytearray] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.max_buffer = max_buffer
        #: Buffers handed out again / newly allocated by :meth:`take` (for tests and benchmarks).
        self.reused = 0
        self.allocated = 0

    @property
    def held(self) -> int:
        """Bytes of the buffers kept (in use by views or not)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._free)

    def put(self, buf: bytearray) -> None:
        """Keep ``buf`` (a reader has let it go; views into it may live on)."""
        n = len(buf)
        if not _FRESH <= n <= self.max_buffer:
            return
        # (The lock taken and released by its methods, not as a context manager: a
        # ``with`` costs twice as much on 3.11, and this runs twice per PDU read.)
        lock = self._lock
        lock.acquire()
        try:
            self._free.append(buf)
            self._bytes += n
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._free.popleft())
        finally:
            lock.release()

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (at most 4 times that when reused) that
        nothing references any more; a new zeroed one when none of the oldest fits."""
        lock = self._lock
        lock.acquire()  # (see put)
        try:
            free = self._free
            tries = len(free)
            if tries > self._TRIES:
                tries = self._TRIES
            most = 4 * size
            while tries:  # (no range(): a type call per take)
                tries -= 1
                buf = free.popleft()
                n = len(buf)
                if not size <= n <= most:  # (judged first: the size costs no method call)
                    free.append(buf)
                    continue
                try:  # no view of it alive? A resize would fail (shrinking by one byte: no copy)
                    last = buf.pop()
                except BufferError:
                    free.append(buf)  # still in use: look again later
                    continue
                buf.append(last)
                self._bytes -= n
                self.reused += 1
                return buf
            self.allocated += 1
        finally:
            lock.release()
        return bytearray(size)

    def clear(self) -> None:
        """Drop every buffer kept."""
        with self._lock:
            self._free.clear()
            self._bytes = 0


#: The process's pool of receive buffers (see :class:`BufferPool`).
RECEIVE_BUFFERS = BufferPool()


class PDUReader:
    """Incremental PDU framer that owns its receive buffers (cf. h11's receive buffer).

    Two ways in: :meth:`feed` with bytes in any split, or :meth:`get_buffer` /
    :meth:`buffer_updated` for the transport to receive straight into the buffer (an
    ``asyncio.BufferedProtocol``); take complete PDUs with :meth:`next_pdu`. A header
    is judged as soon as its 6 bytes are in: an unknown type or a length over the
    limit raises :class:`PDUError` at once, so a 64 MiB claim costs 6 bytes of memory.

    PDU bodies (and so P-DATA fragments) are memoryviews into the buffer, parsed in
    place, so a buffer is never written again where views were handed out: when a
    PDU does not fit in what is left, the part of it already received moves to a new
    buffer sized for the whole PDU (bounded while only its header is in). A buffer
    that was read completely is let go, so an idle association holds none. Buffers
    let go go to ``pool`` (default :data:`RECEIVE_BUFFERS`; ``None``: none), and new
    ones come from it once no view into them is left.

    ``max_pdata_length`` is the maximum length we advertised (PS3.8 D.1): the limit
    on the P-DATA-TF PDU-length field. 0 means we advertised "unlimited"; the reader
    still caps it at ``hard_limit``.

    ``decode_rq``: decodes an A-ASSOCIATE-RQ body of at most
    :data:`RQ_DECODED_BY_CALLER_UP_TO` bytes instead of :func:`decode_pdu` (a server's
    :meth:`~dimse_async.acse.NegotiationCache.decode_rq`, which remembers requests seen
    before); ``None``: every request is decoded here. Either way such a request keeps
    its bytes (``AssociateRQ.raw``).
    """

    __slots__ = ("_buf", "start", "end", "hold", "_last", "max_pdata_length", "hard_limit", "pool", "decode_rq")

    def __init__(
        self,
        max_pdata_length: int,
        hard_limit: int = 1 << 26,
        pool: BufferPool | None = RECEIVE_BUFFERS,
        decode_rq: Callable[[memoryview], AssociateRQ] | None = None,
    ):
        self.pool = pool
        self.decode_rq = decode_rq
        self._buf = bytearray()
        #: First unread byte and end of the bytes received in the buffer (read by the
        #: state machine after each read, without a call; ``end`` moved by it as
        #: :meth:`buffer_updated` moves it, the rest written here only).
        self.start = 0
        self.end = 0
        #: Set by an owner that lets the buffer go itself (:meth:`let_go`) once no
        #: message is under way: a P-DATA-TF read to the buffer's end, other than a data
        #: set's last fragment, keeps the buffer, and the bytes that follow (its
        #: message's next PDU) go to its rest, no pool round trip. ``False``: a buffer
        #: read completely is let go at once.
        self.hold = False
        self._last = 0  # length of the last PDU taken (sizes the next fresh buffer)
        self.max_pdata_length = max_pdata_length
        self.hard_limit = hard_limit

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as a PDU."""
        return self.end - self.start

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (at least one byte of room)."""
        buf, start, end = self._buf, self.start, self.end
        if not end and not buf:  # nothing held (a read at a PDU boundary): a fresh buffer
            ahead = _AHEAD * self._last  # (no min()/max(): builtins that parse arguments slowly)
            size = _FRESH if ahead < _FRESH else ahead if ahead < _MAX_BUFFER else _MAX_BUFFER
            self._buf = fresh = bytearray(size) if self.pool is None else self.pool.take(size)
            return memoryview(fresh)
        pending = end - start
        # Bytes the PDU at the read position needs in all (6 while its header is incomplete).
        need = 6 if pending < 6 else 6 + int(_LEN.unpack_from(buf, start + 2)[0])
        if pending and len(buf) - start >= need > pending:
            return memoryview(buf)[end:]  # the PDU under way fits: receive its rest in place
        if not pending and len(buf) - end >= _FRESH // 4:
            return memoryview(buf)[end:]
        if need <= _WHOLE:
            size = max(need, min(_MAX_BUFFER, _AHEAD * self._last), _FRESH)
        else:  # a huge claim gets memory as its bytes arrive, not at once
            size = min(need, 2 * pending + _FRESH)
        size = max(size, pending + 4096)  # room even when a whole PDU waits unread
        pool = self.pool
        fresh = bytearray(size) if pool is None else pool.take(size)
        if pending:  # one copy (a bytearray slice assignment from a view copies twice)
            memoryview(fresh)[:pending] = memoryview(buf)[start:end]
        if pool is not None:
            pool.put(buf)
        self._buf, self.start, self.end = fresh, 0, pending
        return memoryview(fresh)[pending:]

    def buffer_updated(self, nbytes: int) -> int:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view;
        returns the bytes now buffered (:attr:`buffered`)."""
        end = self.end = self.end + nbytes
        return end - self.start

    def let_go(self) -> None:
        """Let the buffer go if every byte received was taken (see :attr:`hold`)."""
        end = self.end
        if end and end == self.start:
            if self.pool is not None:
                self.pool.put(self._buf)
            self._buf, self.start, self.end = bytearray(), 0, 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the buffer (for callers that do not receive in place)."""
        view = memoryview(data).cast("B")
        while view:
            room = self.get_buffer(len(view))
            n = min(len(room), len(view))
            room[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def next_pdu(self) -> PDU | None:
        buf, start = self._buf, self.start
        avail = self.end - start
        if avail < 6:
            return None
        pdu_type, _, length = _HDR.unpack_from(buf, start)
        if pdu_type == _P_DATA_TF:
            limit = self.max_pdata_length or self.hard_limit
        elif 1 <= pdu_type <= 7:
            limit = MAX_CONTROL_PDU
        else:
            raise PDUError(_unrecognized(bytes(buf[start : start + 6])), AbortReason.UNRECOGNIZED_PDU)
        if length > limit:
            raise PDUError(
                f"PDU type {pdu_type:#04x} claims {length} bytes, over our limit of {limit}",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        total = 6 + length
        if avail < total:
            return None
        self._last = total
        # All read: let the buffer go with the views into it (held: not after a command
        # set or a fragment not the last, message control header bits 0 and 1, PS3.8 E.2).
        if avail == total and not (self.hold and pdu_type == _P_DATA_TF and length >= 6 and buf[start + 11] & 3 != 2):
            if self.pool is not None:
                self.pool.put(buf)
            self._buf, self.start, self.end = bytearray(), 0, 0
        else:
            self.start = start + total
        if pdu_type == _P_DATA_TF:
            if length >= 6:
                # One PDV filling the PDU (what peers send: a command, or a data set's
                # fragment): decoded here as _decode_pdata would, without its loop.
                pdv_length, context_id, control = _PDV.unpack_from(buf, start + 6)
                if pdv_length == length - 4 and pdv_length >= 2:
                    # (Made without a call of the dataclasses' __init__: a type call runs
                    # it as a frame of its own, not inlined, a third of this path.)
                    pdv = _new(PDV)
                    pdv.context_id, pdv.is_command, pdv.is_last = context_id, control & 1 != 0, control & 2 != 0
                    pdv.data = memoryview(buf)[start + 12 : start + total]
                    pdata = _new(PDataTF)
                    pdata.pdvs = [pdv]
                    return pdata
            return _decode_pdata(memoryview(buf)[start + 6 : start + total])
        body = memoryview(buf)[start + 6 : start + total]
        if pdu_type == _ASSOCIATE_RQ and length <= RQ_DECODED_BY_CALLER_UP_TO:
            if self.decode_rq is not None:
                return self.decode_rq(body)
            rq = _decode_associate(pdu_type, body)
            assert isinstance(rq, AssociateRQ)
            rq.raw = bytes(body)  # its bytes stand for it (see NegotiationCache)
            return rq
        return decode_pdu(pdu_type, body)
