"""Decompressing a stored instance for a peer that cannot take its transfer syntax.

pydicom's pixel data handlers do the work (its own RLE decoder; JPEG, JPEG-LS and
JPEG 2000 with pylibjpeg and its plugins, or Pillow, when installed). A lossy source
stays marked as such: Lossy Image Compression (0028,2110) "01" and the method in
(0028,2114) (PS3.3 C.7.6.1.1.5).
"""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset
from pydicom.uid import UID

from .exceptions import NoAcceptedContext

__all__ = ["decompress"]

#: Lossy Image Compression Method (0028,2114) per lossy transfer syntax family.
_LOSSY_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.93": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}


def decompress(ds: Dataset) -> Dataset:
    """A copy of ``ds`` with its pixel data decoded into explicit VR little endian.

    Raises :class:`NoAcceptedContext` when pydicom cannot decode it here (no handler
    installed for the syntax, or no pixel data to decode).
    """
    source = UID(str(ds.file_meta.TransferSyntaxUID))
    if "PixelData" not in ds:
        raise NoAcceptedContext(f"{source.name}: no pixel data to decompress")
    out = copy.deepcopy(ds)
    try:
        out.decompress(generate_instance_uid=False)
    except Exception as exc:
        raise NoAcceptedContext(f"cannot decompress {source.name}: {exc}"[:200]) from None
    method = _LOSSY_METHOD.get(str(source))
    if method is not None or str(ds.get("LossyImageCompression", "")) == "01":
        out.LossyImageCompression = "01"
        if method is not None:
            methods = [str(m) for m in ds.get("LossyImageCompressionMethod", []) or []]
            if isinstance(ds.get("LossyImageCompressionMethod"), str):
                methods = [str(ds.LossyImageCompressionMethod)]
            if method not in methods:
                methods.append(method)
            out.LossyImageCompressionMethod = methods if len(methods) > 1 else methods[0]
    return out
