"""Storage SOP classes (PS3.4 Annex B, Table B.5-1), from pydicom's public UID registry.

Every non-retired SOP class whose name says it stores instances, including the
"- For Presentation" / "- For Processing" pairs (DX, MG, IO, Breast Projection X-Ray,
IVOCT, DICOS DX) whose names do not end in "Storage". Not storage classes: Storage
Commitment and Media Storage Directory (DICOMDIR, PS3.10).
"""

from __future__ import annotations

from pydicom import uid as _uid

__all__ = ["STORAGE_SOP_CLASSES", "is_storage_class"]

_NOT_STORAGE = ("Storage Commitment", "Media Storage Directory")


def is_storage_class(uid: str) -> bool:
    """Whether pydicom names ``uid`` a non-retired storage SOP class."""
    info = _uid.UID(uid)
    if info.type != "SOP Class" or info.is_retired:
        return False
    name = info.name
    return (" Storage" in name or name.startswith("Storage")) and not name.startswith(_NOT_STORAGE)


#: The storage SOP classes, sorted by UID.
STORAGE_SOP_CLASSES: list[str] = sorted(
    {str(v) for v in vars(_uid).values() if isinstance(v, _uid.UID) and is_storage_class(v)}
)
