"""DICOM Part 10 file meta information, read and written without pydicom (PS3.10 §7.1).

Reading gives the SOP class/instance, the transfer syntax and the byte offset where
the data set starts, so a sender can stream the data set straight from disk;
writing produces the preamble and group 0002 that a receiver puts before the bytes
it received.
"""

from __future__ import annotations

import re
import struct
from typing import BinaryIO

from .lazy_dataclass import dataclass
from .uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["FileMeta", "encode_file_meta", "file_meta_from_bytes", "plausible_uid", "read_file_meta", "valid_uid"]

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_MAX_META = 1 << 16


@dataclass(slots=True)
class FileMeta:
    """A Part 10 file's meta information (PS3.10 §7.1) and where its data set starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int


_UID = re.compile(r"(?:0|[1-9][0-9]*+)(?:\.(?:0|[1-9][0-9]*+))*+")  # possessive: nothing to give back


def valid_uid(uid: str) -> bool:
    """PS3.5 §9.1: 1-64 chars of digits and dots, no empty component, no leading zero."""
    if not 0 < len(uid) <= 64:
        return False
    head, dot, last = uid.rpartition(".")
    if head in _VALID_HEADS:  # all but the last component seen valid before: judge the last alone
        return last.isdigit() and last.isascii() and (last[0] != "0" or len(last) == 1)
    root, _, middle = head.rpartition(".")
    if root in _VALID_HEADS:  # all but the last two seen valid before: judge those two alone
        return (
            middle.isdigit()
            and middle.isascii()
            and (middle[0] != "0" or len(middle) == 1)
            and last.isdigit()
            and last.isascii()
            and (last[0] != "0" or len(last) == 1)
        )
    if _UID.fullmatch(uid) is None:
        return False
    if dot:
        if len(_VALID_HEADS) >= _HEADS_KEPT - 1:
            _VALID_HEADS.clear()
        _VALID_HEADS.add(head)
        if root:
            _VALID_HEADS.add(root)
    return True


# The instances of a series, a study, a device have UIDs that differ in the last
# component or two (a counter, a time; a series number then an instance number): what
# comes before them, in UIDs found valid, is kept.
_VALID_HEADS: set[str] = set()
_HEADS_KEPT = 1024


_LOOSE_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def plausible_uid(uid: str) -> bool:
    """PS3.5 §9.1's character set and length (1-64 digits and dots, no empty component),
    leading zeros tolerated: some devices generate UIDs with them, and a UID that never
    names a file need not be refused for that. Letters, slashes, spaces inside, more
    than 64 characters are refused."""
    # valid_uid first: its look-up of the UID's head is cheaper than the pattern.
    return valid_uid(uid) or (0 < len(uid) <= 64 and _LOOSE_UID.fullmatch(uid) is not None)


def read_file_meta(fp: BinaryIO) -> FileMeta | None:
    """Parse preamble and group 0002 from the start of ``fp``.

    Returns ``None`` if there is no ``DICM`` prefix or the meta information lacks the
    media storage SOP class / instance or the transfer syntax. Reads a few KB (more
    only for an unusually long file meta), not the data set.
    """
    fp.seek(0)
    head = fp.read(132 + _FIRST_READ)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    got = _parse_meta(head, complete=len(head) < 132 + _FIRST_READ)
    if got is _MORE:
        head += fp.read(_MAX_META - _FIRST_READ)
        got = _parse_meta(head, complete=True)
    return None if got is _MORE else got  # type: ignore[return-value]


def file_meta_from_bytes(data: bytes) -> FileMeta | None:
    """:func:`read_file_meta` for a whole file held in memory (the same answer: a file
    meta running past the first 64 KiB is not read)."""
    head = data[: 132 + _FIRST_READ]
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    got = _parse_meta(head, complete=len(head) < 132 + _FIRST_READ)
    if got is _MORE:
        got = _parse_meta(data[: 132 + _MAX_META], complete=True)
    return None if got is _MORE else got  # type: ignore[return-value]


_FIRST_READ = 4096
_MORE = object()  # the meta runs past what was read


def _parse_meta(head: bytes, *, complete: bool) -> FileMeta | object | None:
    pos = 132
    end = len(head)
    values: dict[int, str] = {}
    while True:
        if pos + 8 > end:
            if not complete:
                return _MORE
            break
        group, elem, vr, length = _META_HEADER(head, pos)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if pos + 12 > end:
                return None if complete else _MORE
            (length,) = _META_LONG(head, pos + 8)
            start = pos + 12
        else:
            start = pos + 8
        if start + length > end:
            return None if complete else _MORE
        if elem in _META_KEPT:
            values[elem] = head[start : start + length].decode("ascii", "replace").rstrip("\x00 ")
        pos = start + length
    if len(values) < 3:
        return None
    return FileMeta(values[0x0002], values[0x0003], values[0x0010], pos)


_META_HEADER = struct.Struct("<HH2sH").unpack_from  # tag, VR, 2-byte length (explicit VR little endian)
_META_LONG = struct.Struct("<I").unpack_from
_META_KEPT = frozenset({0x0002, 0x0003, 0x0010})  # SOP class, SOP instance, transfer syntax


def _elem(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", 2, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str | None = None
) -> bytes:
    """128-byte preamble, ``DICM`` and the file meta information group (explicit VR LE).

    All but the SOP Instance UID repeat from instance to instance: the parts before
    and after it are kept per (SOP class, transfer syntax, source AE).
    """
    key = (sop_class_uid, transfer_syntax, source_ae)
    parts = _META_PARTS.get(key)
    if parts is None:
        head = _elem(0x0001, b"OB", b"\x00\x01") + _elem(0x0002, b"UI", sop_class_uid.encode("ascii"))
        tail = b"".join(
            [
                _elem(0x0010, b"UI", transfer_syntax.encode("ascii")),
                _elem(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
                _elem(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
                _elem(0x0016, b"AE", source_ae.encode("ascii", "replace")) if source_ae else b"",
            ]
        )
        if len(_META_PARTS) >= 256:
            _META_PARTS.clear()
        parts = _META_PARTS[key] = (head, tail)
    head, tail = parts
    instance = sop_instance_uid.encode("ascii")  # (_elem(0x0003, b"UI", ...) inlined: per instance)
    n = len(instance)
    if n % 2:
        instance += b"\x00"
        n += 1
    length = len(head) + 8 + n + len(tail)
    return b"".join((_PREAMBLE, _UL.pack(length), head, _INSTANCE_UID_HEADER(2, 3, b"UI", n), instance, tail))


_PREAMBLE = bytes(128) + b"DICM" + struct.pack("<HH2sH", 2, 0, b"UL", 4)  # then the group length value
_UL = struct.Struct("<I")
_INSTANCE_UID_HEADER = struct.Struct("<HH2sH").pack  # (0002,0003) UI and its 2-byte length
_META_PARTS: dict[tuple[str, str, str | None], tuple[bytes, bytes]] = {}
