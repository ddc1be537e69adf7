"""Structural check of an encoded data set: every element parsed to the end (PS3.5 §7).

Values are skipped, not decoded, so a 2 GB instance is checked with constant memory.
Sequences and items (§7.5), encapsulated pixel data (§A.4) and the deflated syntax
(§A.5) are followed; an element whose length runs past the end, a missing delimiter
or bytes left over inside a defined-length item or sequence is an error; with
``ordered``, so is an element whose tag does not increase within its data set or item
(§7.1: ascending, each at most once; readers disagree on which of two copies counts). The top-level
SOP Class and SOP Instance UIDs are returned, so a receiver can compare them with the
command's (PS3.4 B.2.3: 0xA900 when they differ).
"""

from __future__ import annotations

import array
import io
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import field
from itertools import zip_longest
from typing import Any, BinaryIO

from .inflate import deflate_end_error
from .lazy_dataclass import dataclass
from .part10 import read_file_meta

__all__ = [
    "MAX_ELEMENTS",
    "NO_LIMIT",
    "BudgetExceeded",
    "DataSetError",
    "DataSetSummary",
    "check_dataset",
    "check_dataset_bytes",
    "check_part10",
    "dataset_uids",
    "same_dataset",
    "TooManyElements",
    "TooManyItems",
]

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
#: Syntaxes whose whole data set is deflated (PS3.5 A.5). Not Deflated Image Frame
#: Compression (1.2.840.10008.1.2.8.1, A.4.13): its frames are, in encapsulated fragments.
_DEFLATED = ("1.2.840.10008.1.2.1.99",)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
     b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)  # fmt: skip
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_MAX_DEPTH = 64
_CHUNK = 1 << 16


def _vr_kinds(order: str) -> bytes:
    """The VR (two bytes read as an unsigned short in ``order``) -> 1 for a 2-byte length,
    2 for a 4-byte length after 2 reserved bytes, 3 for a sequence, 0 for no VR (PS3.5 §7.1.2)."""
    table = bytearray(1 << 16)
    for vrs, kind in ((_SHORT_VRS, 1), (_LONG_VRS, 2), ((b"SQ",), 3)):
        for vr in vrs:
            table[struct.unpack(order + "H", vr)[0]] = kind
    return bytes(table)


_VR_KIND_LE, _VR_KIND_BE = _vr_kinds("<"), _vr_kinds(">")
_UN_LE, _UN_BE = struct.unpack("<H", b"UN")[0], struct.unpack(">H", b"UN")[0]
_ITEM_GROUP = frozenset({0xFFFE})
_HDR_LE, _HDR_BE = struct.Struct("<HHHH").unpack_from, struct.Struct(">HHHH").unpack_from
_RUN_HDR_LE, _RUN_HDR_BE = struct.Struct("<H2xHH").unpack_from, struct.Struct(">H2xHH").unpack_from  # group, VR, length
_ITEM_LE, _ITEM_BE = struct.Struct("<HHI"), struct.Struct(">HHI")  # tag, 4-byte length
_EXPL_LE, _EXPL_BE = struct.Struct("<HH2sH"), struct.Struct(">HH2sH")  # tag, VR, 2-byte length


class DataSetError(ValueError):
    """The bytes are not a complete, well-formed data set."""

    @property
    def tag(self) -> int | None:
        """The element the fault was found in (``0xGGGGEEEE``), when the message names
        one (an item tag is no element): a refusal's Offending Element (0000,0901)."""
        for match in _TAG_IN_MESSAGE.finditer(str(self)):
            group, element = int(match[1], 16), int(match[2], 16)
            if group != 0xFFFE:
                return (group << 16) | element
        return None


_TAG_IN_MESSAGE = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")


#: Elements, items and fragments a data set may have, all levels together (a generous
#: bound: large multi-frame, segmentation or RT instances have a few hundred thousand).
#: Past it the walk stops with :class:`TooManyElements`: however the data set is cut
#: into tiny pieces (millions of empty items inflating from a few hundred KB of
#: deflated data, PS3.5 A.5), checking it costs a bounded time (about a second per
#: million on one core).
MAX_ELEMENTS = 4_000_000
#: ``max_elements`` for a check of one's own files before sending them: no bound.
NO_LIMIT = 1 << 62


class TooManyElements(DataSetError):
    """The data set has more elements, items and fragments than allowed (``max_elements``)."""

    def __init__(self, limit: int):
        super().__init__(f"more than {limit} elements and items")
        self.limit = limit


class TooManyItems(DataSetError):
    """The data set has more sequence items, all depths together, than allowed
    (``max_items``): pydicom takes about 50 µs of CPU per item it reads (PS3.5 §7.5),
    so a few hundred KB of tiny items would hold a thread for seconds."""

    def __init__(self, limit: int):
        super().__init__(f"more than {limit} sequence items")
        self.limit = limit


class BudgetExceeded(Exception):
    """The in-memory walk met more elements, items and fragments than its ``budget``
    (:func:`check_dataset_bytes`): nothing is wrong with the data set, it is only long to walk."""


