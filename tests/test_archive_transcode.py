"""C-GET of stored instances by a peer that takes each storage class in one transfer
syntax only, other than the stored one (PS3.4 C.4.3: the SCP sends in a syntax the
peer accepted, or the sub-operation fails). pynetdicom is the peer; the instances are
pydicom's test files stored as they are (``dimse-async send`` engine).

- Taken in an uncompressed syntax (implicit / explicit little endian, explicit big
  endian, deflated): every instance arrives. One stored uncompressed equals DCMTK
  dcmconv's conversion of the original into that syntax, element by element (an
  independent converter: big endian word swapping of OW, OF, OD, OL, PS3.5 §7.3, and
  what implicit VR cannot say about private elements; 32 bits allocated in OW are
  swapped by 16-bit words, as DCMTK does, where pydicom reads big endian 32-bit values).
  One stored compressed arrives with its pixels decoded, equal to pydicom's decoding of
  the original, its other elements unchanged and a lossy original still marked lossy
  (PS3.3 C.7.6.1.1.5); one pydicom cannot decode fails (Failed SOP Instance UID List,
  a log line).
- Taken in JPEG Lossless only: what is stored otherwise is not converted into it;
  each such sub-operation fails, 0xA702 when none could be sent, with a log line.

The suite uses a dozen representative files; ``DIMSE_ASYNC_LONG=1`` the whole corpus."""

from __future__ import annotations

import array
import asyncio
import functools
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from test_archive_qr_hostile import Lines
from test_integrity import _PIXEL_DESCRIPTION, HOST, SERVE_AE, UNCOMPRESSED, pydicom_corpus, running_serve

from dimse_async import AE
from dimse_async.services.qr import MODELS
from dimse_async.services.send import send_files

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

LONG = os.environ.get("DIMSE_ASYNC_LONG") == "1"
#: One or two of each stored syntax, bit depth and kind the corpus has.
REPRESENTATIVE = {
    "CT_small.dcm",  # explicit VR little endian, 16 bits, private elements
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "rtdose_expb_1frame.dcm",  # big endian, 32 bits allocated (OW)
    "rtdose_1frame.dcm",  # implicit, 32 bits allocated
    "SC_rgb_small_odd_big_endian.dcm",
    "image_dfl.dcm",  # deflated
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL: decoded to RGB, lossy
    "JPEG-lossy.dcm",  # JPEG extended 12 bits that pydicom's handlers cannot decode
    "waveform_ecg.dcm",  # OW waveform data, private elements
    "rtplan.dcm",  # no pixel data, nested sequences
}
IMPLICIT, EXPLICIT, BIG, DEFLATED = UNCOMPRESSED_ORDER = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
)
DCMCONV = {IMPLICIT: "+ti", EXPLICIT: "+te", BIG: "+tb", DEFLATED: "+td"}
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
GET = MODELS["study"]["get"]
#: The lossy transfer syntaxes (PS3.5 A.4): JPEG baseline and extended, JPEG-LS near-lossless, JPEG 2000, HTJ2K.
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91",
         "1.2.840.10008.1.2.4.203"}  # fmt: skip


