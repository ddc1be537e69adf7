"""``serve`` never loses, overwrites or hides data, and answers as PS3.4 says: checked
with real peers (DCMTK storescu/findscu/getscu, pynetdicom as sender and SCU).

- a truncated re-send, a data set whose UIDs differ from the command's, and a
  different instance under a stored UID never replace what is stored;
- the duplicate policy ("keep" by default, "replace" with a complete valid instance);
- every storage SOP class of PS3.4 Annex B negotiates (serve and store-scp);
- instances without a Patient ID are not merged into one patient;
- C-FIND: Required keys with unknown values, keys the index does not hold,
  Retrieve AE Title, hierarchical queries without relational negotiation.

The storing and C-FIND tests run against both index back ends (the ``index``
fixture: SQLite, and a fresh database of a real PostgreSQL server).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import acknowledged, communicate, dcmtk, stop_process
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, generate_uid
from pynetdicom import AE as PynetdicomAE
from pynetdicom import _config as pynetdicom_config

from dimse_async import AE
from dimse_async.archive.config import ServeConfig
from dimse_async.archive.index import Archive
from dimse_async.archive.serve import archive_ae
from dimse_async.part10 import read_file_meta
from dimse_async.services.qr import MODELS
from dimse_async.sop_classes import STORAGE_SOP_CLASSES
from dimse_async.uids import STORE_TRANSFER_SYNTAXES
from dimse_async.uids import ExplicitVRBigEndian as EXPLICIT_BE

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

HOST = "127.0.0.1"
SERVE_AE = "ARCHIVE"
CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Running:
    port: int
    archive: Archive
    root: Path
    ae: AE
    server: Any = None


@contextlib.asynccontextmanager
async def running_serve(root: Path, **settings: object) -> AsyncIterator[Running]:
    """The ``serve`` AE (same wiring as the command) in this process, on loopback."""
    config = ServeConfig(ae_title=SERVE_AE, storage_dir=str(root), host=HOST, port=0)
    for key, value in settings.items():
        setattr(config, key, value)
    archive = Archive(
        root,
        duplicates=config.duplicates,
        fsync=config.fsync,
        retrieve_ae_title=config.ae_title,
        index=config.index,
        min_free_space=config.min_free_space,
    )
    archive.relational_retrieve = config.relational_retrieve
    await archive.reindex()
    ae = archive_ae(config)
    archive.install(ae)
    try:
        async with await ae.start_server(HOST, 0) as server:
            yield Running(server.port, archive, root, ae, server)
    finally:
        archive.close()


async def storescu(port: int, *paths: Path | str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    code, out, _ = await communicate(
        (dcmtk("storescu"), "-v", "-aec", SERVE_AE, *extra, HOST, str(port), *map(str, paths)),
        env=DCMTK_ENV,
        merge_stderr=True,
    )
    return code, out


def store_statuses(output: str) -> list[str]:
    """What storescu (-v) reported for each C-STORE, in order."""
    return [line.split("(", 1)[1].rstrip(")") for line in output.splitlines() if "Received Store Response" in line]


async def findscu(port: int, tmp: Path, *keys: str, model: str = "-S") -> tuple[str, list[Dataset]]:
    """findscu with ``-k`` keys; (final status text, response identifiers)."""
    out = tmp / f"find-{len(list(tmp.glob('find-*')))}"
    out.mkdir(parents=True)
    args = [dcmtk("findscu"), "-v", model, "-aec", SERVE_AE, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    _code, text, _ = await communicate((*args, HOST, str(port)), env=DCMTK_ENV, merge_stderr=True)
    finals = [line.split("(", 1)[1].rstrip(")") for line in text.splitlines() if "Received Final Find Response" in line]
    assert len(finals) == 1, text
    return finals[0], [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


async def getscu(port: int, out: Path, *keys: str) -> tuple[int, str]:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("getscu"), "-v", "-S", "-aec", SERVE_AE, "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    code, text, _ = await communicate((*args, HOST, str(port)), env=DCMTK_ENV, merge_stderr=True, timeout=60)
    return code, text


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a Part 10 file."""
    with path.open("rb") as fp:
        meta = read_file_meta(fp)
        assert meta is not None, path
        fp.seek(meta.dataset_offset)
        return meta.transfer_syntax, fp.read()


def same_dataset(a: Path, b: Path) -> bool:
    """Element by element (storescu re-encodes what it sends: group lengths and the
    data set trailing padding may go): the same tags, each with an equal value.

    An element whose encoded value is the same in both files (same bytes, same VR, both
    files of the same byte order and VR encoding) has the same value: only the others
    are decoded and compared as values (decoding every element of both files made
    this most of the kill -9 tests' time)."""
    x, y = pydicom.dcmread(a), pydicom.dcmread(b)

    def compared(ds: Dataset) -> list[BaseTag]:
        tags: list[BaseTag] = list(ds.keys())  # (iterating the data set would decode every element)
        return [tag for tag in tags if tag.element != 0x0000 and tag != 0xFFFCFFFC]

    tags = compared(x)
    if sorted(tags) != sorted(compared(y)):
        return False
    same_encoding = x.original_encoding == y.original_encoding
    for tag in tags:
        raw_x, raw_y = x.get_item(tag), y.get_item(tag)
        if (
            same_encoding
            and isinstance(raw_x, RawDataElement)
            and isinstance(raw_y, RawDataElement)
            and raw_x.VR == raw_y.VR
            and raw_x.value == raw_y.value
        ):
            continue
        if x[tag].value != y[tag].value:
            return False
    return True


def stored_file(root: Path, uid: str) -> Path:
    found = [p for p in root.rglob(f"{uid}.dcm") if ".incoming" not in p.parts]
    assert len(found) == 1, found
    return found[0]