@dataclass(slots=True)
class DataSetSummary:
    """What a structural check of a data set found: its UIDs, syntax and element count."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    elements: int
    #: The top-level elements asked for (``keep``) with a defined length and not a
    #: sequence: tag -> (VR as in the stream, ``b""`` when implicit; value bytes).
    kept: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)


class _Source:
    """Exact reads and skips over a file (seekable, bounded) or an inflated stream."""

    def __init__(self, fp: BinaryIO, start: int, deflated: bool):
        self.fp = fp
        self.pos = 0
        fp.seek(0, io.SEEK_END)
        self._size = fp.tell() - start
        fp.seek(start)
        self._inflater = zlib.decompressobj(-15) if deflated else None
        # Inflated bytes not yet walked: _buf[_off:]. Inflated _CHUNK at a time and read
        # by moving _off: each byte is copied a bounded number of times however well the
        # stream compresses (slicing the rest off at every read was quadratic).
        self._buf = bytearray()
        self._off = 0

    def _fill(self, n: int) -> bool:
        """Inflate until ``n`` bytes are buffered; False at the end of the stream."""
        inflater = self._inflater
        assert inflater is not None
        while len(self._buf) - self._off < n:
            if self._off:
                del self._buf[: self._off]
                self._off = 0
            if inflater.eof:  # what follows the zlib end (a pad byte) is no data
                return False
            raw = inflater.unconsumed_tail or self.fp.read(_CHUNK)
            if not raw:
                self._buf += inflater.flush()
                return len(self._buf) >= n
            try:
                self._buf += inflater.decompress(raw, _CHUNK)
            except zlib.error as exc:
                raise DataSetError(f"deflated data set is corrupt: {exc}") from None
        return True

    def leftover(self) -> bytes:
        """Inflated bytes buffered and not walked."""
        return bytes(self._buf[self._off :])

    def deflate_end_error(self) -> str | None:
        """Once the walk is over: why the deflate stream is not whole (cut before its
        final block), or ``None``."""
        inflater = self._inflater
        assert inflater is not None
        return deflate_end_error(inflater.eof)

    def at_end(self) -> bool:
        if self._inflater is None:
            return self.pos >= self._size
        # An odd-length deflated stream carries one NUL pad after the zlib end (PS3.5 A.5).
        return not self._fill(1)

    def read(self, n: int) -> bytes:
        if self._inflater is None:
            data = self.fp.read(n)
        else:
            self._fill(n)
            off = self._off
            data = bytes(self._buf[off : off + n])
            self._off = off + len(data)
        if len(data) != n:
            raise DataSetError(f"data set ends inside an element header or value at byte {self.pos + len(data)}")
        self.pos += n
        return data

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        """The next ``st.size`` bytes unpacked, without copying them out of the
        inflated buffer (a header: the walk of millions of tiny items stays cheap)."""
        n = st.size
        if self._inflater is None:
            data = self.fp.read(n)
            if len(data) != n:
                raise DataSetError(f"data set ends inside an element header or value at byte {self.pos + len(data)}")
            self.pos += n
            return st.unpack(data)
        if len(self._buf) - self._off < n and not self._fill(n):
            raise DataSetError(
                f"data set ends inside an element header or value at byte {self.pos + len(self._buf) - self._off}"
            )
        off = self._off
        self._off = off + n
        self.pos += n
        return st.unpack_from(self._buf, off)

    def skip(self, n: int) -> None:
        if self._inflater is None:
            if self.pos + n > self._size:
                raise DataSetError(
                    f"value of {n} bytes at byte {self.pos} runs past the end of the data set ({self._size} bytes)"
                )
            self.fp.seek(n, io.SEEK_CUR)
            self.pos += n
            return
        start, left = self.pos, n
        while left:
            if len(self._buf) == self._off and not self._fill(1):
                raise DataSetError(f"value of {n} bytes at byte {start} runs past the end of the data set")
            take = min(left, len(self._buf) - self._off)
            self._off += take
            self.pos += take
            left -= take


class _Enough(Exception):
    """The walk reached the tag it was asked to stop after."""


class _Walker:
    def __init__(
        self,
        src: _Source,
        implicit: bool,
        little: bool,
        stop_after: int | None = None,
        keep: frozenset[int] = frozenset(),
        ordered: bool = False,
        max_elements: int | None = None,
        max_items: int | None = None,
    ):
        self.stop_after = stop_after
        self.seq_items = 0  # sequence items, all depths (not fragments)
        self.max_items = NO_LIMIT if max_items is None else max_items
        self.ordered = ordered
        self.keep = keep
        self.kept: dict[int, tuple[bytes, bytes]] = {}
        self.src = src
        self.implicit = implicit
        self.end = "<" if little else ">"
        self.elements = 0
        self.pieces = 0  # elements, items and fragments
        self.max_elements = MAX_ELEMENTS if max_elements is None else max_elements
        self.top: dict[int, str] = {}

    def _piece(self) -> None:
        self.pieces += 1
        if self.pieces > self.max_elements:
            raise TooManyElements(self.max_elements)

    def _header(self) -> tuple[int, int, int]:
        """An item or fragment header, or an implicit VR element's: group, element, length."""
        return self.src.unpack(_ITEM_LE if self.end == "<" else _ITEM_BE)

    def _tag(self) -> int:
        group, elem = struct.unpack(self.end + "HH", self.src.read(4))
        return int((group << 16) | elem)

    def _u32(self) -> int:
        return int(struct.unpack(self.end + "I", self.src.read(4))[0])

    def elements_until(self, bound: int | None, depth: int, item: bool) -> None:
        """Elements up to byte ``bound`` (defined length), or to an item delimiter
        (``item`` with undefined length), or to the end of the stream (top level)."""
        src = self.src
        prev = -1
        # The header of an element, one read: tag and length (implicit VR), or tag, VR
        # and short length. The syntax holds for this data set or item (a UN sequence's
        # items are walked by another call).
        implicit = self.implicit
        little = self.end == "<"
        header = (_ITEM_LE if little else _ITEM_BE) if implicit else (_EXPL_LE if little else _EXPL_BE)
        unpack = src.unpack
        while True:
            if bound is not None:
                if src.pos == bound:
                    return
                if src.pos > bound:
                    raise DataSetError(f"element crosses the end of its item at byte {bound}")
            elif not item and src.at_end():
                return
            if implicit:
                group, elem, length = unpack(header)
                vr = b""
            else:
                group, elem, vr, length = unpack(header)
            tag = (group << 16) | elem
            if tag == _ITEM_END:
                if not item or bound is not None:
                    raise DataSetError(f"unexpected item delimiter at byte {src.pos - 8}")
                return
            if group == 0xFFFE:
                raise DataSetError(f"unexpected item tag ({group:04X},{elem:04X}) at byte {src.pos - 8}")
            if self.ordered:
                if tag <= prev:
                    raise _unordered(tag, src.pos - 8)
                prev = tag
            if depth == 0 and self.stop_after is not None and tag > self.stop_after:
                raise _Enough
            self.element(tag, vr, length, depth)

    def element(self, tag: int, vr: bytes, length: int, depth: int) -> None:
        """One element, its header read (``length``: the 2-byte one for an explicit VR)."""
        src = self.src
        self.elements += 1
        self.pieces += 1
        if self.pieces > self.max_elements:
            raise TooManyElements(self.max_elements)
        if not self.implicit:
            if vr in _LONG_VRS:
                length = self._u32()
            elif vr not in _SHORT_VRS:
                raise DataSetError(f"invalid VR {vr!r} in ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {src.pos - 8}")
        if length == _UNDEFINED:
            if vr in (b"OB", b"OW") or (tag == 0x7FE00010 and vr != b"SQ"):
                self.fragments(tag)
            elif vr == b"UN":  # contents are implicit VR little endian (PS3.5 §6.2.2 note)
                saved = self.implicit, self.end
                self.implicit, self.end = True, "<"
                try:
                    self.sequence(None, depth)
                finally:
                    self.implicit, self.end = saved
            elif vr in (b"SQ", b""):
                self.sequence(None, depth)
            else:
                raise DataSetError(f"undefined length in ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR {vr!r}")
            return
        if vr == b"SQ":
            self.sequence(src.pos + length, depth)
        elif vr in (b"", b"UN") and self.max_items < NO_LIMIT and _is_sequence(tag):
            # Items are counted wherever pydicom would read them: a defined-length
            # sequence in implicit VR, or as UN (read as implicit VR little endian).
            saved = self.implicit, self.end
            self.implicit, self.end = True, "<"
            try:
                self.sequence(src.pos + length, depth)
            finally:
                self.implicit, self.end = saved
        elif depth == 0 and (tag in self.keep or tag in (_SOP_CLASS, _SOP_INSTANCE)):
            value = src.read(length)
            if tag in (_SOP_CLASS, _SOP_INSTANCE):
                self.top[tag] = value.decode("ascii", "replace").strip("\x00 ")
            if tag in self.keep:
                self.kept[tag] = (vr, value)
        elif length:
            src.skip(length)

    def sequence(self, bound: int | None, depth: int) -> None:
        if depth >= _MAX_DEPTH:
            raise DataSetError("sequences nested too deep")
        src = self.src
        while True:
            if bound is not None:
                if src.pos == bound:
                    return
                if src.pos > bound:
                    raise DataSetError(f"item crosses the end of its sequence at byte {bound}")
            group, elem, length = self._header()
            tag = (group << 16) | elem
            if tag == _SEQ_END and bound is None:
                return
            if tag != _ITEM:
                raise DataSetError(f"expected an item tag at byte {src.pos - 8}")
            self.pieces += 1
            if self.pieces > self.max_elements:
                raise TooManyElements(self.max_elements)
            self.seq_items += 1
            if self.seq_items > self.max_items:
                raise TooManyItems(self.max_items)
            if length == _UNDEFINED:
                self.elements_until(None, depth + 1, item=True)
            elif length:
                self.elements_until(src.pos + length, depth + 1, item=True)

    def fragments(self, tag: int) -> None:
        src = self.src
        while True:
            group, elem, length = self._header()
            item = (group << 16) | elem
            if item == _SEQ_END:
                return
            self._piece()
            if item != _ITEM or length == _UNDEFINED:
                raise DataSetError(
                    f"bad fragment in encapsulated ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {src.pos - 8}"
                )
            src.skip(length)


