"""Bounded inflation of Deflated Explicit VR Little Endian data sets (PS3.5 §10.3, A.5).

A deflated data set is a raw DEFLATE stream (RFC 1951, no zlib header). A small one
can inflate to gigabytes, so everything that inflates data from a peer or from disk
goes through here: the stream is inflated in pieces of at most ``_PIECE`` bytes and
refused (:class:`InflationLimit`) as soon as the output passes ``max_size`` or, once
past ``ratio_floor`` bytes, ``max_ratio`` times the input consumed so far. Pure code.

The stream must be whole (:class:`CorruptDeflate` otherwise): a stream cut before its
final block is a data set that cannot be parsed. What follows its end is ignored: the
NUL byte that pads it to an even length (PS3.5 A.5), and the bytes some writers leave
there (pydicom's own ``image_dfl.dcm`` ends with eight), as DCMTK and pydicom read them.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO

from .lazy_dataclass import dataclass

__all__ = ["DEFAULT_LIMITS", "CorruptDeflate", "InflationLimit", "InflationLimits", "check_deflated", "inflate"]

_PIECE = 1 << 16


class InflationLimit(ValueError):
    """The deflated data would inflate past a limit (a "deflate bomb")."""


class CorruptDeflate(ValueError):
    """The deflated data is no whole DEFLATE stream (PS3.5 A.5): corrupt, or cut before
    its final block."""


def deflate_end_error(ended: bool) -> str | None:
    """Why a deflated data set's stream is not whole (``ended``: it reached its final
    block), or ``None``. Bytes after its end are no data and are ignored (see above)."""
    if not ended:
        return "deflated data set ends before its deflate stream does"
    return None


@dataclass(frozen=True, slots=True)
class InflationLimits:
    """How far a deflated data set may inflate.

    ``max_size``: inflated bytes at most. ``max_ratio``: inflated / deflated at most,
    applied once more than ``ratio_floor`` bytes came out (small data may compress
    very well, e.g. an identifier of empty keys). ``max_elements``: elements, items
    and fragments a received data set may have, deflated or not (its check stops
    there: millions of empty items inflate from little data within the other limits,
    and each costs a step of the walk; :data:`.dataset_check.MAX_ELEMENTS`).
    """

    max_size: int = 256 << 20
    max_ratio: float = 200.0
    ratio_floor: int = 4 << 20
    max_elements: int = 4_000_000


DEFAULT_LIMITS = InflationLimits()


class _Meter:
    __slots__ = ("consumed", "limits", "produced")

    def __init__(self, limits: InflationLimits):
        self.limits = limits
        self.consumed = 0
        self.produced = 0

    def add(self, consumed: int, produced: int) -> None:
        self.consumed += consumed
        self.produced += produced
        lim = self.limits
        if self.produced > lim.max_size:
            raise InflationLimit(f"deflated data inflates past {lim.max_size} bytes")
        if self.produced > lim.ratio_floor and self.produced > lim.max_ratio * max(self.consumed, 1):
            raise InflationLimit(
                f"deflated data inflates more than {lim.max_ratio:g} times ({self.consumed} -> {self.produced} bytes)"
            )


def _pieces(inflater: zlib._Decompress, data: bytes, meter: _Meter) -> list[bytes]:
    """Inflate ``data`` (one input chunk) in bounded pieces, metering as it goes."""
    out = []
    pending = data
    while pending:
        before = len(pending)
        try:
            piece = inflater.decompress(pending, _PIECE)
        except zlib.error as exc:
            raise CorruptDeflate(f"deflated data set is corrupt: {exc}") from None
        pending = inflater.unconsumed_tail
        meter.add(before - len(pending), len(piece))
        if piece:
            out.append(piece)
        if inflater.eof:
            break
        if not piece and len(pending) == before:
            break  # needs more input
    return out


def inflate(data: bytes | memoryview, limits: InflationLimits = DEFAULT_LIMITS) -> bytes:
    """Inflate a raw DEFLATE stream within ``limits``.

    Raises :class:`InflationLimit` past a limit and :class:`CorruptDeflate` on corrupt
    data or a stream cut short.
    """
    inflater = zlib.decompressobj(-15)
    meter = _Meter(limits)
    out: list[bytes] = []
    view = memoryview(data)
    for pos in range(0, len(view), _PIECE):
        out += _pieces(inflater, bytes(view[pos : pos + _PIECE]), meter)
        if inflater.eof:
            break
    if not inflater.eof:
        out.append(inflater.flush())
        meter.add(0, len(out[-1]))
    error = deflate_end_error(inflater.eof)
    if error is not None:
        raise CorruptDeflate(error)
    return b"".join(out)


def check_deflated(fp: BinaryIO, start: int, limits: InflationLimits = DEFAULT_LIMITS) -> int:
    """Inflate the stream from ``fp`` at ``start`` without keeping it; the inflated size.

    Raises :class:`InflationLimit` past a limit and :class:`CorruptDeflate` as :func:`inflate`.
    """
    fp.seek(start)
    inflater = zlib.decompressobj(-15)
    meter = _Meter(limits)
    while not inflater.eof:
        chunk = fp.read(_PIECE)
        if not chunk:
            break
        _pieces(inflater, chunk, meter)
    if not inflater.eof:
        meter.add(0, len(inflater.flush()))
    error = deflate_end_error(inflater.eof)
    if error is not None:
        raise CorruptDeflate(error)
    return meter.produced
