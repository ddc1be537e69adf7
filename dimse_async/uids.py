"""UIDs the library uses by name (PS3.6 Annex A).

Plain strings, so that importing them does not load pydicom; :func:`uid_name` asks
pydicom's registry only when a name is wanted (messages, logs).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_TRANSFER_SYNTAXES",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "STORE_TRANSFER_SYNTAXES",
    "UNCOMPRESSED_TRANSFER_SYNTAXES",
    "StorageCommitmentPushModel",
    "Verification",
    "uid_name",
]

#: Our Implementation Class UID and Version Name (PS3.7 D.3.3.2), in every A-ASSOCIATE and file meta.
IMPLEMENTATION_CLASS_UID = "2.25.274571480719065348315665717021919789922"
IMPLEMENTATION_VERSION_NAME = "DIMSE_ASYNC_01"

Verification = "1.2.840.10008.1.1"
#: Storage Commitment Push Model SOP Class (PS3.4 J.3).
StorageCommitmentPushModel = "1.2.840.10008.1.20.1"

ImplicitVRLittleEndian = "1.2.840.10008.1.2"
ExplicitVRLittleEndian = "1.2.840.10008.1.2.1"
ExplicitVRBigEndian = "1.2.840.10008.1.2.2"
DeflatedExplicitVRLittleEndian = "1.2.840.10008.1.2.1.99"

#: Uncompressed transfer syntaxes, in our order of preference as acceptor.
UNCOMPRESSED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

#: What we propose and accept unless told otherwise.
DEFAULT_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

#: What a storage SCP accepts by default: uncompressed first, then the usual compressed
#: (also ``services.storage.STORE_TRANSFER_SYNTAXES``; here for the AE's presets).
STORE_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]


#: True while a server imports pydicom on another thread (``serve``'s preload): names
#: are not looked up meanwhile, since a second thread importing pydicom (a submodule of
#: a package another thread is initializing) can make both imports fail.
pydicom_loading = False


def uid_name(uid: str) -> str:
    """The registered name of ``uid`` (PS3.6 Annex A) if pydicom knows it, else the UID
    (also while :data:`pydicom_loading`)."""
    if pydicom_loading:
        return uid
    try:
        from pydicom.uid import UID

        name = UID(uid).name
    except Exception:  # pragma: no cover - pydicom version differences
        return uid
    return name if name and name != uid else uid
