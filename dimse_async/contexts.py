"""Which presentation contexts a set of files needs (PS3.7 §7.1.1.13, D.3.3.2).

:func:`inspect_file` reads a file's SOP class and transfer syntax (from its file meta
without decoding when it has one); :func:`plan_contexts` proposes one context per
(SOP class, stored syntax) plus an uncompressed one per class for transcoding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .acse import ContextSpec
from .dataset_check import NO_LIMIT, DataSetError, check_part10
from .lazy_dataclass import dataclass
from .part10 import read_file_meta
from .uids import ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["MAX_CONTEXTS", "FileInfo", "inspect_file", "plan_contexts"]

#: Presentation context ids are odd numbers 1-255 (PS3.8 §9.3.2.2).
MAX_CONTEXTS = 128


@dataclass(slots=True)
class FileInfo:
    """What planning the presentation contexts needs of a file (:func:`inspect_file`)."""

    path: str
    sop_class: str
    transfer_syntax: str
    size: int


def inspect_file(path: str, *, check: bool = False) -> FileInfo | str:
    """The file's SOP class, transfer syntax and size, or why it cannot be sent. Blocking.

    With ``check`` a Part 10 file's data set is parsed to its end in its declared
    transfer syntax: a file that is not what it claims is reported, not sent (a peer
    would abort the association on it)."""
    try:
        with open(path, "rb") as fp:
            meta = read_file_meta(fp)
            size = os.fstat(fp.fileno()).st_size
            if meta is not None and check:
                try:
                    summary = check_part10(fp, max_elements=NO_LIMIT)  # one's own files: no bound
                except DataSetError as exc:
                    return f"not a valid data set in its transfer syntax: {exc}"
                if not summary.sop_class_uid or not summary.sop_instance_uid:
                    return "the data set has no SOP Class or SOP Instance UID"
                return FileInfo(path, summary.sop_class_uid, meta.transfer_syntax, size)
        if meta is not None:
            return FileInfo(path, meta.sop_class_uid, meta.transfer_syntax, size)
        import pydicom  # a file without file meta: only pydicom can tell what it is

        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        sop_class = str(ds.get("SOPClassUID", ""))
        if not sop_class:
            return "not a DICOM instance (no SOP Class UID)"
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ImplicitVRLittleEndian)
        return FileInfo(path, sop_class, ts, size)
    except Exception as exc:
        return f"cannot read: {exc}"


def plan_contexts(items: Iterable[FileInfo]) -> list[ContextSpec]:
    """One context per (SOP class, stored syntax), plus an uncompressed one per class."""
    pairs: dict[tuple[str, str], None] = {}
    classes: dict[str, None] = {}
    for it in items:
        pairs[(it.sop_class, it.transfer_syntax)] = None
        classes[it.sop_class] = None
    specs = [ContextSpec(c, [ts]) for c, ts in pairs]
    for c in classes:
        if (c, ExplicitVRLittleEndian) not in pairs or (c, ImplicitVRLittleEndian) not in pairs:
            specs.append(ContextSpec(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    if len(specs) > MAX_CONTEXTS:
        raise ValueError(
            f"the files need {len(specs)} presentation contexts, more than the {MAX_CONTEXTS} one association can carry"
        )
    return specs