def pynetdicom_store_files(port: int, paths: list[Path], sop_class: str) -> list[int]:
    """pynetdicom sends each file as it is on disk (its file meta UIDs in the command)."""
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = PynetdicomAE(ae_title="PYNETSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate(HOST, port, ae_title=SERVE_AE)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(p).Status) for p in paths]
        finally:
            assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


def pynetdicom_store_answers(port: int, paths: list[Path], sop_class: str) -> list[tuple[int, str]]:
    """pynetdicom C-STOREs each file (decoded by pydicom); (status, error comment) each."""
    ae = PynetdicomAE(ae_title="PYNETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate(HOST, port, ae_title=SERVE_AE)
    assert assoc.is_established
    try:
        out = []
        for path in paths:
            rsp = assoc.send_c_store(pydicom.dcmread(path))
            out.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
        return out
    finally:
        assoc.release()


def write_ct(path: Path, **attrs: object) -> Path:
    ds = pydicom.dcmread(CT)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- storing


async def test_truncated_resend_never_replaces_the_stored_instance(tmp_path: Path, index: str | None) -> None:
    """A 500-byte head of a stored instance, sent again (pynetdicom, as on disk): refused
    with 0xC000, the stored file and index untouched; getscu retrieves the original."""
    original = write_ct(tmp_path / "ct.dcm", SOPInstanceUID=generate_uid())
    uid = pydicom.dcmread(original).SOPInstanceUID
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(original.read_bytes()[:500])
    async with running_serve(tmp_path / "arch", duplicates="replace", index=index) as srv:
        code, out = await storescu(srv.port, original)
        assert code == 0 and store_statuses(out) == ["Success"], out
        before = stored_file(srv.root, uid).read_bytes()
        statuses = await asyncio.to_thread(pynetdicom_store_files, srv.port, [truncated], str(UID(CT_CLASS)))
        assert len(statuses) == 1 and statuses[0] & 0xF000 == 0xC000, [hex(s) for s in statuses]
        assert stored_file(srv.root, uid).read_bytes() == before
        study = pydicom.dcmread(original).StudyInstanceUID
        code, text = await getscu(srv.port, tmp_path / "got", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        assert code == 0, text
        (got,) = list((tmp_path / "got").iterdir())
        assert same_dataset(got, original)
        assert not list(srv.root.rglob("*.partial")) and not list(srv.root.rglob("*.old"))


CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


async def test_command_uids_must_equal_the_data_sets(tmp_path: Path, index: str | None) -> None:
    """A file whose meta names another instance than its data set (pynetdicom puts the
    meta's UIDs in the command): 0xA900, as DCMTK storescp answers; the instance named
    in the command keeps its content."""
    victim = write_ct(tmp_path / "victim.dcm", SOPInstanceUID=generate_uid(), PatientName="VICTIM^ONE")
    victim_uid = pydicom.dcmread(victim).SOPInstanceUID
    liar = pydicom.dcmread(CT)
    liar.SOPInstanceUID = generate_uid()
    liar.PatientName = "OTHER^ONE"
    liar.file_meta.MediaStorageSOPInstanceUID = victim_uid  # meta says victim, data set says otherwise
    liar_path = tmp_path / "liar.dcm"
    liar.save_as(liar_path)  # not enforce_file_format: that would make the meta agree
    async with running_serve(tmp_path / "arch", duplicates="replace", index=index) as srv:
        code, out = await storescu(srv.port, victim)
        assert code == 0 and store_statuses(out) == ["Success"], out
        before = stored_file(srv.root, victim_uid).read_bytes()
        statuses = await asyncio.to_thread(pynetdicom_store_files, srv.port, [liar_path], CT_CLASS)
        assert statuses == [0xA900], [hex(s) for s in statuses]
        assert stored_file(srv.root, victim_uid).read_bytes() == before
        assert not list(srv.root.rglob(f"{liar.SOPInstanceUID}.dcm"))


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (PS3.5 §7.1.2), padded to even length."""
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _ct_bytes(uid: str, *elements: tuple[int, bytes, bytes]) -> bytes:
    """A CT data set: the hierarchy's UIDs and ``elements`` in the order given (not sorted)."""
    base = [
        (0x00080016, b"UI", CT_CLASS.encode()),
        (0x00080018, b"UI", uid.encode()),
        (0x00100020, b"LO", b"ORDER"),
        (0x0020000D, b"UI", b"1.2.826.0.1.3680043.9.7433.2.1"),
        (0x0020000E, b"UI", b"1.2.826.0.1.3680043.9.7433.3.1"),
    ]
    return b"".join(_element(*e) for e in [*base, *elements])


async def test_repeated_or_unordered_elements_are_refused(tmp_path: Path) -> None:
    """PS3.5 §7.1: the elements of a data set or item ascend, each at most once. Readers
    disagree on a repeated one (pydicom, and so the index, takes the last; DCMTK the
    first): an instance whose second (0008,0018) matches the command while DCMTK reads
    another UID, or whose Patient ID differs between index and viewer. Refused with
    0xC000 and the reason logged, whether checked in memory or from a file (> 1 MiB)."""
    from dimse_async.part10 import encode_file_meta

    def item(*elements: bytes) -> tuple[int, bytes, bytes]:
        """A Request Attributes Sequence of one item holding ``elements``."""
        body = b"".join(elements)
        return (0x00400275, b"SQ", struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body)

    ref_class, ref_instance = _element(0x00081150, b"UI", CT_CLASS.encode()), _element(0x00081155, b"UI", b"1.2.3")
    big = (0x7FE00010, b"OW", bytes(2 << 20))  # checked from a file, not in memory
    patient = _element(0x00100020, b"LO", b"ORDER")
    cases = {
        # DCMTK reads 1.2.3.4; the command, the check and the index the second one
        "instance UID twice": lambda uid: _ct_bytes(uid).replace(
            _element(0x00080018, b"UI", uid.encode()),
            _element(0x00080018, b"UI", b"1.2.3.4") + _element(0x00080018, b"UI", uid.encode()),
        ),
        "patient ID twice": lambda uid: _ct_bytes(uid).replace(patient, patient + _element(0x00100020, b"LO", b"X")),
        "out of order, large": lambda uid: _ct_bytes(uid, (0x00100010, b"PN", b"LATE^NAME"), big),
        "item out of order": lambda uid: _ct_bytes(uid, item(ref_instance, ref_class)),
        "well formed": lambda uid: _ct_bytes(uid, item(ref_class, ref_instance), big),
    }
    files = {}
    for name, make in cases.items():
        uid = generate_uid()
        path = tmp_path / f"{len(files)}.dcm"
        path.write_bytes(encode_file_meta(CT_CLASS, uid, EXPLICIT_LE) + make(uid))
        files[name] = (uid, path)
    async with running_serve(tmp_path / "arch") as srv:
        paths = [p for _uid, p in files.values()]
        statuses = await asyncio.to_thread(pynetdicom_store_files, srv.port, paths, CT_CLASS)
        assert dict(zip(files, statuses)) == {**{n: 0xC000 for n in files if n != "well formed"}, "well formed": 0}
        for name, (uid, _path) in files.items():
            assert list(srv.root.rglob(f"{uid}.dcm")) == ([] if name != "well formed" else [srv.archive.path_for(uid)])
        assert not list(srv.root.rglob("*.partial"))


async def test_file_meta_elements_in_the_data_set_are_refused(tmp_path: Path) -> None:
    """A data set that begins with a group 0002 element (PS3.10 §7.2: file meta only)
    was stored with the element read back as part of the file meta, here as by pydicom
    (the retrieved data set lost it; a Transfer Syntax UID there changed how the rest
    was read, and the reason given for a refusal was wrong). Refused with 0xC000 saying
    so; nothing stored."""
    from rawpeer import RawPeer, pdata, response_status, rq_bytes

    from dimse_async.dimse import Command, CommandField, encode_command

    async with running_serve(tmp_path / "arch") as srv:
        peer = await RawPeer.connect(srv.port)
        await peer.associate(rq_bytes(called=SERVE_AE))
        answers = []
        for n, syntax in enumerate((EXPLICIT_LE, "1.2.840.10008.1.2"), 1):
            uid = generate_uid()
            command = Command(CommandField.C_STORE_RQ, message_id=n, affected_sop_class_uid=CT_CLASS,
                              affected_sop_instance_uid=uid, priority=0, data_set_type=0)  # fmt: skip
            dataset = _element(0x00020010, b"UI", syntax.encode()) + _ct_bytes(uid)
            await peer.send(pdata(3, encode_command(command), command=True) + pdata(3, dataset, command=False))
            reply = await peer.read_pdu()
            assert reply is not None
            answers.append(response_status(reply))
            assert not list(srv.root.rglob(f"{uid}.dcm"))
        await peer.release()
        await peer.close()
    assert answers == [(0x8001, 0xC000)] * 2, answers


async def test_duplicate_keep_is_the_default(tmp_path: Path, index: str | None) -> None:
    """Default policy: the same instance again is a success (it is stored); a different
    data set under the stored UID is refused (0xA900) and the stored one stays."""
    uid = generate_uid()
    first = write_ct(tmp_path / "first.dcm", SOPInstanceUID=uid, PatientName="FIRST^KEPT")
    other = write_ct(tmp_path / "other.dcm", SOPInstanceUID=uid, PatientName="SECOND^REFUSED")
    async with running_serve(tmp_path / "arch", index=index) as srv:
        _code, out = await storescu(srv.port, first, first, other)
        assert store_statuses(out) == ["Success", "Success", "Error: DataSetDoesNotMatchSOPClass"], out
        assert same_dataset(stored_file(srv.root, uid), first)
        study = pydicom.dcmread(first).StudyInstanceUID
        status, found = await findscu(
            srv.port, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}", "PatientName"
        )
        assert status == "Success" and [str(d.PatientName) for d in found] == ["FIRST^KEPT"]


async def test_a_stored_copy_truncated_on_disk_is_replaced_by_a_resend(tmp_path: Path, index: str | None) -> None:
    """Keep policy: the stored file of an instance lost its tail behind the archive's
    back (not the size it was stored at); the same instance sent again is stored (a
    success), not refused as a different data set in favour of the broken copy."""
    uid = generate_uid()
    first = write_ct(tmp_path / "first.dcm", SOPInstanceUID=uid)
    async with running_serve(tmp_path / "arch", index=index) as srv:
        _code, out = await storescu(srv.port, first)
        assert store_statuses(out) == ["Success"], out
        stored = stored_file(srv.root, uid)
        os.truncate(stored, stored.stat().st_size - 1000)
        _code, out = await storescu(srv.port, first)
        assert store_statuses(out) == ["Success"], out
        assert same_dataset(stored_file(srv.root, uid), first)
        assert await srv.archive.count() == 1


async def test_an_abort_while_a_replacement_is_placed_leaves_file_and_index_agreeing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replace policy: the sender of a new version aborts while its file is being written
    into place (the association's end cancels the handler; the writer thread goes on).
    The store is finished or undone before the instance is let go: the index describes
    the file that is there, so the stored instance stays retrievable (getscu)."""
    import threading

    from rawpeer import RawPeer, pdata, rq_bytes, store_rq

    import dimse_async.services.storage as storage_module
    from dimse_async.pdu import Abort

    uid = generate_uid()
    first = write_ct(tmp_path / "first.dcm", SOPInstanceUID=uid, PatientName="FIRST^VERSION")
    second = pydicom.dcmread(first)
    second.PatientName = "SECOND^VERSION"
    second.ImageComments = "a longer data set than the first"
    reached, go_on = threading.Event(), threading.Event()
    write_file = storage_module.write_file

    def held_write(dest: str, chunks: Any, durable: bool) -> Any:
        reached.set()
        go_on.wait(10)
        return write_file(dest, chunks, durable)

    async with running_serve(tmp_path / "arch", duplicates="replace") as srv:
        code, out = await storescu(srv.port, first)
        assert code == 0 and store_statuses(out) == ["Success"], out
        monkeypatch.setattr(storage_module, "write_file", held_write)
        peer = await RawPeer.connect(srv.port)
        await peer.associate(rq_bytes(called=SERVE_AE))
        command, dataset = store_rq(second)
        (theirs,) = [a for a in srv.server.associations if a.peer_ae == "RAW"]
        await peer.send(pdata(3, command, command=True) + pdata(3, dataset, command=False))
        assert await asyncio.to_thread(reached.wait, 10)
        await peer.send(Abort().encode())
        await peer.close()
        for _ in range(250):  # the server takes the abort: the store's handler is cancelled
            if theirs.is_closed:
                break
            await asyncio.sleep(0.02)
        assert theirs.is_closed
        go_on.set()
        await asyncio.wait_for(theirs.wait_closed(), 10)  # its tasks and file work ended
        monkeypatch.setattr(storage_module, "write_file", write_file)
        row = srv.archive.connection().execute("SELECT path, size FROM instances WHERE sop_uid = ?", (uid,))
        path, size = row.fetchone()
        assert os.path.getsize(path) == size, "the index describes another file than the one stored"
        name = str(pydicom.dcmread(path).PatientName)
        code, text = await getscu(srv.port, tmp_path / "got", "QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={uid}",
                                  f"StudyInstanceUID={second.StudyInstanceUID}",
                                  f"SeriesInstanceUID={second.SeriesInstanceUID}")  # fmt: skip
        assert code == 0, text
        (got,) = list((tmp_path / "got").iterdir())
        assert str(pydicom.dcmread(got).PatientName) == name


async def test_duplicate_replace_takes_a_valid_new_instance(tmp_path: Path, index: str | None) -> None:
    uid = generate_uid()
    first = write_ct(tmp_path / "first.dcm", SOPInstanceUID=uid, PatientName="FIRST^OLD")
    second = write_ct(tmp_path / "second.dcm", SOPInstanceUID=uid, PatientName="SECOND^NEW")
    async with running_serve(tmp_path / "arch", duplicates="replace", index=index) as srv:
        _code, out = await storescu(srv.port, first, second)
        assert store_statuses(out) == ["Success", "Success"], out
        assert same_dataset(stored_file(srv.root, uid), second)
        study = pydicom.dcmread(first).StudyInstanceUID
        status, found = await findscu(
            srv.port, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}", "PatientName"
        )
        assert status == "Success" and [str(d.PatientName) for d in found] == ["SECOND^NEW"]
        assert await srv.archive.count() == 1


# --------------------------------------------------------------------------- storage classes


def pynetdicom_negotiate(port: int, called: str, classes: list[str]) -> set[str]:
    """Propose ``classes`` (at most 128 per association); the abstract syntaxes accepted."""
    accepted: set[str] = set()
    for start in range(0, len(classes), 120):
        ae = PynetdicomAE(ae_title="PYNETSCU")
        ae.acse_timeout = ae.network_timeout = 30
        for uid in classes[start : start + 120]:
            ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate(HOST, port, ae_title=called)
        assert assoc.is_established
        accepted |= {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assoc.release()
    return accepted


FOR_PRESENTATION_PROCESSING = [
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.1.3",  # Intra-Oral
    "1.2.840.10008.5.1.4.1.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray
    "1.2.840.10008.5.1.4.1.1.13.1.5",
    "1.2.840.10008.5.1.4.1.1.14.1",  # IVOCT
    "1.2.840.10008.5.1.4.1.1.14.2",
    "1.2.840.10008.5.1.4.1.1.501.2.1",  # DICOS Digital X-Ray
    "1.2.840.10008.5.1.4.1.1.501.2.2",
]
PRIVATE_CLASS = "1.2.826.0.1.3680043.9.7433.1.1"


def test_storage_class_list_covers_annex_b() -> None:
    assert set(FOR_PRESENTATION_PROCESSING) <= set(STORAGE_SOP_CLASSES)
    assert "1.2.840.10008.1.20.1" not in STORAGE_SOP_CLASSES  # Storage Commitment
    assert "1.2.840.10008.1.3.10" not in STORAGE_SOP_CLASSES  # Media Storage Directory
    assert len(STORAGE_SOP_CLASSES) > 150


async def test_every_storage_class_negotiates_with_serve(tmp_path: Path) -> None:
    """pynetdicom proposes every storage SOP class (and a configured private one): serve accepts all."""
    wanted = [*STORAGE_SOP_CLASSES, PRIVATE_CLASS]
    async with running_serve(tmp_path / "arch", storage_classes=[PRIVATE_CLASS]) as srv:
        accepted = await asyncio.to_thread(pynetdicom_negotiate, srv.port, SERVE_AE, wanted)
    assert set(wanted) - accepted == set()


async def test_every_storage_class_negotiates_with_store_scp(tmp_path: Path) -> None:
    from dimse_async.cli import storage_ae

    class Args:
        aet = "STORESCP"
        any_called_ae = True
        max_associations = 10
        window = 4
        out = str(tmp_path / "out")
        sop_class = (PRIVATE_CLASS,)  # --sop-class

    ae = storage_ae(Args())  # type: ignore[arg-type]
    wanted = [*STORAGE_SOP_CLASSES, PRIVATE_CLASS]
    async with await ae.start_server(HOST, 0) as server:
        accepted = await asyncio.to_thread(pynetdicom_negotiate, server.port, "STORESCP", wanted)
    assert set(wanted) - accepted == set()
    assert set(FOR_PRESENTATION_PROCESSING) <= accepted


async def test_digital_xray_for_presentation_is_stored(tmp_path: Path) -> None:
    """A DX For Presentation instance from storescu lands in the archive."""
    dx = pydicom.dcmread(CT)
    dx.SOPClassUID = dx.file_meta.MediaStorageSOPClassUID = FOR_PRESENTATION_PROCESSING[0]
    dx.SOPInstanceUID = dx.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dx.Modality = "DX"
    path = tmp_path / "dx.dcm"
    dx.save_as(path, enforce_file_format=True)
    async with running_serve(tmp_path / "arch") as srv:
        code, out = await storescu(srv.port, path)
        assert code == 0 and store_statuses(out) == ["Success"], out
        assert same_dataset(stored_file(srv.root, dx.SOPInstanceUID), path)


# --------------------------------------------------------------------------- patients


async def test_empty_patient_ids_are_not_merged(tmp_path: Path, index: str | None) -> None:
    """Two studies of different people without a Patient ID: each study comes back with
    its own patient's name and sex, and a patient-level query finds two patients."""
    a = write_ct(tmp_path / "a.dcm", SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(),
                 SeriesInstanceUID=generate_uid(), PatientID="", PatientName="ANON^ANNA", PatientSex="F",
                 PatientBirthDate="19700101")  # fmt: skip
    b = write_ct(tmp_path / "b.dcm", SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(),
                 SeriesInstanceUID=generate_uid(), PatientID="", PatientName="NONAME^BEN", PatientSex="M",
                 PatientBirthDate="19800101")  # fmt: skip
    async with running_serve(tmp_path / "arch", index=index) as srv:
        _code, out = await storescu(srv.port, a, b)
        assert store_statuses(out) == ["Success", "Success"], out
        status, found = await findscu(
            srv.port, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientSex"
        )
        assert status == "Success"
        got = {str(d.StudyInstanceUID): (str(d.PatientName), str(d.PatientSex)) for d in found}
        want = {
            str(pydicom.dcmread(p).StudyInstanceUID): (
                str(pydicom.dcmread(p).PatientName),
                pydicom.dcmread(p).PatientSex,
            )
            for p in (a, b)
        }
        assert got == want
        status, patients = await findscu(
            srv.port, tmp_path, "QueryRetrieveLevel=PATIENT", "PatientName", "PatientID", model="-P"
        )
        assert status == "Success" and sorted(str(d.PatientName) for d in patients) == ["ANON^ANNA", "NONAME^BEN"]


# --------------------------------------------------------------------------- C-FIND (PS3.4 C.2.2, C.4.1)


@pytest.fixture
async def find_archive(tmp_path: Path, index: str | None) -> AsyncIterator[tuple[Running, dict[str, Dataset]]]:
    """Three studies: one with InstitutionName JFK Hospital and a study date, one with no
    study date and no accession number (unknown values), one at another institution;
    indexed in SQLite and in PostgreSQL (``index``)."""
    specs = {
        "jfk": {"InstitutionName": "JFK Hospital", "StudyDate": "20200105", "AccessionNumber": "ACC1",
                "StationName": "CT01", "Modality": "CT"},
        "unknown": {"InstitutionName": "Mercy", "StudyDate": "", "AccessionNumber": "", "StationName": "CT02",
                    "Modality": "CT"},
        "other": {"InstitutionName": "St Mary", "StudyDate": "20221111", "AccessionNumber": "ACC3",
                  "StationName": "MR01", "Modality": "MR"},
    }  # fmt: skip
    created = {"jfk": "20200110", "unknown": "20210315", "other": "20221111"}
    codes = {"jfk": "CTHEAD", "unknown": "CTCHEST", "other": "MRKNEE"}
    made = {}
    paths = []
    for n, (name, attrs) in enumerate(specs.items()):
        code = Dataset()
        code.CodeValue = codes[name]
        code.CodingSchemeDesignator = "LOCAL"
        code.CodeMeaning = codes[name].title()
        attrs = {**attrs, "InstanceCreationDate": created[name], "ProcedureCodeSequence": [code]}
        path = write_ct(tmp_path / f"{name}.dcm", SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(),
                        SeriesInstanceUID=generate_uid(), PatientID=f"PID{n}", PatientName=f"PAT^{name.upper()}",
                        **attrs)  # fmt: skip
        made[name] = pydicom.dcmread(path)
        paths.append(path)
    async with running_serve(tmp_path / "arch", index=index) as srv:
        _code, out = await storescu(srv.port, *paths)
        assert store_statuses(out) == ["Success"] * 3, out
        yield srv, made


def studies(found: list[Dataset]) -> set[str]:
    return {str(d.StudyInstanceUID) for d in found}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # keys the index does not hold are matched on the stored instance (C.2.2.2.1, C.2.2.2.4)
        (("InstitutionName=JFK*",), {"jfk"}),
        (("InstitutionName=Mercy",), {"unknown"}),
        (("StationName=CT0?",), {"jfk", "unknown"}),
        # universal matching of a key the index lacks: every study, with the value returned (C.2.2.2.3)
        (("InstitutionName",), {"jfk", "unknown", "other"}),
        # a zero-length value of a Required key is unknown and matches (C.2.2.1.2): range, single, wildcard
        (("StudyDate=20200101-20201231",), {"jfk", "unknown"}),
        (("StudyDate=20221111",), {"other", "unknown"}),
        (("AccessionNumber=ACC3",), {"other", "unknown"}),
        (("AccessionNumber=ACC*",), {"jfk", "other", "unknown"}),
        # List of UID Matching (C.2.2.2.2)
        (("StudyInstanceUID={jfk}\\{other}",), {"jfk", "other"}),
        # Range Matching on a date the index does not hold (C.2.2.2.5)
        (("InstanceCreationDate=20210101-20231231",), {"unknown", "other"}),
        (("InstanceCreationDate=-20200131",), {"jfk"}),
        # Sequence Matching on a sequence the index does not hold (C.2.2.2.6)
        (("ProcedureCodeSequence[0].CodeValue=CT*",), {"jfk", "unknown"}),
        (("ProcedureCodeSequence[0].CodeValue=MRKNEE",), {"other"}),
        # Single Value Matching of PN, case-insensitive here (C.2.2.2.1, conformance note)
        (("PatientName=pat^jfk",), {"jfk"}),
    ],
    ids=[
        "optional-wildcard",
        "optional-single",
        "optional-question-mark",
        "optional-universal",
        "required-unknown-range",
        "required-unknown-single",
        "required-unknown-accession",
        "required-unknown-wildcard",
        "uid-list",
        "optional-date-range",
        "optional-date-open-range",
        "sequence-wildcard",
        "sequence-single",
        "pn-case",
    ],
)
async def test_find_matching_rules(
    find_archive: tuple[Running, dict[str, Dataset]], tmp_path: Path, keys: tuple[str, ...], expected: set[str]
) -> None:
    srv, made = find_archive
    uids = {name: str(ds.StudyInstanceUID) for name, ds in made.items()}
    keys = tuple(k.format(**uids) for k in keys)
    status, found = await findscu(
        srv.port, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "InstitutionName", *keys
    )
    assert status == "Success"
    assert studies(found) == {uids[n] for n in expected}
    for ds in found:
        name = next(n for n, u in uids.items() if u == ds.StudyInstanceUID)
        assert ds.InstitutionName == made[name].InstitutionName  # returned from the stored instance
        assert ds.RetrieveAETitle == SERVE_AE  # C.4.1.1.3.2


async def test_series_query_without_study_uid_is_refused(
    find_archive: tuple[Running, dict[str, Dataset]], tmp_path: Path
) -> None:
    """No relational queries negotiated: a SERIES query needs the Study Instance UID (C.4.1.2.2.1)."""
    srv, made = find_archive
    status, found = await findscu(srv.port, tmp_path, "QueryRetrieveLevel=SERIES", "SeriesInstanceUID", "Modality=MR")
    assert status.startswith("Error") and not found, status
    study = str(made["other"].StudyInstanceUID)
    status, found = await findscu(
        srv.port, tmp_path, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID", "Modality"
    )
    assert status == "Success" and [d.Modality for d in found] == ["MR"]


async def test_relational_series_query_when_negotiated(find_archive: tuple[Running, dict[str, Dataset]]) -> None:
    """pynetdicom asks for relational queries (extended negotiation): granted, and a
    SERIES query without a Study Instance UID is answered."""
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    srv, made = find_archive
    find_class = MODELS["study"]["find"]

    def query() -> tuple[bytes | None, list[str], int]:
        ae = PynetdicomAE(ae_title="PYNETSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(find_class)
        ext = SOPClassExtendedNegotiation()
        ext.sop_class_uid = find_class
        ext.service_class_application_information = b"\x01"
        assoc = ae.associate(HOST, srv.port, ae_title=SERVE_AE, ext_neg=[ext])
        assert assoc.is_established
        try:
            granted = None
            for item in assoc.acceptor.user_information:
                if isinstance(item, SOPClassExtendedNegotiation):
                    granted = item.service_class_application_information
            ident = Dataset()
            ident.QueryRetrieveLevel = "SERIES"
            ident.SeriesInstanceUID = ""
            ident.Modality = "MR"
            got, final = [], 0
            for status, identifier in assoc.send_c_find(ident, find_class):
                if status.Status in (0xFF00, 0xFF01):
                    got.append(str(identifier.SeriesInstanceUID))
                else:
                    final = int(status.Status)
            return granted, got, final
        finally:
            assoc.release()

    granted, got, final = await asyncio.to_thread(query)
    assert granted == b"\x01" and final == 0
    assert got == [str(made["other"].SeriesInstanceUID)]


# --------------------------------------------------------------------------- disk full, read-only


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (skips when mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       check=True, capture_output=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {detail}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True, timeout=10)


def distinct_cts(tmp: Path, count: int) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return [
        write_ct(
            tmp / f"ct{i:03d}.dcm",
            SOPInstanceUID=generate_uid(),
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            InstanceNumber=i + 1,
        )
        for i in range(count)
    ]


def check_nothing_half_written(root: Path, archive_count: int, stored_ok: list[Path]) -> None:
    """Every file in the archive parses to its end, no spool is left, and exactly the
    instances answered with success are indexed."""
    from dimse_async.dataset_check import check_part10

    files = [p for p in root.rglob("*.dcm") if ".incoming" not in p.parts]
    for path in files:
        with path.open("rb") as fp:
            check_part10(fp)
    assert not list(root.rglob("*.partial")), list(root.rglob("*.partial"))
    assert archive_count == len(stored_ok) == len(files)
    by_name: dict[str, list[Path]] = {}  # as stored_file() finds them, from one walk of the archive
    for path in files:
        by_name.setdefault(path.name, []).append(path)
    for src in stored_ok:
        found = by_name.get(f"{pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID}.dcm", [])
        assert len(found) == 1, found
        assert same_dataset(found[0], src)


async def echo_ok(port: int) -> bool:
    code, _, _ = await communicate((dcmtk("echoscu"), "-aec", SERVE_AE, HOST, str(port)), env=DCMTK_ENV)
    return code == 0


async def test_disk_full_answers_out_of_resources_and_recovers(tmp_path: Path) -> None:
    """Storage on a 700 KB tmpfs, 30 x 39 KB instances from storescu: those that do not
    fit are answered 0xA700, nothing half-written is left or indexed, the server keeps
    answering, and once there is room again the same instances are stored."""
    files = distinct_cts(tmp_path, 30)
    with small_tmpfs(tmp_path / "arch", "700k") as root:
        async with running_serve(root, min_free_space=0) as srv:  # the writes themselves fail
            _code, out = await storescu(srv.port, *files, extra=("-nh",))  # -nh: go on after a failure
            statuses = store_statuses(out)
            assert len(statuses) == len(files), out
            ok = [f for f, s in zip(files, statuses) if s == "Success"]
            failed = [f for f, s in zip(files, statuses) if s != "Success"]
            assert ok and failed, statuses
            assert all(s == "Refused: OutOfResources" for s in statuses if s != "Success"), statuses
            assert await echo_ok(srv.port)
            check_nothing_half_written(root, await srv.archive.count(), ok)

            remount(root, "size=8m")
            _code, out = await storescu(srv.port, *failed)
            assert store_statuses(out) == ["Success"] * len(failed), out
            check_nothing_half_written(root, await srv.archive.count(), files)


async def test_read_only_storage_answers_out_of_resources(tmp_path: Path) -> None:
    """The directory an instance belongs in is a read-only file system: 0xA700, nothing
    left behind, queries still answered; once writable again the instance is stored."""
    first, second = distinct_cts(tmp_path, 2)
    async with running_serve(tmp_path / "arch") as srv:
        _code, out = await storescu(srv.port, first)
        assert store_statuses(out) == ["Success"], out
        shard = srv.archive.path_for(str(pydicom.dcmread(second).SOPInstanceUID)).parent
        with small_tmpfs(shard, "1m"):
            remount(shard, "ro")
            _code, out = await storescu(srv.port, second)
            assert store_statuses(out) == ["Refused: OutOfResources"], out
            study = str(pydicom.dcmread(first).StudyInstanceUID)
            status, found = await findscu(
                srv.port, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}", "PatientID"
            )
            assert status == "Success" and len(found) == 1
            assert await srv.archive.count() == 1
        _code, out = await storescu(srv.port, second)
        assert store_statuses(out) == ["Success"], out
        check_nothing_half_written(srv.root, await srv.archive.count(), [first, second])


async def test_index_failure_is_out_of_resources_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    """The index cannot be written (another process holds its write lock past the busy
    timeout, shortened here): 0xA700 whose comment says why, never a warning claiming
    the instance was stored; the file is removed again, and the instance is stored once
    the index is free."""
    import sqlite3

    from dimse_async.archive import backend_sqlite

    monkeypatch.setattr(backend_sqlite, "BUSY_TIMEOUT", 0.5)
    (ct,) = distinct_cts(tmp_path, 1)
    async with running_serve(tmp_path / "arch") as srv:
        await srv.archive.count()  # the index exists
        blocker = sqlite3.connect(srv.root / "index.sqlite", timeout=1)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            answers = await asyncio.to_thread(pynetdicom_store_answers, srv.port, [ct], CT_CLASS)
        finally:
            blocker.rollback()
            blocker.close()
        assert [a[0] for a in answers] == [0xA700], answers
        assert "locked" in answers[0][1], answers
        assert not [p for p in srv.root.rglob("*.dcm") if ".incoming" not in p.parts]
        answers = await asyncio.to_thread(pynetdicom_store_answers, srv.port, [ct], CT_CLASS)
        assert [a[0] for a in answers] == [0x0000], answers
        check_nothing_half_written(srv.root, await srv.archive.count(), [ct])


# --------------------------------------------------------------------------- kill -9


LISTENING = re.compile(r"listening on [\d.]+:(\d+);")


def start_serve_process(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    out = log.with_suffix(".stdout")
    with out.open("ab") as stdout, log.open("ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dimse_async", "serve", "--config", str(config), "--log-level", "WARNING"],
            stdout=stdout, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    seen = out.stat().st_size if out.exists() else 0
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        match = LISTENING.search(text, seen) if len(text) > seen else None
        if match:
            return proc, int(match[1])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc)
    pytest.fail(f"serve did not start:\n{out.read_text(errors='replace')}\n{log.read_text(errors='replace')}")


async def test_kill_9_during_ingest_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """storescu ingests into ``serve`` (a process); serve is killed with SIGKILL at random
    moments, several times, and restarted. After every restart each instance that got
    a success is found; at the end every instance is retrieved by getscu and equals
    what was sent, every stored file is complete and nothing else is indexed.
    CI: 150 instances, 3 kills; DIMSE_ASYNC_LONG=1: 500 instances, 8 kills."""
    long = os.environ.get("DIMSE_ASYNC_LONG") == "1"
    count, kills = (500, 8) if long else (150, 3)
    seed = int(time.time())
    rng = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    files = distinct_cts(src, count)
    by_path = {str(p): p for p in files}
    uids = {str(p): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    root = tmp_path / "arch"
    config = tmp_path / "serve.toml"
    config.write_text(f'ae_title = "{SERVE_AE}"\nhost = "{HOST}"\nport = 0\nstorage_dir = "{root}"\n')
    log = tmp_path / "serve.log"
    acked: set[str] = set()

    async def indexed_instances(port: int) -> set[str]:
        status, found = await findscu(
            port, tmp_path, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={series}", "SOPInstanceUID",
        )  # fmt: skip
        assert status == "Success"
        return {str(d.SOPInstanceUID) for d in found}

    killed_mid_ingest = 0
    for round_ in range(kills):
        proc, port = start_serve_process(config, log)
        try:
            assert not list(root.rglob("*.partial")), f"seed {seed}: spools left after restart"
            have = await indexed_instances(port)
            lost = {uids[p] for p in acked} - have
            assert not lost, f"seed {seed}, round {round_}: acknowledged instances lost {sorted(lost)[:5]}"
            assert have <= set(uids.values())
            todo = [by_path[p] for p in by_path if p not in acked]
            sender = asyncio.ensure_future(storescu(port, *todo, extra=("-nh", "-to", "5", "-ta", "5", "-td", "5")))
            # Kill after a random number of new files has appeared (at most half of what is
            # sent), so the kill lands mid-ingest however fast this machine is.
            before = len(list(root.rglob("*.dcm")))
            target = before + rng.randint(1, max(1, len(todo) // 2))
            deadline = time.monotonic() + 30
            while not sender.done() and time.monotonic() < deadline and len(list(root.rglob("*.dcm"))) < target:
                await asyncio.sleep(0.02)  # each look walks the archive: not so often that it slows the ingest
            if not sender.done():
                killed_mid_ingest += 1
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            _, out = await sender
            acked |= acknowledged(out)
        finally:
            stop_process(proc)
    assert killed_mid_ingest >= 1, f"seed {seed}: no kill happened during ingest"

    proc, port = start_serve_process(config, log)
    try:
        assert not list(root.rglob("*.partial"))
        have = await indexed_instances(port)
        assert {uids[p] for p in acked} <= have, f"seed {seed}: acknowledged instances lost"
        todo = [by_path[p] for p in by_path if p not in acked]
        if todo:
            _, out = await storescu(port, *todo, extra=("-nh",))
            acked |= acknowledged(out)
        assert acked == set(by_path), f"seed {seed}: {len(by_path) - len(acked)} never acknowledged"
        got = tmp_path / "got"
        code, text = await getscu(port, got, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                                  f"SeriesInstanceUID={series}")  # fmt: skip
        assert code == 0, text
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in got.iterdir()}
        assert set(received) == set(uids.values())
        for path, uid in uids.items():
            assert same_dataset(received[uid], by_path[path]), f"seed {seed}: {uid} differs"
    finally:
        assert stop_process(proc) == 0
    check_nothing_half_written(root, len(uids), files)


# --------------------------------------------------------------------------- dimse-async send


@contextlib.contextmanager
def dcmtk_storescp(out: Path, *options: str) -> Iterator[tuple[int, Path]]:
    from conftest import free_port, wait_tcp

    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}-storescp.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [dcmtk("storescp"), "-v", "-aet", "STORESCP", "-od", str(out), *options, str(port)],
            stdout=sink, stderr=subprocess.STDOUT, env=DCMTK_ENV, start_new_session=True,
        )  # fmt: skip
    try:
        wait_tcp(proc, port, log)
        yield port, log
    finally:
        stop_process(proc)


async def dimse_send(port: int, *paths: Path) -> tuple[int, str]:
    code, out, err = await communicate(
        (sys.executable, "-m", "dimse_async", "send", HOST, str(port), *map(str, paths), "--aec", "STORESCP",
         "--timeout", "20"),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    return code, out + err


async def test_send_puts_the_data_sets_uids_in_the_command(tmp_path: Path) -> None:
    """A file whose meta names another instance: the command carries the data set's
    UIDs, so DCMTK storescp (which answers 0xA900 to a mismatch) stores it under them."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # stale meta
    path = tmp_path / "stale-meta.dcm"
    ds.save_as(path)
    with dcmtk_storescp(tmp_path / "out") as (port, _log):
        code, text = await dimse_send(port, path)
        assert code == 0, text
        (got,) = list((tmp_path / "out").iterdir())
        assert pydicom.dcmread(got).SOPInstanceUID == ds.SOPInstanceUID


async def test_send_skips_a_file_that_is_not_what_it_claims(tmp_path: Path) -> None:
    """pydicom's SC_rgb_jpeg.dcm declares explicit VR but holds implicit VR: reported and
    skipped before anything is sent; the other files go on the same association."""
    liar = Path(get_testdata_file("SC_rgb_jpeg.dcm"))
    good = distinct_cts(tmp_path, 2)
    with dcmtk_storescp(tmp_path / "out") as (port, log):
        code, text = await dimse_send(port, good[0], liar, good[1])
        assert code == 1, text
        assert f"FAILED {liar}" in text and "not a valid data set" in text, text
        assert "sent 2/3" in text, text
        assert log.read_text(errors="replace").count("Association Acknowledged") == 1
    assert len(list((tmp_path / "out").iterdir())) == 2


async def test_send_opens_a_new_association_after_a_peer_abort(tmp_path: Path) -> None:
    """storescp --abort-after aborts every association after its first C-STORE-RQ: each
    file is then sent on a new association, none is failed unsent."""
    files = distinct_cts(tmp_path, 3)
    with dcmtk_storescp(tmp_path / "out", "--abort-after") as (port, log):
        code, text = await dimse_send(port, *files)
        assert code == 1, text  # no response ever came
        assert all(f"FAILED {f}" in text for f in files), text
        scp_log = log.read_text(errors="replace")
        assert scp_log.count("Association Acknowledged") == 3, scp_log
        assert scp_log.count("Received Store Request") == 3, scp_log


# --------------------------------------------------------------------------- retrieve: the pydicom corpus

#: getscu/movescu option that makes the transfer syntax the preferred one for incoming C-STOREs.
PREFER = {
    "1.2.840.10008.1.2.1": "+xe",
    "1.2.840.10008.1.2": "+xi",
    "1.2.840.10008.1.2.2": "+xb",
    "1.2.840.10008.1.2.1.99": "+xd",
    "1.2.840.10008.1.2.4.50": "+xy",
    "1.2.840.10008.1.2.4.51": "+xx",
    "1.2.840.10008.1.2.4.70": "+xs",
    "1.2.840.10008.1.2.4.80": "+xt",
    "1.2.840.10008.1.2.4.81": "+xu",
    "1.2.840.10008.1.2.4.90": "+xv",
    "1.2.840.10008.1.2.4.91": "+xw",
    "1.2.840.10008.1.2.5": "+xr",
}


def pydicom_corpus(dest: Path, only: set[str] | None = None) -> dict[str, tuple[str, Path]]:
    """Every pydicom test file with a storage SOP class whose data set is complete and
    names itself and its study and series: SOP Instance UID -> (transfer syntax, file). Files holding an instance
    already taken get a new UID of the same length patched in (encoding untouched).
    ``only``: just the files of these names."""
    import warnings

    from pydicom.data import get_testdata_files

    from dimse_async.dataset_check import DataSetError, check_part10

    out: dict[str, tuple[str, Path]] = {}
    names = sorted(get_testdata_files(), key=lambda n: (not n.endswith("dfl.dcm"), n))  # deflated first
    for n, name in enumerate(names):
        path = Path(name)
        if not path.is_file() or (only is not None and path.name not in only):
            continue
        with path.open("rb") as fp:
            meta = read_file_meta(fp)
            if meta is None:
                continue
            try:
                summary = check_part10(fp)
            except DataSetError:
                continue
        if summary.sop_class_uid not in STORAGE_SOP_CLASSES or not summary.sop_instance_uid:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
            except Exception:
                continue
        if not (ds.get("StudyInstanceUID") and ds.get("SeriesInstanceUID")):
            continue  # no place in the Q/R hierarchy: refused with 0xA900 (test_integrity elsewhere)
        data = path.read_bytes()
        uid = summary.sop_instance_uid
        if uid in out:
            if meta.transfer_syntax in ("1.2.840.10008.1.2.1.99",):
                continue
            head, _, last = uid.rpartition(".")
            new = f"{head}.{str(n).rjust(len(last), '1')[-len(last) :]}"
            if len(new) != len(uid) or new in out or new == uid:
                continue
            data = data.replace(uid.encode(), new.encode())
            uid = new
        target = dest / f"{len(out):03d}-{path.name}"
        target.write_bytes(data)
        out[uid] = (meta.transfer_syntax, target)
    return out


EXPLICIT_LE = "1.2.840.10008.1.2.1"
UNCOMPRESSED = {EXPLICIT_LE, "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_PIXEL_DESCRIPTION = {0x7FE00010, 0x00280004, 0x00280006, 0x00282110, 0x00282112, 0x00282114}


#: The lossy compressed transfer syntaxes (PS3.5 Annex A.4; pydicom 3.0's UID has no
#: ``is_lossless``): JPEG baseline / extended, JPEG-LS near-lossless, JPEG 2000, HTJ2K.
LOSSY_SYNTAXES = frozenset(
    ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91",
     "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"]
)  # fmt: skip


def same_decoded(got: Path, sent: Path, sent_syntax: str) -> bool:
    """A decompressed copy: every other element equal, the pixels equal to pydicom's
    decoding of the original, and a lossy original still marked lossy."""
    import numpy as np

    a, b = pydicom.dcmread(got), pydicom.dcmread(sent)

    def rest(ds: Dataset) -> dict[int, object]:
        return {int(e.tag): e.value for e in ds if e.tag.element and e.tag != 0xFFFCFFFC
                and int(e.tag) not in _PIXEL_DESCRIPTION}  # fmt: skip

    lossy = sent_syntax in LOSSY_SYNTAXES or b.get("LossyImageCompression") == "01"
    return (
        rest(a) == rest(b)
        and np.array_equal(a.pixel_array, b.pixel_array)
        and (a.get("LossyImageCompression") == "01") == lossy
    )


def received_by_uid(directory: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in directory.iterdir()}


async def test_pydicom_corpus_retrieved_by_getscu_and_movescu_in_its_own_syntax(tmp_path: Path) -> None:
    """The pydicom corpus is stored (``dimse-async send`` engine, one association), then
    retrieved per transfer syntax by DCMTK getscu and by movescu (its own storage SCP as
    the destination), each preferring that syntax: every instance arrives in its own
    transfer syntax and equals what was sent, element by element."""
    from conftest import free_port

    from dimse_async.services.send import send_files

    src = tmp_path / "corpus"
    src.mkdir()
    corpus = pydicom_corpus(src)
    assert len(corpus) >= 100, len(corpus)
    by_syntax: dict[str, list[str]] = {}
    for uid, (ts, _path) in corpus.items():
        by_syntax.setdefault(ts, []).append(uid)
    assert set(by_syntax) <= set(PREFER), set(by_syntax) - set(PREFER)
    async with running_serve(tmp_path / "arch", relational_retrieve=True) as srv:
        report = await send_files(AE("SENDER"), HOST, srv.port, SERVE_AE, [str(p) for _, p in corpus.values()])
        assert not report.failed, [(r.path, r.error or r.status) for r in report.failed]

        async def retrieve(n: int, ts: str, uids: list[str]) -> str:
            """getscu and movescu of one syntax's instances, at the same time; movescu's output."""
            keys = ["-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID=" + "\\".join(uids)]
            got_dir, move_dir = tmp_path / f"get-{ts}", tmp_path / f"move-{ts}"
            got_dir.mkdir()
            move_dir.mkdir()
            port, mover = free_port(), f"MOVESCU{n}"
            srv.ae.known_aes[mover] = (HOST, port)
            (code, text, _), (move_code, move_text, _) = await asyncio.gather(
                communicate(
                    (dcmtk("getscu"), "-S", "+B", "-aec", SERVE_AE, PREFER[ts], "-od", str(got_dir), *keys, HOST,
                     str(srv.port)),
                    env=DCMTK_ENV, merge_stderr=True, timeout=60,
                ),
                communicate(
                    (dcmtk("movescu"), "-v", "-S", "-aet", mover, "-aec", SERVE_AE, "-aem", mover, "+P", str(port),
                     PREFER[ts], "+B", *keys, HOST, str(srv.port)),
                    env=DCMTK_ENV, merge_stderr=True, timeout=60, cwd=move_dir,  # +B writes to the current directory
                ),
            )  # fmt: skip
            assert code == 0, text
            assert move_code == 0, move_text
            return move_text

        # Every syntax's retrievals at once (the comparisons below take their time anyway).
        syntaxes = sorted(by_syntax.items())
        move_texts = await asyncio.gather(*(retrieve(n, ts, uids) for n, (ts, uids) in enumerate(syntaxes)))
        for (ts, uids), move_text in zip(syntaxes, move_texts, strict=True):
            got_dir, move_dir = tmp_path / f"get-{ts}", tmp_path / f"move-{ts}"
            # movescu takes each instance in its own syntax. getscu (DCMTK 3.6.7) proposes
            # explicit VR little endian only for most of its preferences: what is stored in
            # another syntax then comes transcoded, compressed pixel data decoded by pydicom.
            for how, directory in (("movescu", move_dir), ("getscu", got_dir)):
                received = received_by_uid(directory)
                assert set(received) == set(uids), f"{how} {ts}: missing {sorted(set(uids) - set(received))[:3]}" + (
                    move_text if how == "movescu" else ""
                )
                for uid in uids:
                    got, sent = received[uid], corpus[uid][1]
                    arrived = dataset_bytes(got)[0]
                    want = {ts} if how == "movescu" else {ts, EXPLICIT_LE}
                    assert arrived in want, f"{how}: {sent.name} arrived in {arrived}"
                    if ts in UNCOMPRESSED or arrived == ts:
                        assert same_dataset(got, sent), f"{how}: {sent.name} differs"
                    else:
                        assert same_decoded(got, sent, ts), f"{how}: {sent.name} differs"


async def test_pydicom_corpus_compressed_retrieved_decompressed_by_a_peer_taking_explicit_le_only(
    tmp_path: Path,
) -> None:
    """Every compressed instance of the pydicom corpus, retrieved by a C-GET peer
    (pynetdicom) that takes Explicit VR Little Endian only: each one pydicom can decode
    here arrives decompressed, its pixels equal to pydicom's decoding of the original,
    every other element equal, a lossy one marked lossy (``same_decoded``); each one it
    cannot decode is a failed sub-operation, never sent in a syntax the peer refused."""
    import warnings

    from pynetdicom import build_role, evt

    from dimse_async.services.send import send_files

    src = tmp_path / "corpus"
    src.mkdir()
    corpus = {uid: (ts, path) for uid, (ts, path) in pydicom_corpus(src).items() if ts not in UNCOMPRESSED}
    assert len(corpus) >= 20, len(corpus)
    decodable = set()
    for uid, (_ts, path) in corpus.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pydicom.dcmread(path).pixel_array  # noqa: B018 - decoded here, or not
                decodable.add(uid)
            except Exception:
                pass
    assert len(decodable) >= 10, len(decodable)
    classes = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for _ts, p in corpus.values()})
    got_dir = tmp_path / "got"
    got_dir.mkdir()
    async with running_serve(tmp_path / "arch", relational_retrieve=True) as srv:
        report = await send_files(AE("SENDER"), HOST, srv.port, SERVE_AE, [str(p) for _, p in corpus.values()])
        assert not report.failed, [(r.path, r.error or r.status) for r in report.failed]

        def get() -> tuple[int, int, int]:
            arrived_in: set[str] = set()

            def on_store(event: Any) -> int:
                ds = event.dataset
                ds.file_meta = event.file_meta
                arrived_in.add(str(event.file_meta.TransferSyntaxUID))
                ds.save_as(got_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                return 0

            ae = PynetdicomAE(ae_title="GETSCU")
            ae.add_requested_context(MODELS["study"]["get"])
            for sop_class in classes:
                ae.add_requested_context(sop_class, [EXPLICIT_LE])
            assoc = ae.associate(HOST, srv.port, ae_title=SERVE_AE, evt_handlers=[(evt.EVT_C_STORE, on_store)],
                                 ext_neg=[build_role(c, scp_role=True) for c in classes])  # fmt: skip
            assert assoc.is_established
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.SOPInstanceUID = list(corpus)
            try:
                final = list(assoc.send_c_get(query, MODELS["study"]["get"]))[-1][0]
            finally:
                assoc.release()
            assert arrived_in <= {EXPLICIT_LE}, arrived_in
            return (int(final.Status), int(final.get("NumberOfCompletedSuboperations", 0)),
                    int(final.get("NumberOfFailedSuboperations", 0)))  # fmt: skip

        status, completed, failed = await asyncio.to_thread(get)
    received = received_by_uid(got_dir)
    assert set(received) == decodable, (sorted(set(received) ^ decodable)[:5], status)
    assert (completed, failed) == (len(decodable), len(corpus) - len(decodable))
    assert status == (0 if failed == 0 else 0xB000)
    for uid in decodable:
        ts, sent = corpus[uid]
        assert same_decoded(received[uid], sent, ts), f"{sent.name} ({ts}) differs"


# --------------------------------------------------------------------------- C-MOVE final response


async def test_move_ends_with_a_final_response_when_the_destination_aborts(tmp_path: Path) -> None:
    """The C-MOVE destination (DCMTK storescp --abort-after) aborts the sub-association on
    the first C-STORE: the SCU (pynetdicom) still gets a final response, with the
    sub-operation counts and every instance in the Failed SOP Instance UID List."""
    files = distinct_cts(tmp_path, 3)
    uids = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    move_class = MODELS["study"]["move"]
    with dcmtk_storescp(tmp_path / "dest", "--abort-after") as (dest_port, _log):
        async with running_serve(tmp_path / "arch") as srv:
            _code, out = await storescu(srv.port, *files)
            assert store_statuses(out) == ["Success"] * 3, out
            srv.ae.known_aes["DEST"] = (HOST, dest_port)

            def move() -> list[tuple[int, int | None, int | None, list[str]]]:
                ae = PynetdicomAE(ae_title="PYNETSCU")
                ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
                ae.add_requested_context(move_class)
                assoc = ae.associate(HOST, srv.port, ae_title=SERVE_AE)
                assert assoc.is_established
                ident = Dataset()
                ident.QueryRetrieveLevel = "STUDY"
                ident.StudyInstanceUID = study
                got = []
                try:
                    for status, identifier in assoc.send_c_move(ident, "DEST", move_class):
                        failed_list = []
                        if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                            value = identifier.FailedSOPInstanceUIDList
                            failed_list = [str(value)] if isinstance(value, str) else [str(v) for v in value]
                        got.append((
                            int(status.get("Status", -1)) if status else -1,
                            status.get("NumberOfCompletedSuboperations") if status else None,
                            status.get("NumberOfFailedSuboperations") if status else None,
                            failed_list,
                        ))  # fmt: skip
                finally:
                    if assoc.is_established:
                        assoc.release()
                return got

            responses = await asyncio.to_thread(move)
    assert responses, "no C-MOVE response at all"
    final_status, completed, failed, failed_list = responses[-1]
    assert final_status == 0xA702, responses  # every sub-operation failed (PS3.4 C.4.2.3.1)
    assert (completed, failed) == (0, 3), responses
    assert sorted(failed_list) == uids


# --------------------------------------------------------------------------- configuration, leftovers


def test_serve_settings_for_integrity(tmp_path: Path) -> None:
    from dimse_async.archive.config import load_config

    good = tmp_path / "good.toml"
    good.write_text(
        'duplicates = "replace"\nfsync = false\nstorage_classes = ["1.2.3.4"]\n'
        'transfer_syntaxes = ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"]\n'
    )
    cfg = load_config(good)
    assert (cfg.duplicates, cfg.fsync, cfg.storage_classes) == ("replace", False, ["1.2.3.4"])
    ae = archive_ae(cfg)
    assert ae.supported_contexts["1.2.3.4"].transfer_syntaxes == ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"]
    assert load_config(None).duplicates == "keep" and load_config(None).fsync is True
    for text, message in [
        ('duplicates = "overwrite"\n', "duplicates"),
        ('fsync = "yes"\n', "fsync"),
        ('storage_classes = ["not a uid"]\n', "storage_classes"),
        ("transfer_syntaxes = []\n", "transfer_syntaxes"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(bad)


async def test_start_removes_stale_spools_and_replacement_leftovers(tmp_path: Path) -> None:
    """What a killed store leaves (``.incoming/*.partial``, ``<uid>.dcm.partial``,
    ``<uid>.dcm.old``) is removed at start and never indexed."""
    root = tmp_path / "arch"
    (root / ".incoming").mkdir(parents=True)
    (root / ".incoming" / ".incoming-abc.partial").write_bytes(b"half")
    (root / "12" / "34").mkdir(parents=True)
    (root / "12" / "34" / "1.2.3.1234.dcm.partial").write_bytes(Path(CT).read_bytes()[:900])
    (root / "12" / "34" / "1.2.3.1234.dcm.old").write_bytes(Path(CT).read_bytes())
    async with running_serve(root) as srv:
        assert await srv.archive.count() == 0
    assert not list(root.rglob("*.partial")) and not list(root.rglob("*.old"))


# --------------------------------------------------------------------------- C-GET of a compressed instance


@pytest.mark.parametrize(
    ("proposed", "arrives"),
    [
        (["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"], "1.2.840.10008.1.2.5"),  # RLE first: as stored
        (["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"], "1.2.840.10008.1.2.1"),  # explicit first: decoded
        (["1.2.840.10008.1.2.1"], "1.2.840.10008.1.2.1"),  # nothing better offered: decoded
    ],
    ids=["rle-preferred", "explicit-preferred", "explicit-only"],
)
async def test_get_of_an_rle_instance_delivers_what_the_peer_takes(
    tmp_path: Path, proposed: list[str], arrives: str
) -> None:
    """An RLE-stored instance, pynetdicom C-GETs it proposing one storage context (SCP
    role) with ``proposed``: it arrives in the syntax the peer prefers, as stored when
    that is RLE, otherwise decoded into explicit VR LE with the same pixels."""
    import numpy as np
    from pynetdicom import build_role, evt

    rle = Path(get_testdata_file("MR_small_RLE.dcm"))
    original = pydicom.dcmread(rle)
    get_class = MODELS["study"]["get"]
    async with running_serve(tmp_path / "arch") as srv:
        from dimse_async.services.send import send_files

        report = await send_files(AE("SENDER"), HOST, srv.port, SERVE_AE, [str(rle)])  # stored as RLE
        assert not report.failed, report.results

        def get() -> tuple[int, list[tuple[str, Dataset]]]:
            received: list[tuple[str, Dataset]] = []

            def on_store(event: Any) -> int:
                received.append((str(event.context.transfer_syntax), event.dataset))
                return 0

            ae = PynetdicomAE(ae_title="PYNETSCU")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
            ae.add_requested_context(get_class)
            ae.add_requested_context(str(original.SOPClassUID), proposed)
            role = build_role(str(original.SOPClassUID), scp_role=True)
            assoc = ae.associate(
                HOST, srv.port, ae_title=SERVE_AE, ext_neg=[role], evt_handlers=[(evt.EVT_C_STORE, on_store)]
            )
            assert assoc.is_established
            ident = Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            ident.StudyInstanceUID = original.StudyInstanceUID
            final = -1
            try:
                for status, _identifier in assoc.send_c_get(ident, get_class):
                    if status and status.Status not in (0xFF00, 0xFF01):
                        final = int(status.Status)
            finally:
                assoc.release()
            return final, received

        final, received = await asyncio.to_thread(get)
    assert final == 0x0000
    ((syntax, got),) = received
    assert syntax == arrives
    if arrives == "1.2.840.10008.1.2.5":
        assert got.PixelData == original.PixelData
    else:
        got.file_meta = pydicom.dataset.FileMetaDataset()
        got.file_meta.TransferSyntaxUID = arrives
        assert np.array_equal(got.pixel_array, original.pixel_array)


async def test_too_many_open_files_is_out_of_resources_with_the_reason(tmp_path: Path) -> None:
    """The server process runs out of file descriptors while a C-STORE arrives
    (RLIMIT_NOFILE lowered to what is open): 0xA700 "Too many open files", nothing
    stored or indexed; with descriptors back, the same instance is stored."""
    import resource
    import threading

    (ct,) = distinct_cts(tmp_path, 1)
    ds = pydicom.dcmread(ct)
    async with running_serve(tmp_path / "arch") as srv:
        await srv.archive.count()
        ae = PynetdicomAE(ae_title="PYNETSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CT_CLASS, ["1.2.840.10008.1.2.1"])
        assoc = await asyncio.to_thread(ae.associate, HOST, srv.port, ae_title=SERVE_AE)
        assert assoc.is_established
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        answers: list[tuple[int, str]] = []
        done = threading.Event()

        go = threading.Event()

        def store() -> None:
            go.wait(10)
            rsp = assoc.send_c_store(ds)
            answers.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
            done.set()

        sender = threading.Thread(target=store)
        sender.start()  # the thread exists before the limit drops
        try:
            # A new descriptor gets the lowest free number: with the limit at that number none is given.
            for _ in range(10):
                try:
                    probe = os.open(os.devnull, os.O_RDONLY)
                except OSError:
                    break
                os.close(probe)
                resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
            else:
                pytest.fail("could not exhaust file descriptors")
            go.set()
            deadline = time.monotonic() + 20
            while not done.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        sender.join(10)
        assert answers and answers[0][0] == 0xA700, answers
        assert "Too many open files" in answers[0][1], answers
        assert await srv.archive.count() == 0
        assert not [p for p in srv.root.rglob("*.dcm") if ".incoming" not in p.parts]
        rsp = await asyncio.to_thread(assoc.send_c_store, ds)
        assert int(rsp.Status) == 0x0000
        await asyncio.to_thread(assoc.release)
        assert await srv.archive.count() == 1


# --------------------------------------------------------------------------- C-GET of files changed on disk


async def test_get_counts_a_file_gone_or_truncated_on_disk_as_a_failed_sub_operation(
    tmp_path: Path, index: str | None
) -> None:
    """Three instances of a study stored; then one file is deleted and one truncated
    behind the archive's back. A C-GET of the study sends the intact one only and ends
    with a warning (0xB000): 1 completed, 2 failed, both UIDs in the Failed SOP Instance
    UID List; never success for a partial study nor a truncated data set sent."""
    files = distinct_cts(tmp_path, 3)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    async with running_serve(tmp_path / "arch", index=index) as srv:
        _code, out = await storescu(srv.port, *files)
        assert store_statuses(out) == ["Success"] * 3, out
        stored_file(srv.root, uids[0]).unlink()
        truncated = stored_file(srv.root, uids[1])
        os.truncate(truncated, truncated.stat().st_size - 1000)
        scu = AE("GETSCU")
        scu.add_requested_context(MODELS["study"]["get"])
        scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [EXPLICIT_LE], scu_role=False, scp_role=True)
        received: list[str] = []

        async def sink(request: Any) -> int:
            received.append(request.sop_instance_uid)
            return 0

        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study
        async with scu.associate(HOST, srv.port, SERVE_AE) as assoc:
            responses = assoc.c_get(ident, store=sink)
            progress = [p async for p in responses]
        assert received == [uids[2]]
        final = progress[-1]
        assert int(responses.status) == 0xB000, responses.status
        assert (final.completed, final.failed, final.warning) == (1, 2, 0)
        assert sorted(final.failed_instances) == sorted(uids[:2])
        # The same by C-MOVE to a storage SCP of ours.
        dest = AE("DEST")
        dest.add_supported_context("1.2.840.10008.5.1.4.1.1.2", [EXPLICIT_LE])
        dest.on_c_store(sink)
        received.clear()
        async with await dest.start_server(HOST, 0) as dest_server:
            srv.ae.known_aes["DEST"] = (HOST, dest_server.port)
            mover = AE("MOVESCU")
            mover.add_requested_context(MODELS["study"]["move"])
            async with mover.associate(HOST, srv.port, SERVE_AE) as assoc:
                moved = assoc.c_move(ident, "DEST")
                progress = [p async for p in moved]
        assert received == [uids[2]]
        assert int(moved.status) == 0xB000, moved.status
        assert (progress[-1].completed, progress[-1].failed) == (1, 2)
        assert sorted(progress[-1].failed_instances) == sorted(uids[:2])


# --------------------------------------------------------------------------- Deflated Image Frame Compression

FRAME_DEFLATE = "1.2.840.10008.1.2.8.1"  # PS3.5 A.4.13: each frame deflated, the data set not


def frame_deflate_file(path: Path) -> Path:
    """CT_small.dcm in Deflated Image Frame Compression: its frame deflated into one
    fragment of encapsulated Pixel Data, the data set itself explicit VR little endian."""
    import zlib

    from pydicom.encaps import encapsulate

    from dimse_async.codec import encode_dataset
    from dimse_async.part10 import encode_file_meta

    ds = pydicom.dcmread(CT)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    ds.PixelData = encapsulate([deflate.compress(ds.PixelData) + deflate.flush()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.SOPInstanceUID = generate_uid()
    data = encode_dataset(ds, EXPLICIT_LE)
    path.write_bytes(encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), FRAME_DEFLATE) + data)
    return path


async def test_deflated_image_frame_compression_is_stored_and_retrieved_as_sent(tmp_path: Path) -> None:
    """Accepted when configured (transfer_syntaxes): its data set is not deflated as a
    whole (only the frames are), so it is checked, stored, indexed and sent back as is."""
    sent = frame_deflate_file(tmp_path / "frame-deflate.dcm")
    uid = str(pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID)
    study = str(pydicom.dcmread(sent, stop_before_pixels=True).StudyInstanceUID)
    ct = "1.2.840.10008.5.1.4.1.1.2"
    async with running_serve(tmp_path / "arch", transfer_syntaxes=[FRAME_DEFLATE, EXPLICIT_LE]) as srv:
        scu = AE("SCU")
        scu.add_requested_context(ct, [FRAME_DEFLATE])
        async with scu.associate(HOST, srv.port, SERVE_AE) as assoc:
            assert int(await assoc.c_store(sent)) == 0
        getter = AE("GETSCU")  # role selection is per SOP class: a second association
        getter.add_requested_context(MODELS["study"]["get"])
        getter.add_requested_context(ct, [FRAME_DEFLATE], scu_role=False, scp_role=True)
        got: list[tuple[str, bytes]] = []

        async def sink(request: Any) -> int:
            with request.open() as fp:
                meta = read_file_meta(fp)
                fp.seek(meta.dataset_offset)
                got.append((meta.transfer_syntax, fp.read()))
            return 0

        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study
        async with getter.associate(HOST, srv.port, SERVE_AE) as assoc:
            responses = assoc.c_get(ident, store=sink)
            _ = [p async for p in responses]
        assert int(responses.status) == 0, responses.status
        assert dataset_bytes(stored_file(srv.root, uid)) == dataset_bytes(sent)
    assert got == [dataset_bytes(sent)]


def _in_syntax(source: str, path: Path, syntax: str, **attrs: object) -> Path:
    """``source`` (a pydicom test file) written in ``syntax`` (uncompressed), with ``attrs`` set."""
    ds = pydicom.dcmread(source)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, implicit_vr=syntax == "1.2.840.10008.1.2", little_endian=True, enforce_file_format=True)
    return path


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm"])
async def test_duplicate_keep_answers_success_for_the_same_data_set_in_another_syntax(
    tmp_path: Path, index: str | None, name: str
) -> None:
    """Keep policy: a sender re-sending an instance in another transfer syntax (Implicit
    first, then Explicit VR Little Endian, then deflated: a retry, a router converting)
    holds the same data set: a success with an INFO log line, the first copy kept. A
    data set that differs (one value) under the same UID is still refused (0xA900)."""
    import io

    from dimse_async.log import configure_logging

    source = get_testdata_file(name)
    uid = generate_uid()
    implicit = _in_syntax(source, tmp_path / "implicit.dcm", "1.2.840.10008.1.2", SOPInstanceUID=uid)
    explicit = _in_syntax(source, tmp_path / "explicit.dcm", "1.2.840.10008.1.2.1", SOPInstanceUID=uid)
    deflated = _in_syntax(source, tmp_path / "deflated.dcm", "1.2.840.10008.1.2.1.99", SOPInstanceUID=uid)
    other = _in_syntax(source, tmp_path / "other.dcm", "1.2.840.10008.1.2.1", SOPInstanceUID=uid,
                       PatientName="SOMEONE^ELSE")  # fmt: skip
    async with running_serve(tmp_path / "arch", index=index) as srv:
        logged = io.StringIO()
        configure_logging("INFO", stream=logged, capture_warnings=False)
        try:
            _code, out = await storescu(srv.port, implicit, explicit, deflated, other)
        finally:
            configure_logging("WARNING", capture_warnings=False)  # as conftest
        assert store_statuses(out) == ["Success"] * 3 + ["Error: DataSetDoesNotMatchSOPClass"], out
        assert logged.getvalue().count("same data set in another encoding") == 2, logged.getvalue()
        stored = stored_file(srv.root, uid)
        assert read_file_meta(stored.open("rb")).transfer_syntax == "1.2.840.10008.1.2"  # the first copy kept
        assert same_dataset(stored, implicit)
        assert await srv.archive.count() == 1


async def test_duplicate_keep_answers_success_for_the_same_data_set_in_any_uncompressed_syntax(
    tmp_path: Path,
) -> None:
    """Keep policy: storescu sends CT_small and MR_small in Implicit VR Little Endian
    (stored so) and again as they are, then converting them to Explicit VR Little Endian
    (-xe), Explicit VR Big Endian (-xb: every number byte-swapped, PS3.5 §7.3) and
    deflated (-xd): the same data sets, each answered success, the first copies kept.
    In big endian, a copy whose Rows is 32768 (big endian 80 00, the stored 128's bytes)
    and one whose Patient's Name differs are refused 0xA900, the stored ones kept."""
    uid_ct, uid_mr = generate_uid(), generate_uid()
    ct = _in_syntax(CT, tmp_path / "ct.dcm", "1.2.840.10008.1.2", SOPInstanceUID=uid_ct)
    mr = _in_syntax(MR, tmp_path / "mr.dcm", "1.2.840.10008.1.2", SOPInstanceUID=uid_mr)
    rows = _in_syntax(CT, tmp_path / "rows.dcm", "1.2.840.10008.1.2", SOPInstanceUID=uid_ct, Rows=0x8000)
    name = _in_syntax(MR, tmp_path / "name.dcm", "1.2.840.10008.1.2", SOPInstanceUID=uid_mr,
                      PatientName="SOMEONE^ELSE")  # fmt: skip
    # -xe / -xb with +C propose one context of all uncompressed syntaxes for each SOP
    # class, and the acceptor's order picks (PS3.8 §9.3.3.2): big endian is had from an
    # archive preferring it, the same storage started again.
    big_endian_first = [EXPLICIT_BE, *(s for s in STORE_TRANSFER_SYNTAXES if s != EXPLICIT_BE)]
    runs = [
        ([], ((("-xi",), None, (ct, mr, ct, mr)), (("-xe", "+C"), "Little Endian Explicit", (ct, mr)),
              (("-xd",), "Deflated Explicit VR Little Endian", (ct, mr)))),
        (big_endian_first, ((("-xb", "+C"), "Big Endian Explicit", (ct, mr, rows, name)),)),
    ]  # fmt: skip
    for syntaxes, sends in runs:
        settings = {"transfer_syntaxes": syntaxes} if syntaxes else {}
        async with running_serve(tmp_path / "arch", **settings) as srv:
            for option, wire, files in sends:
                _code, out = await storescu(srv.port, *files, extra=(*option, "-R", "-nh"))
                if wire is not None:
                    assert out.count(f"-> {wire}") == len(files), out
                different = sum(f in (rows, name) for f in files)
                expected = ["Success"] * (len(files) - different) + ["Error: DataSetDoesNotMatchSOPClass"] * different
                assert store_statuses(out) == expected, (option, out)
            assert await srv.archive.count() == 2
    for uid, sent in ((uid_ct, ct), (uid_mr, mr)):
        stored = stored_file(tmp_path / "arch", uid)
        assert read_file_meta(stored.open("rb")).transfer_syntax == "1.2.840.10008.1.2"  # the first copy kept
        assert same_dataset(stored, sent)


async def test_duplicate_keep_past_the_compare_limit_keeps_the_byte_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the size up to which a re-send in another syntax is compared element by
    element, it is refused as before (0xA900): no decoding of arbitrarily large data."""
    import dimse_async.archive.ingest as ingest

    monkeypatch.setattr(ingest, "SAME_INSTANCE_COMPARE_BYTES", 1000)
    uid = generate_uid()
    implicit = _in_syntax(CT, tmp_path / "implicit.dcm", "1.2.840.10008.1.2", SOPInstanceUID=uid)
    explicit = _in_syntax(CT, tmp_path / "explicit.dcm", "1.2.840.10008.1.2.1", SOPInstanceUID=uid)
    async with running_serve(tmp_path / "arch") as srv:
        _code, out = await storescu(srv.port, implicit, implicit, explicit)
        assert store_statuses(out) == ["Success", "Success", "Error: DataSetDoesNotMatchSOPClass"], out


async def test_an_item_heavy_deflated_instance_is_refused_past_the_element_limit(tmp_path: Path) -> None:
    """storescu sends a deflated instance of 150,000 empty sequence items (a few KB on
    the wire, within the inflation limits) to an archive allowing 100,000 elements and
    items per data set: refused 0xC000, nothing stored, the peer's next instance stored."""
    from test_archive_ingest import _deflate, _item_heavy

    from dimse_async.inflate import InflationLimits
    from dimse_async.part10 import encode_file_meta

    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    heavy = tmp_path / "heavy.dcm"
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1.99")
    heavy.write_bytes(meta + _deflate(_item_heavy(150_000, ds)))
    fine = _in_syntax(CT, tmp_path / "fine.dcm", "1.2.840.10008.1.2.1.99", SOPInstanceUID=generate_uid())
    async with running_serve(tmp_path / "arch") as srv:
        srv.archive.inflation_limits = InflationLimits(max_elements=100_000)
        _code, out = await storescu(srv.port, heavy, fine, extra=("-xd", "-nh"))  # deflated on the wire
        assert out.count("-> Deflated Explicit VR Little Endian") == 2, out
        assert store_statuses(out) == ["Error: CannotUnderstand", "Success"], out
        assert await srv.archive.count() == 1
        assert not list(srv.root.rglob(f"{ds.SOPInstanceUID}.dcm"))