class _BufferWalker:
    """The same walk over a data set held in memory, with one ``unpack_from`` per header.

    Used for data sets small enough to read whole (a sender reads them anyway): several
    times faster than :class:`_Walker`, which reads a file element by element.
    """

    __slots__ = (
        "budget", "buf", "elements", "hdr", "implicit", "items", "keep", "kept", "limit", "little", "max_items",
        "ordered", "seq_items", "size", "top", "u32", "pos", "seq", "watch",
    )  # fmt: skip

    #: Walk runs of plain elements in the short loop of :meth:`_explicit_until` (tests
    #: compare it with the general step alone).
    runs = True

    def __init__(
        self,
        buf: bytes,
        implicit: bool,
        little: bool,
        keep: frozenset[int] = frozenset(),
        ordered: bool = False,
        budget: int | None = None,
        max_elements: int | None = None,
        max_items: int | None = None,
    ):
        self.buf = buf
        self.seq_items = 0  # sequence items, all depths (not fragments)
        self.max_items = NO_LIMIT if max_items is None else max_items
        self.ordered = ordered
        # The walk stops past ``budget`` (BudgetExceeded: walk it elsewhere) or past
        # ``max_elements`` (TooManyElements: refused), whichever comes first.
        self.limit = MAX_ELEMENTS if max_elements is None else max_elements
        self.budget = min(self.limit, (1 << 62) if budget is None else budget)
        self.items = 0  # items and fragments walked (elements are counted in ``elements``)
        self.keep = keep
        self.watch = keep | {_SOP_CLASS, _SOP_INSTANCE}  # top-level tags whose value is read
        self.kept: dict[int, tuple[bytes, bytes]] = {}
        self.size = len(buf)
        self.pos = 0
        self.elements = 0
        self.top: dict[int, str] = {}
        self._syntax(implicit, little)

    def _syntax(self, implicit: bool, little: bool) -> None:
        end = "<" if little else ">"
        self.implicit, self.little = implicit, little
        # implicit: tag, 4-byte length; explicit: tag, VR, 2-byte length (long VRs: 2 reserved + 4)
        self.hdr = struct.Struct(end + ("HHI" if implicit else "HH2sH")).unpack_from
        self.u32 = struct.Struct(end + "I").unpack_from
        self.seq = struct.Struct(end + "HHI").unpack_from

    def _over(self) -> Exception:
        if self.budget == self.limit:
            return TooManyElements(self.limit)
        return BudgetExceeded()

    def _short(self, at: int) -> DataSetError:
        return DataSetError(f"data set ends inside an element header or value at byte {min(at, self.size)}")

    def elements_until(self, bound: int | None, depth: int, item: bool) -> None:
        if not self.implicit:
            self._explicit_until(bound, depth, item)
            return
        buf, size, top = self.buf, self.size, depth == 0
        prev = -1
        while True:
            pos = self.pos
            if bound is not None:
                if pos == bound:
                    return
                if pos > bound:
                    raise DataSetError(f"element crosses the end of its item at byte {bound}")
            elif not item and pos >= size:
                return
            if pos + 8 > size:
                raise self._short(size)
            if self.implicit:
                group, elem, length = self.hdr(buf, pos)
                vr = b""
            else:
                group, elem, vr, length = self.hdr(buf, pos)
            if group == 0xFFFE:
                if elem != 0xE00D:
                    raise DataSetError(f"unexpected item tag ({group:04X},{elem:04X}) at byte {pos}")
                if not item or bound is not None:
                    raise DataSetError(f"unexpected item delimiter at byte {pos}")
                self.pos = pos + 8
                return
            tag = (group << 16) | elem
            if self.ordered:
                if tag <= prev:
                    raise _unordered(tag, pos)
                prev = tag
            if self.implicit:
                pos += 8
            elif vr in _LONG_VRS:
                if pos + 12 > size:
                    raise self._short(size)
                (length,) = self.u32(buf, pos + 8)
                pos += 12
            elif vr in _SHORT_VRS:
                pos += 8
            else:
                raise DataSetError(f"invalid VR {vr!r} in ({group:04X},{elem:04X}) at byte {pos}")
            self.elements += 1
            if self.elements + self.items > self.budget:
                raise self._over()
            self.pos = pos
            if length == _UNDEFINED:
                self._undefined(tag, vr, depth)
            elif vr == b"SQ" or (self.max_items < NO_LIMIT and _is_sequence(tag)):
                self.sequence(pos + length, depth)  # (implicit: the dictionary's, to count its items)
            elif pos + length > size:
                if top and tag in (_SOP_CLASS, _SOP_INSTANCE):
                    raise self._short(size)
                raise DataSetError(
                    f"value of ({group:04X},{elem:04X}), {length} bytes at byte {pos}, runs past the end of"
                    f" the data set ({size} bytes)"
                )
            else:
                if top:
                    if tag in (_SOP_CLASS, _SOP_INSTANCE):
                        top_uids = self.top
                        top_uids[tag] = buf[pos : pos + length].decode("ascii", "replace").strip("\x00 ")
                    if tag in self.keep:
                        self.kept[tag] = (vr, buf[pos : pos + length])
                self.pos = pos + length

    def _explicit_until(self, bound: int | None, depth: int, item: bool) -> None:
        """:meth:`elements_until` for an explicit VR syntax, the common case: position and
        element count kept in locals, the VR read as a number and classified by one table
        index, tags built only where a value is read (top level) or a sequence followed."""
        buf, size, u32, watch = self.buf, self.size, self.u32, self.watch if depth == 0 else None
        hdr, kinds = (_HDR_LE, _VR_KIND_LE) if self.little else (_HDR_BE, _VR_KIND_BE)
        run_hdr = _RUN_HDR_LE if self.little else _RUN_HDR_BE
        # With an item limit, a UN element of a dictionary sequence is walked as one
        # (pydicom reads it as implicit VR little endian items, PS3.5 §6.2.2).
        un = (_UN_LE if self.little else _UN_BE) if self.max_items < NO_LIMIT else -1
        # Where the walk ends: the item's end, the data set's end (top level), or never
        # (an undefined-length item, ended by its delimiter; size + 1 is not reachable).
        limit = bound if bound is not None else (size + 1 if item else size)
        pos = self.pos
        count = 0
        ordered, prev = self.ordered, -1
        room = self.budget - self.elements - self.items  # elements this level may add
        # The run of plain elements (a VR with a 2-byte length, no value read) is walked by
        # the short loop below; the others take the general step after it. ``special``:
        # the item group and, at the top level, the groups of the tags whose value is read.
        stop = min(limit, size)
        runs = self.runs and not ordered
        special = _ITEM_GROUP if watch is None else frozenset({0xFFFE, *(tag >> 16 for tag in watch)})
        try:
            while True:
                # Without an order to check, and with no way to reach the element budget in
                # the bytes left (an element takes at least 8), the run needs only the
                # header, its VR's kind and the position.
                if runs and pos < stop and room - count > (size - pos) // 8 + 1:
                    while True:
                        group, vr, length = run_hdr(buf, pos)  # struct.error: fewer than 8 bytes left
                        if kinds[vr] != 1 or group in special:
                            break
                        pos += 8 + length
                        count += 1
                        if pos >= stop:
                            if pos > stop:  # the value runs past the end: the general step says so
                                pos -= 8 + length
                                count -= 1
                            break
                if pos >= limit:
                    if pos == limit:
                        break
                    raise DataSetError(f"element crosses the end of its item at byte {bound}")
                if count >= room:
                    raise self._over()
                group, elem, vr, length = hdr(buf, pos)  # struct.error: fewer than 8 bytes left
                if group == 0xFFFE:
                    if elem != 0xE00D:
                        raise DataSetError(f"unexpected item tag ({group:04X},{elem:04X}) at byte {pos}")
                    if not item or bound is not None:
                        raise DataSetError(f"unexpected item delimiter at byte {pos}")
                    pos += 8
                    break
                if ordered:
                    tag = (group << 16) | elem
                    if tag <= prev:
                        raise _unordered(tag, pos)
                    prev = tag
                kind = kinds[vr]
                if kind == 1:  # 2-byte length
                    pos += 8
                elif kind:
                    (length,) = u32(buf, pos + 8)  # struct.error: fewer than 12 bytes left
                    pos += 12
                    if length == _UNDEFINED or kind == 3 or (vr == un and _is_sequence((group << 16) | elem)):
                        count += 1
                        self.pos = pos
                        if length == _UNDEFINED:
                            self._undefined((group << 16) | elem, buf[pos - 8 : pos - 6], depth)
                        elif kind == 3:
                            self.sequence(pos + length, depth)
                        else:
                            self._implicit_sequence(pos + length, depth)
                        pos = self.pos
                        room = self.budget - self.elements - self.items
                        continue
                else:
                    raise DataSetError(
                        f"invalid VR {buf[pos + 4 : pos + 6]!r} in ({group:04X},{elem:04X}) at byte {pos}"
                    )
                count += 1
                end = pos + length
                if end > size:
                    if watch is not None and ((group << 16) | elem) in (_SOP_CLASS, _SOP_INSTANCE):
                        raise self._short(size)
                    raise DataSetError(
                        f"value of ({group:04X},{elem:04X}), {length} bytes at byte {pos}, runs past the end of"
                        f" the data set ({size} bytes)"
                    )
                if watch is not None:
                    tag = (group << 16) | elem
                    if tag in watch:
                        if tag in (_SOP_CLASS, _SOP_INSTANCE):
                            self.top[tag] = buf[pos:end].decode("ascii", "replace").strip("\x00 ")
                        if tag in self.keep:
                            self.kept[tag] = (
                                buf[pos - 4 : pos - 2] if kind == 1 else buf[pos - 8 : pos - 6],
                                buf[pos:end],
                            )
                pos = end
        except struct.error:
            raise self._short(size) from None
        self.pos = pos
        self.elements += count

    def _implicit_sequence(self, bound: int | None, depth: int) -> None:
        saved = self.implicit, self.little
        self._syntax(True, True)
        try:
            self.sequence(bound, depth)
        finally:
            self._syntax(*saved)

    def _undefined(self, tag: int, vr: bytes, depth: int) -> None:
        if vr in (b"OB", b"OW") or (tag == 0x7FE00010 and vr != b"SQ"):
            self.fragments(tag)
        elif vr == b"UN":  # contents are implicit VR little endian (PS3.5 §6.2.2 note)
            self._implicit_sequence(None, depth)
        elif vr in (b"SQ", b""):
            self.sequence(None, depth)
        else:
            raise DataSetError(f"undefined length in ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR {vr!r}")

    def sequence(self, bound: int | None, depth: int) -> None:
        if depth >= _MAX_DEPTH:
            raise DataSetError("sequences nested too deep")
        buf, size = self.buf, self.size
        while True:
            pos = self.pos
            if bound is not None:
                if pos == bound:
                    return
                if pos > bound:
                    raise DataSetError(f"item crosses the end of its sequence at byte {bound}")
            if pos + 8 > size:
                raise self._short(size)
            group, elem, length = self.seq(buf, pos)
            self.pos = pos + 8
            tag = (group << 16) | elem
            if tag == _SEQ_END and bound is None:
                return
            if tag != _ITEM:
                raise DataSetError(f"expected an item tag at byte {pos}")
            self.items += 1
            if self.elements + self.items > self.budget:
                raise self._over()
            self.seq_items += 1
            if self.seq_items > self.max_items:
                raise TooManyItems(self.max_items)
            if length == _UNDEFINED:
                self.elements_until(None, depth + 1, item=True)
            else:
                self.elements_until(pos + 8 + length, depth + 1, item=True)

    def fragments(self, tag: int) -> None:
        buf, size = self.buf, self.size
        while True:
            pos = self.pos
            if pos + 8 > size:
                raise self._short(size)
            self.items += 1
            if self.elements + self.items > self.budget:
                raise self._over()
            group, elem, length = self.seq(buf, pos)
            item = (group << 16) | elem
            if item == _SEQ_END:
                self.pos = pos + 8
                return
            if item != _ITEM or length == _UNDEFINED:
                raise DataSetError(f"bad fragment in encapsulated ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}")
            if pos + 8 + length > size:
                raise DataSetError(
                    f"value of {length} bytes at byte {pos + 8} runs past the end of the data set ({size} bytes)"
                )
            self.pos = pos + 8 + length


