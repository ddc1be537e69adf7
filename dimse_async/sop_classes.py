"""Storage SOP classes (PS3.4 Annex B, Table B.5-1), from pydicom's UID registry.

Every SOP class whose name says it stores instances, including the "- For
Presentation" / "- For Processing" pairs (DX, MG, IO, Breast Projection X-Ray, IVOCT,
DICOS DX) whose names do not end in "Storage", and the retired ones (PS3.4 Table
B.5-1 lists them no more, PS3.3 keeps their IODs in its retired annexes): old
ultrasound, nuclear medicine and X-ray angiography bi-plane equipment still sends
them, and archives migrating old studies receive them, as DCMTK's storescp accepts
them. Not storage classes: Storage Commitment and Media Storage Directory (DICOMDIR,
PS3.10).

The list is built from pydicom's registry on first use (PEP 562), so that a program
that never asks for it (a sender) does not load pydicom.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["STORAGE_SOP_CLASSES", "is_storage_class", "is_other_service_class"]

_NOT_STORAGE = ("Storage Commitment", "Media Storage Directory")


def is_storage_class(uid: str) -> bool:
    """Whether pydicom names ``uid`` a storage SOP class (retired ones included)."""
    from pydicom.uid import UID

    info = UID(uid)
    if info.type != "SOP Class":
        return False
    name = info.name.removesuffix(" (Retired)")
    return (" Storage" in name or name.startswith("Storage")) and not name.startswith(_NOT_STORAGE)


@functools.lru_cache(maxsize=256)
def is_other_service_class(uid: str) -> bool:
    """Whether ``uid`` is a standard SOP class that is not a storage class (Verification,
    Query/Retrieve, worklist, commitment, MPPS ...): a C-STORE on its context is not a
    service of that class (PS3.7 C.5.8, 0x0211). Private and unknown UIDs are not; only
    UIDs under the DICOM root (1.2.840.10008.) consult pydicom's registry."""
    if not uid.startswith("1.2.840.10008."):
        return False
    from pydicom.uid import UID

    return UID(uid).type == "SOP Class" and not is_storage_class(uid)


#: The storage SOP classes, sorted by UID.
STORAGE_SOP_CLASSES: list[str]


def _storage_sop_classes() -> list[str]:
    from pydicom._uid_dict import UID_dictionary  # the registry pydicom.uid reads (retired UIDs included)

    return sorted(uid for uid, entry in UID_dictionary.items() if entry[1] == "SOP Class" and is_storage_class(uid))


def __getattr__(name: str) -> Any:
    if name == "STORAGE_SOP_CLASSES":
        value = globals()[name] = _storage_sop_classes()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