def c_get(port: int, groups: dict[tuple[str, str], list[str]], classes: set[str], syntax: str) -> tuple[
    list[tuple[int, list[str]]], dict[str, tuple[str, Dataset]]
]:  # fmt: skip
    """pynetdicom C-GETs each (study, series)'s instances, proposing every class with
    ``syntax`` alone (SCP role): the final (status, Failed SOP Instance UID List) of
    each, and what arrived by SOP Instance UID (the context's syntax, the data set)."""
    from pynetdicom import AE as PynetAE
    from pynetdicom import build_role, evt

    received: dict[str, tuple[str, Dataset]] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds)
        return 0

    ae = PynetAE(ae_title="PYGET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(GET)
    for sop_class in sorted(classes):
        ae.add_requested_context(sop_class, [syntax])
    roles = [build_role(c, scp_role=True) for c in sorted(classes)]
    assoc = ae.associate(HOST, port, ae_title=SERVE_AE, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    finals = []
    try:
        for (study, series), uids in groups.items():
            ident = Dataset()
            ident.QueryRetrieveLevel = "IMAGE"
            ident.StudyInstanceUID, ident.SeriesInstanceUID, ident.SOPInstanceUID = study, series, uids
            for status, identifier in assoc.send_c_get(ident, GET):
                if status and status.Status not in (0xFF00, 0xFF01):
                    failed = identifier.get("FailedSOPInstanceUIDList", []) if identifier is not None else []
                    finals.append((int(status.Status), [failed] if isinstance(failed, str) else list(failed)))
    finally:
        assoc.release()
    return finals, received


_WORDS = {"OW": "H", "OF": "I", "OL": "I", "OD": "Q", "OV": "Q"}


def elements(ds: Dataset, little: bool, skip: frozenset[int] = frozenset()) -> dict[int, Any]:
    """The data set's elements as comparable values (pixel data and group lengths aside),
    word-valued binary ones in little endian whatever the data set's byte order."""
    out: dict[int, Any] = {}
    for elem in ds:
        tag = int(elem.tag)
        if elem.tag.element == 0 or tag in (0x7FE00010, 0xFFFCFFFC) or tag in skip or elem.tag.group == 2:
            continue
        if elem.VR == "SQ":
            out[tag] = [elements(item, little) for item in elem.value]
        elif elem.VR in _WORDS and isinstance(elem.value, bytes) and not little:
            words = array.array(_WORDS[elem.VR], elem.value)
            words.byteswap()
            out[tag] = words.tobytes()
        else:
            value = elem.value
            out[tag] = bytes(value) if isinstance(value, bytes | bytearray) else value
    return out


def dcmconv(sources: list[Path], tmp: Path) -> dict[tuple[str, str], Path]:
    """DCMTK dcmconv's copy of each file in each uncompressed syntax (two at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {(source.name, syntax): tmp / f"{source.name}.{syntax}.dcm" for source in sources for syntax in DCMCONV}

    def convert(job: tuple[tuple[str, str], Path]) -> None:
        (name, syntax), out = job
        argv = ["/usr/bin/dcmconv", DCMCONV[syntax], str(next(s for s in sources if s.name == name)), str(out)]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(convert, jobs.items()))
    return jobs


@functools.cache
def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def problems(
    got: Dataset, syntax: str, original: Path, stored_syntax: str, converted: dict[tuple[str, str], Path]
) -> list[str]:
    """How an instance received in ``syntax`` differs from what was stored."""
    sent = read(original)
    if stored_syntax in UNCOMPRESSED:
        expected = read(converted[(original.name, syntax)])
        skip: frozenset[int] = frozenset()
    else:  # decoded: the pixel description follows the decoded pixels
        expected, skip = sent, frozenset(_PIXEL_DESCRIPTION)
    expected_little = stored_syntax != BIG if expected is sent else syntax != BIG
    want, have = elements(expected, expected_little, skip), elements(got, syntax != BIG, skip)
    if syntax == IMPLICIT and expected is sent:  # implicit VR does not say a private element's VR
        for values in (want, have):
            values.update({t: "private" for t in values if (t >> 16) % 2})
    out = [f"({t >> 16:04X},{t & 0xFFFF:04X}) {str(have.get(t))[:40]!r} != {str(want.get(t))[:40]!r}"
           for t in sorted(set(want) | set(have)) if want.get(t) != have.get(t)]  # fmt: skip
    if "PixelData" in sent:
        reference = expected if stored_syntax in UNCOMPRESSED else sent
        try:
            if syntax == BIG and reference is sent and int(got.get("BitsAllocated", 0)) > 16:
                # OW is swapped by 16-bit words (PS3.5 §7.3; DCMTK alike), whereas pydicom
                # reads 32-bit big endian pixel data as 32-bit values: compared as words.
                words = array.array("H", got.PixelData)
                words.byteswap()
                pixels = sent.pixel_array
                want = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
                same = words.tobytes()[: len(want)] == want
            else:
                same = np.array_equal(got.pixel_array, reference.pixel_array)
        except ValueError:  # pixels pydicom cannot describe (badVR.dcm: Number of Frames "1A"): as converted
            same = reference is expected and got.PixelData == expected.PixelData
        if not same:
            out.append("pixel data differs")
        if stored_syntax not in UNCOMPRESSED:
            lossy = stored_syntax in LOSSY or sent.get("LossyImageCompression") == "01"
            if (got.get("LossyImageCompression") == "01") != lossy:
                out.append("lossy marking")
    return out


async def test_retrieved_in_a_syntax_the_peer_takes_or_failed_with_the_reason(tmp_path: Path) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corpus = pydicom_corpus(src, None if LONG else REPRESENTATIVE)
        assert len(corpus) >= (100 if LONG else len(REPRESENTATIVE)), sorted(p.name for _ts, p in corpus.values())
        groups: dict[tuple[str, str], list[str]] = {}
        classes: set[str] = set()
        for uid, (_ts, path) in corpus.items():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            groups.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), []).append(uid)
            classes.add(str(ds.SOPClassUID))
    async with running_serve(tmp_path / "arch") as srv:
        report = await send_files(AE("SENDER"), HOST, srv.port, SERVE_AE, [str(p) for _, p in corpus.values()])
        assert not report.failed, [(r.path, r.error or r.status) for r in report.failed]
        with Lines() as log:  # the five C-GETs at once, on five associations
            syntaxes = (*UNCOMPRESSED_ORDER, JPEG_LOSSLESS)
            got = await asyncio.gather(*(asyncio.to_thread(c_get, srv.port, groups, classes, s) for s in syntaxes))
            results = dict(zip(syntaxes, got, strict=True))
    converted = dcmconv([p for ts, p in corpus.values() if ts in UNCOMPRESSED], tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for syntax in UNCOMPRESSED_ORDER:
            finals, received = results[syntax]
            failed = {uid for _status, uids in finals for uid in uids}
            for uid, (stored, path) in corpus.items():
                if uid in failed:  # only a compressed instance pydicom cannot decode
                    assert stored not in UNCOMPRESSED and uid not in received, (syntax, path.name)
                    with pytest.raises(Exception):  # noqa: B017 - whatever pydicom raises
                        _ = read(path).pixel_array
                    continue
                assert uid in received, (syntax, path.name, finals)
                arrived, got = received[uid]
                assert arrived == syntax
                assert not problems(got, syntax, path, stored, converted), (syntax, path.name)
            # (0xA702 where every sub-operation of a C-GET failed, C.4.3.1.3)
            assert all(status in (0x0000, 0xB000, 0xA702) for status, _uids in finals), (syntax, finals)
        # Nothing is converted into a compressed syntax: what is not stored in it fails.
        finals, received = results[JPEG_LOSSLESS]
        failed = {uid for _status, uids in finals for uid in uids}
        stored_in = {uid for uid, (ts, _p) in corpus.items() if ts == JPEG_LOSSLESS}
        assert set(received) == stored_in and failed == set(corpus) - stored_in
        assert {status for status, _uids in finals} <= {0xA702, 0xB000, 0x0000}
    not_possible = [m for m in log.lines if m.startswith("sub-operation not possible")]
    assert not_possible and any("JPEG" in m for m in not_possible), log.lines[:5]