def _unordered(tag: int, pos: int) -> DataSetError:
    return DataSetError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) repeated or out of order at byte {pos}")


def check_dataset_bytes(
    data: bytes,
    transfer_syntax: str,
    keep: frozenset[int] = frozenset(),
    *,
    ordered: bool = False,
    budget: int | None = None,
    max_elements: int | None = None,
    max_items: int | None = None,
) -> DataSetSummary:
    """:func:`check_dataset` for a data set held in memory (bytes). ``budget``: raise
    :class:`BudgetExceeded` past about that many elements, items and fragments (a walk
    on an event loop stays short however the bytes are cut up; not for deflated data)."""
    if transfer_syntax in _DEFLATED:
        return check_dataset(
            io.BytesIO(data),
            transfer_syntax,
            keep=keep,
            ordered=ordered,
            max_elements=max_elements,
            max_items=max_items,
        )
    walker = _BufferWalker(
        data,
        implicit=transfer_syntax == _IMPLICIT_LE,
        little=transfer_syntax != _EXPLICIT_BE,
        keep=keep,
        ordered=ordered,
        budget=budget,
        max_elements=max_elements,
        max_items=max_items,
    )
    walker.elements_until(None, 0, item=False)
    return DataSetSummary(
        walker.top.get(_SOP_CLASS, ""), walker.top.get(_SOP_INSTANCE, ""), transfer_syntax, walker.elements, walker.kept
    )


