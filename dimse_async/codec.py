"""Data sets to bytes and back in a transfer syntax (PS3.5 §10, A.5), with pydicom.

:func:`encode_dataset` writes a data set without file meta in any uncompressed
syntax (swapping word-valued elements between endiannesses, deflating for the
deflated syntax); :func:`decode_identifier` reads one back. pydicom is imported at
first use, so that a server that has not yet exchanged a data set has not loaded it.
"""

from __future__ import annotations

import array
import zlib
from typing import TYPE_CHECKING, BinaryIO, cast

from .inflate import DEFAULT_LIMITS, InflationLimits, inflate
from .uids import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["UNCOMPRESSED", "decode_identifier", "encode_dataset"]

#: The syntaxes this module converts between.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)

_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_words(ds: Dataset) -> Dataset:
    """Copy of ``ds`` with OW/OF/OL/OD/OV values byte-swapped (endianness change)."""
    import pydicom
    from pydicom.dataset import Dataset

    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            new = pydicom.DataElement(elem.tag, "SQ", [_swap_words(item) for item in elem.value])
        elif elem.VR in _WORD_SIZES and elem.value:
            code = {2: "H", 4: "I", 8: "Q"}[_WORD_SIZES[elem.VR]]
            words = array.array(code, bytes(elem.value))
            words.byteswap()
            new = pydicom.DataElement(elem.tag, elem.VR, words.tobytes())
        else:
            new = elem
        out.add(new)
    return out


def encode_dataset(ds: Dataset, transfer_syntax: str, source_syntax: str | None = None) -> bytes:
    """Encode ``ds`` (no file meta) in ``transfer_syntax``.

    Between little and big endian, word-valued binary elements (OW, OF, OL, OD, OV)
    are byte-swapped, which pydicom does not do on its own.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    little = transfer_syntax != ExplicitVRBigEndian
    source_little = (source_syntax or ExplicitVRLittleEndian) != ExplicitVRBigEndian
    if little != source_little:
        ds = _swap_words(ds)
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    fp.is_little_endian = little
    write_dataset(fp, ds)
    data = fp.getvalue()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        data = packer.compress(data) + packer.flush()
        if len(data) % 2:
            data += b"\x00"
    return bytes(data)


def decode_identifier(data: bytes, transfer_syntax: str, limits: InflationLimits = DEFAULT_LIMITS) -> Dataset:
    """Decode an identifier (a data set without meta) in ``transfer_syntax``.

    A deflated one is inflated within ``limits`` (:class:`~dimse_async.inflate.InflationLimit`
    past them, a ``ValueError``).
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        data = inflate(data, limits)
    fp = DicomBytesIO(data)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    return read_dataset(cast(BinaryIO, fp), implicit, little)
