"""UIDs the library uses by name (PS3.6 Annex A), taken from pydicom where it has them."""

from __future__ import annotations

from pydicom import uid as _uid

__all__ = [
    "DEFAULT_TRANSFER_SYNTAXES",
    "UNCOMPRESSED_TRANSFER_SYNTAXES",
    "Verification",
]

Verification = _uid.UID("1.2.840.10008.1.1")

ImplicitVRLittleEndian = _uid.ImplicitVRLittleEndian
ExplicitVRLittleEndian = _uid.ExplicitVRLittleEndian
ExplicitVRBigEndian = _uid.ExplicitVRBigEndian
DeflatedExplicitVRLittleEndian = _uid.DeflatedExplicitVRLittleEndian

#: Uncompressed transfer syntaxes, in our order of preference as acceptor.
UNCOMPRESSED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

#: What we propose and accept unless told otherwise.
DEFAULT_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