def check_dataset(
    fp: BinaryIO,
    transfer_syntax: str,
    start: int = 0,
    keep: frozenset[int] = frozenset(),
    *,
    ordered: bool = False,
    max_elements: int | None = None,
    max_items: int | None = None,
) -> DataSetSummary:
    """Walk the data set in ``fp`` from byte ``start`` to its end; raise
    :class:`DataSetError` unless every element is complete (and, with ``ordered``,
    every tag greater than the one before it in its data set or item, PS3.5 §7.1),
    :class:`TooManyElements` past ``max_elements`` (default :data:`MAX_ELEMENTS`)
    elements, items and fragments, :class:`TooManyItems` past ``max_items`` sequence
    items (all depths; default: no bound but ``max_elements``). Sequences nest at most
    64 deep. The values of the top-level elements in ``keep``
    are returned with the summary (no second read)."""
    deflated = transfer_syntax in _DEFLATED
    walker = _Walker(
        _Source(fp, start, deflated),
        implicit=transfer_syntax == _IMPLICIT_LE,
        little=transfer_syntax != _EXPLICIT_BE,
        keep=keep,
        ordered=ordered,
        max_elements=max_elements,
        max_items=max_items,
    )
    try:
        walker.elements_until(None, 0, item=False)
    except struct.error as exc:  # pragma: no cover - read() always returns what was asked
        raise DataSetError(str(exc)) from None
    if deflated:
        if walker.src.leftover().strip(b"\x00"):
            raise DataSetError("bytes after the end of the deflated data set")
        error = walker.src.deflate_end_error()
        if error is not None:
            raise DataSetError(error)
    return DataSetSummary(
        walker.top.get(_SOP_CLASS, ""), walker.top.get(_SOP_INSTANCE, ""), transfer_syntax, walker.elements, walker.kept
    )


def dataset_uids(fp: BinaryIO, transfer_syntax: str, start: int) -> tuple[str, str]:
    """The data set's own SOP Class and Instance UIDs, reading only as far as (0008,0018);
    raises :class:`DataSetError` when the start of the data set is not well formed."""
    walker = _Walker(
        _Source(fp, start, transfer_syntax in _DEFLATED),
        implicit=transfer_syntax == _IMPLICIT_LE,
        little=transfer_syntax != _EXPLICIT_BE,
        stop_after=_SOP_INSTANCE,
    )
    try:
        walker.elements_until(None, 0, item=False)
    except _Enough:
        pass
    return walker.top.get(_SOP_CLASS, ""), walker.top.get(_SOP_INSTANCE, "")


def check_part10(
    fp: BinaryIO, keep: frozenset[int] = frozenset(), *, ordered: bool = False, max_elements: int | None = None
) -> DataSetSummary:
    """Check a Part 10 stream (preamble, file meta, data set) as :func:`check_dataset`."""
    meta = read_file_meta(fp)
    if meta is None:
        raise DataSetError("no DICM prefix or incomplete file meta information")
    return check_dataset(
        fp, meta.transfer_syntax, meta.dataset_offset, keep, ordered=ordered, max_elements=max_elements
    )


# -- the same data set in two encodings -------------------------------------------------

#: Syntaxes whose values are the same bytes whatever the syntax (little endian, native):
#: a data set in one of them equals one in another when their elements do.
_LE_NATIVE = frozenset({_IMPLICIT_LE, _EXPLICIT_LE, *_DEFLATED})
#: Native syntaxes comparable with each other: Explicit VR Big Endian's values read as
#: little endian once the byte order of each binary number is swapped (PS3.5 §7.3).
_NATIVE = _LE_NATIVE | {_EXPLICIT_BE}
#: VR -> the size of the numbers whose bytes Big Endian swaps (PS3.5 §7.3, Table 6.2-1):
#: text, OB and UN (a byte string, PS3.5 §6.2.2) are the same bytes in either order.
_SWAP_UNIT = {
    b"US": 2, b"SS": 2, b"AT": 2, b"OW": 2,
    b"UL": 4, b"SL": 4, b"FL": 4, b"OL": 4, b"OF": 4,
    b"FD": 8, b"OD": 8, b"OV": 8, b"SV": 8, b"UV": 8,
}  # fmt: skip
#: Number size -> an array type code of that size (for its byteswap()).
_ARRAY_CODE = {size: code for code in "QLIH" if (size := array.array(code).itemsize) in (2, 4, 8)}


def _to_little(data: bytes, unit: int) -> bytes:
    """Big endian numbers of ``unit`` bytes (``len(data)`` a multiple of it) as little endian."""
    numbers = array.array(_ARRAY_CODE[unit], data)
    numbers.byteswap()
    return numbers.tobytes()


def _is_sequence(tag: int) -> bool:
    """Whether the data dictionary makes ``tag`` a sequence (for an implicit VR stream)."""
    from pydicom.datadict import dictionary_VR  # here: a send of a file loads no pydicom

    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


class _Tokens(_Walker):
    """The walk of :class:`_Walker` as a stream of what a data set holds, whatever its
    encoding: ("E", tag, length) then the value in pieces of at most ``_CHUNK`` bytes;
    ("S", tag) ... ("/S",) around a sequence's items ("I",) ... ("/I",), of defined or
    undefined length; ("P", tag) ... ("/P",) around encapsulated fragments ("F", length).
    Group lengths (gggg,0000) and trailing padding (FFFC,FFFC) are left out: they
    depend on the encoding, not on the data set (PS3.5 §7.2, §7.5)."""

    def tokens(self, bound: int | None, depth: int, item: bool) -> Iterator[tuple[object, ...]]:
        src = self.src
        while True:
            if bound is not None:
                if src.pos == bound:
                    return
                if src.pos > bound:
                    raise DataSetError(f"element crosses the end of its item at byte {bound}")
            elif not item and src.at_end():
                return
            tag = self._tag()
            if tag == _ITEM_END:
                if not item or bound is not None:
                    raise DataSetError(f"unexpected item delimiter at byte {src.pos - 4}")
                src.read(4)
                return
            if tag >> 16 == 0xFFFE:
                raise DataSetError(f"unexpected item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {src.pos - 4}")
            yield from self.token(tag, depth)

    def token(self, tag: int, depth: int) -> Iterator[tuple[object, ...]]:
        src = self.src
        self.elements += 1
        if self.implicit:
            vr = b""
            length = self._u32()
        else:
            vr = src.read(2)
            if vr in _LONG_VRS:
                src.read(2)
                length = self._u32()
            elif vr in _SHORT_VRS:
                length = int(struct.unpack(self.end + "H", src.read(2))[0])
            else:
                raise DataSetError(f"invalid VR {vr!r} in ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if length == _UNDEFINED:
            if vr in (b"OB", b"OW") or (tag == 0x7FE00010 and vr != b"SQ"):
                yield ("P", tag)
                while True:
                    item, size = self._tag(), self._u32()
                    if item == _SEQ_END:
                        break
                    if item != _ITEM or size == _UNDEFINED:
                        raise DataSetError("bad fragment")
                    self.elements += 1
                    yield ("F", size)
                    yield from self.value(size)
                yield ("/P",)
                return
            if vr not in (b"SQ", b"", b"UN"):
                raise DataSetError(f"undefined length in ({tag >> 16:04X},{tag & 0xFFFF:04X}) with VR {vr!r}")
            saved = self.implicit, self.end
            if vr == b"UN":  # contents are implicit VR little endian (PS3.5 §6.2.2 note)
                self.implicit, self.end = True, "<"
            try:
                yield ("S", tag)
                yield from self.items(None, depth)
                yield ("/S",)
            finally:
                self.implicit, self.end = saved
            return
        if vr == b"SQ" or (self.implicit and _is_sequence(tag)):
            yield ("S", tag)
            yield from self.items(src.pos + length, depth)
            yield ("/S",)
        elif tag & 0xFFFF == 0 or tag == 0xFFFCFFFC:
            src.skip(length)
        else:
            yield ("E", tag, length)
            unit = _SWAP_UNIT.get(vr, 0) if self.end == ">" and not self.implicit else 0
            yield from self.value(length, unit)

    def value(self, length: int, unit: int = 0) -> Iterator[tuple[object, ...]]:
        """The value in pieces of at most ``_CHUNK`` bytes (a multiple of 8), as little
        endian: big endian numbers of ``unit`` bytes are swapped."""
        if unit and length % unit:
            raise DataSetError(f"value of {length} bytes is not a whole number of {unit}-byte numbers")
        while length:
            n = min(length, _CHUNK)
            data = self.src.read(n)
            yield ("V", _to_little(data, unit) if unit else data)
            length -= n

    def items(self, bound: int | None, depth: int) -> Iterator[tuple[object, ...]]:
        if depth >= _MAX_DEPTH:
            raise DataSetError("sequences nested too deep")
        src = self.src
        while True:
            if bound is not None:
                if src.pos == bound:
                    return
                if src.pos > bound:
                    raise DataSetError(f"item crosses the end of its sequence at byte {bound}")
            tag = self._tag()
            length = self._u32()
            if tag == _SEQ_END and bound is None:
                return
            if tag != _ITEM:
                raise DataSetError(f"expected an item tag at byte {src.pos - 8}")
            self.elements += 1
            yield ("I",)
            yield from self.tokens(None if length == _UNDEFINED else src.pos + length, depth + 1, item=True)
            yield ("/I",)


def same_dataset(
    a: BinaryIO, a_syntax: str, a_start: int, b: BinaryIO, b_syntax: str, b_start: int, max_elements: int
) -> bool | None:
    """Whether two encoded data sets hold the same elements with the same values (as
    a sender converting between Implicit and Explicit VR Little Endian and Explicit VR
    Big Endian, or deflating, or changing sequence lengths between defined and
    undefined, re-encodes it; PS3.5 §7, A.1-A.5). Big endian numbers are compared
    swapped to little endian by their VR (PS3.5 §7.3); values of VR UN are byte strings
    (PS3.5 §6.2.2), compared as they are. In one linear pass over both, a value
    ``_CHUNK`` bytes at a time: memory stays bounded whatever the size. ``None`` when it
    cannot tell cheaply: syntaxes whose values would have to be decoded to compare
    (encapsulated against another syntax: compressed pixel data is another encoding),
    or more than ``max_elements`` elements, items and fragments. A private sequence of
    defined length in an implicit VR stream is not recognised (it compares unequal with
    its explicit encoding): never a false "same"."""
    if a_syntax != b_syntax and not (a_syntax in _NATIVE and b_syntax in _NATIVE):
        return None
    walkers = []
    for fp, syntax, start in ((a, a_syntax, a_start), (b, b_syntax, b_start)):
        walkers.append(
            _Tokens(
                _Source(fp, start, syntax in _DEFLATED), implicit=syntax == _IMPLICIT_LE, little=syntax != _EXPLICIT_BE
            )
        )
    wa, wb = walkers
    try:
        for x, y in zip_longest(wa.tokens(None, 0, item=False), wb.tokens(None, 0, item=False)):
            if x != y:
                return False
            if wa.elements > max_elements:
                return None
    except (DataSetError, struct.error):
        return False
    return True
