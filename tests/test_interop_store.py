"""Storage service (C-STORE) against real, independent peers: no mocks.

Corpus: pydicom's bundled test files that are real instances (Part 10 file meta that
agrees with the data set, a storage SOP class, one file per SOP Instance UID, chosen
so that every transfer syntax in the collection is represented), plus a generated CT
series of 20 instances in a sub-directory.

1. DCMTK ``storescu`` -> our SCP, with several transfer syntax proposals. A relay in
   front of our SCP records the bytes storescu put on the wire, so every received
   file is checked against exactly what was sent: the data set bytes are identical,
   and the file meta names the negotiated transfer syntax. Against the original
   files the data sets are compared byte for byte where storescu sent them
   unchanged, element by element (and pixel by pixel) where it re-encoded them.
2. Our SCU -> DCMTK ``storescp`` (bit-preserving, so it writes what it received).
3. Our SCU -> pynetdicom SCP, and pynetdicom SCU -> our SCP.
4. Our SCU -> Orthanc, checked through its REST API.
5. ``dimse-async send`` -> ``dimse-async store-scp``, both as processes.

Everything is on 127.0.0.1, every wait is bounded and every process started here is
stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import communicate, dcmtk, free_port, kill_process, stop_process, wait_tcp
from normalized_helpers import park
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

import dimse_async as da
from dimse_async.acse import IMPLEMENTATION_CLASS_UID
from dimse_async.cli import storage_ae
from dimse_async.part10 import read_file_meta
from dimse_async.services.send import send_files
from dimse_async.services.storage import STORAGE_SOP_CLASSES, STORE_TRANSFER_SYNTAXES, DirectoryStore

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

HOST = "127.0.0.1"
WAIT = 30.0  # upper bound for any single wait on a peer
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK reads it; avoids Nagle delays
_SCRIPT = Path(sys.executable).with_name("dimse-async")
CLI: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dimse_async"]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"
UNCOMPRESSED = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE})
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

OUR_AE = "DIMSE_IT"
STORESCU_AE = "DCMTK_SCU"
PYNETDICOM_AE = "PYNETDICOM_SCU"

# The pydicom test file whose deflated data set has an odd length (padded with a NUL when sent).
ODD_DEFLATED = "image_dfl.dcm"


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Instance:
    """One corpus file: where it is and what its file meta says."""

    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset_offset: int

    @property
    def name(self) -> str:
        return self.path.name

    def dataset_bytes(self) -> bytes:
        with self.path.open("rb") as fp:
            fp.seek(self.dataset_offset)
            return fp.read()

    def sent_bytes(self) -> bytes:
        """The data set as our SCU puts it on the wire: an odd-length deflated stream
        travels with one NUL pad (PS3.5 A.5)."""
        data = self.dataset_bytes()
        return data + b"\x00" if len(data) % 2 else data

    def read(self) -> Dataset:
        return pydicom.dcmread(self.path)


@dataclass
class Corpus:
    root: Path  # pydicom/ and ct-series/ below it
    testdata: list[Instance]
    series: list[Instance]

    @property
    def all(self) -> list[Instance]:
        return self.testdata + self.series

    def named(self, name: str) -> Instance:
        for inst in self.all:
            if inst.name == name:
                return inst
        raise KeyError(name)

    def syntaxes(self) -> set[str]:
        return {i.transfer_syntax for i in self.testdata}


def _instance(path: Path) -> Instance | None:
    with path.open("rb") as fp:
        meta = read_file_meta(fp)
    if meta is None:
        return None
    return Instance(path, meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, meta.dataset_offset)


def _is_real_instance(inst: Instance) -> bool:
    """File meta that agrees with a data set pydicom reads cleanly, public elements with their VR."""
    if inst.sop_class not in STORAGE_SOP_CLASSES:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. a data set encoded unlike its meta says
            ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
            # The file meta must agree with the data set: peers name files by either.
            if ds.get("SOPClassUID") != inst.sop_class or ds.get("SOPInstanceUID") != inst.sop_instance:
                return False
    except Exception:
        return False
    if inst.transfer_syntax != IMPLICIT_LE:
        for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset would decode every element
            raw = ds.get_item(tag)
            if getattr(raw, "VR", None) == "UN" and not tag.is_private and tag in DicomDictionary:
                return False  # every element written as UN (a converter's artefact, not an instance)
    return True


def _with_new_uid(inst: Instance, dest: Path) -> Instance:
    """Copy ``inst`` with its SOP Instance UID replaced, byte for byte, by a new one of equal length."""
    old = inst.sop_instance
    head, _, last = old.rpartition(".")
    rng = random.Random(old)
    while True:
        digits = (
            str(rng.randrange(10 ** (len(last) - 1), 10 ** len(last))) if len(last) > 1 else str(rng.randrange(1, 10))
        )
        new = f"{head}.{digits}"
        if new != old:
            break
    data = inst.path.read_bytes()
    assert data.count(old.encode()) >= 2  # file meta and data set
    dest.write_bytes(data.replace(old.encode(), new.encode()))
    copied = _instance(dest)
    assert copied is not None and copied.sop_instance == new and copied.dataset_offset == inst.dataset_offset
    return copied


def _select_testdata(dest: Path) -> list[Instance]:
    """pydicom's real instances, one file per SOP Instance UID, every transfer syntax covered.

    Several files hold the same instance in different syntaxes. Per UID the file in the
    rarest syntax is kept; a syntax that only such duplicates have (RLE, here) is added
    from one of them with a new SOP Instance UID patched in, the encoding untouched.
    """
    groups: dict[str, list[Instance]] = collections.defaultdict(list)
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        inst = _instance(path)
        if inst is not None and _is_real_instance(inst):
            groups[inst.sop_instance].append(inst)
    frequency = collections.Counter(i.transfer_syntax for group in groups.values() for i in group)
    chosen = [min(group, key=lambda i: (frequency[i.transfer_syntax], i.name)) for group in groups.values()]
    out = []
    for inst in chosen:
        name = inst.name if inst.name.endswith(".dcm") else f"{inst.name}-{inst.sop_instance[-12:]}.dcm"
        assert not (dest / name).exists(), f"two corpus files named {name}"
        shutil.copyfile(inst.path, dest / name)
        out.append(Instance(dest / name, inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.dataset_offset))
    covered = {i.transfer_syntax for i in chosen}
    for syntax in sorted(set(frequency) - covered):
        inst = min((i for g in groups.values() for i in g if i.transfer_syntax == syntax), key=lambda i: i.name)
        out.append(_with_new_uid(inst, dest / f"newuid-{inst.name}"))
    return out


def _make_ct_series(source: Path, out: Path, count: int) -> list[Path]:
    """``count`` CT instances of one new study/series, built from CT_small.dcm."""
    base = pydicom.dcmread(source)
    study, series = generate_uid(), generate_uid()
    pixels = base.pixel_array
    x, y, z = (float(v) for v in base.ImagePositionPatient)
    paths = []
    for i in range(count):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x, y, z + 2.5 * i]
        ds.PixelData = (pixels + np.int16(i)).astype(pixels.dtype).tobytes()  # each slice differs
        path = out / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    testdata_dir, series_dir = root / "pydicom", root / "ct-series"
    testdata_dir.mkdir()
    series_dir.mkdir()
    testdata = _select_testdata(testdata_dir)
    series = [_instance(p) for p in _make_ct_series(Path(get_testdata_file("CT_small.dcm")), series_dir, 20)]
    corpus = Corpus(root, testdata, [s for s in series if s is not None])
    assert len(corpus.series) == 20
    assert len({i.sop_instance for i in corpus.all}) == len(corpus.all)
    return corpus


# --------------------------------------------------------------------------- data set comparison

_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_TRAILING_PADDING = Tag(0xFFFC, 0xFFFC)


def _swapped(data: bytes, size: int) -> bytes:
    if size == 1 or len(data) % size:
        return data
    return np.frombuffer(data, dtype=f"u{size}").byteswap().tobytes()


def _little(ts: str) -> bool:
    return ts != EXPLICIT_BE


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0)


def _decode_as(elem: Any, vr: str, little: bool) -> Any:
    """The value of an element held as raw bytes (UN), decoded as ``vr``."""
    raw = RawDataElement(elem.tag, vr, len(elem.value or b""), elem.value or b"", 0, False, little)
    return convert_raw_data_element(raw).value


def assert_same_dataset(sent: Dataset, got: Dataset, sent_ts: str, got_ts: str, where: str = "") -> None:
    """Element by element; binary values compared as bytes, swapped per word on an endianness change.

    Ignored: group lengths (retired, PS3.5 §7.2) and Data Set Trailing Padding, which a
    sender may drop (PS3.10 §7.2); both are recomputed or removed by DCMTK on re-encoding.
    """

    def tags(ds: Dataset) -> set[Any]:
        return {t for t in ds.keys() if t.element != 0x0000 and t != _TRAILING_PADDING}  # noqa: SIM118

    missing, extra = tags(sent) - tags(got), tags(got) - tags(sent)
    assert not missing and not extra, f"{where}: elements missing {sorted(missing)}, unexpected {sorted(extra)}"
    same_order = _little(sent_ts) == _little(got_ts)
    for tag in sorted(tags(sent)):
        raw_a, raw_b = sent.get_item(tag), got.get_item(tag)
        raw = isinstance(raw_a, RawDataElement) and isinstance(raw_b, RawDataElement)
        if same_order and raw and raw_a.value == raw_b.value:
            continue  # the same value bytes in the same byte order: no need to decode
        a, b = sent[tag], got[tag]
        here = f"{where}{tag}"
        if a.VR == "SQ" or b.VR == "SQ":
            assert a.VR == b.VR == "SQ", f"{here}: VR {a.VR} sent, {b.VR} received"
            assert len(a.value) == len(b.value), f"{here}: {len(a.value)} items sent, {len(b.value)} received"
            for n, (ia, ib) in enumerate(zip(a.value, b.value)):
                assert_same_dataset(ia, ib, sent_ts, got_ts, f"{here}[{n}]")
            continue
        va, vb = a.value, b.value
        if a.VR != b.VR and "UN" in (a.VR, b.VR):
            # Implicit VR, or a private element: one side could only keep the raw bytes.
            if a.VR == "UN":
                va = _decode_as(a, b.VR, _little(sent_ts))
            else:
                vb = _decode_as(b, a.VR, _little(got_ts))
        if _empty(va) and _empty(vb):
            continue
        if isinstance(va, bytes) and isinstance(vb, bytes):
            if _little(sent_ts) != _little(got_ts) and not (tag == _PIXEL_DATA and a.is_undefined_length):
                # Explicit VR names the word size; an implicit side only guesses it.
                vr = b.VR if got_ts != IMPLICIT_LE else a.VR
                vb = _swapped(vb, _WORD.get(vr, 1))
            assert va == vb, f"{here}: {len(va)} bytes sent, {len(vb)} received, values differ"
        else:
            assert va == vb, f"{here}: sent {va!r:.80}, received {vb!r:.80}"


def assert_same_pixels(sent: Dataset, got: Dataset, sent_ts: str, got_ts: str, where: str) -> bool:
    """Compare decoded pixel arrays when pydicom can decode the sent data; True if compared."""
    if "PixelData" not in sent:
        return False
    if _little(sent_ts) != _little(got_ts) and int(sent.get("BitsAllocated", 16)) > 16:
        # OW is swapped per 16-bit word (PS3.5 Table 6.2-1); pydicom reads 32-bit big endian
        # pixels as whole 32-bit values, so its arrays disagree with any conforming converter.
        return False
    try:
        expected = sent.pixel_array
    except Exception:  # no decoder for this syntax here (JPEG and friends)
        return False
    actual = got.pixel_array
    assert np.array_equal(expected, actual), f"{where}: decoded pixel data differ"
    return True


def file_meta(path: Path) -> Dataset:
    return pydicom.filereader.read_file_meta_info(path)


# --------------------------------------------------------------------------- processes


@dataclass
class Completed:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"{' '.join(self.argv)} -> exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


async def run(*argv: str, env: dict[str, str] | None = None, timeout: float = WAIT) -> Completed:
    """Run a program to completion without blocking the event loop (our SCP keeps serving)."""
    code, out, err = await communicate(argv, env=env, timeout=timeout)
    return Completed(argv, code, out, err)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    return stop_process(proc, timeout)


def _wait_tcp(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = WAIT) -> None:
    wait_tcp(proc, port, log, timeout)


@dataclass
class StoreSCP:
    port: int
    out: Path
    log: Path

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> file, from the file meta of what storescp wrote."""
        found = {}
        for path in self.out.iterdir():
            inst = _instance(path)
            assert inst is not None, f"storescp wrote {path.name}, which has no file meta"
            found[inst.sop_instance] = path
        return found


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """DCMTK storescp accepting every syntax it knows (+xa), bit-preserving (+B).

    ``+B`` makes storescp write the data set bytes exactly as received, so what it wrote
    can be compared byte for byte with what we sent.
    """
    port = free_port()
    out = tmp_path / "storescp-out"
    out.mkdir()
    log = tmp_path / "storescp.log"
    argv = [dcmtk("storescp"), "-v", "+xa", "+B", "-aet", "STORESCP", "-od", str(out), str(port)]
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        _wait_tcp(proc, port, log)
        yield StoreSCP(port, out, log)
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- our SCP


@dataclass
class OurSCP:
    server: da.Server
    out: Path
    store: DirectoryStore
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (calling AE, SOP instance, syntax)

    @property
    def port(self) -> int:
        return self.server.port

    def received(self) -> dict[str, Path]:
        return {p.stem: p for p in self.out.glob("*.dcm")}


@contextlib.asynccontextmanager
async def our_scp(
    out: Path, title: str = "DIMSE_ASYNC", syntaxes: Sequence[str] | None = None
) -> AsyncIterator[OurSCP]:
    """Our storage SCP on a free loopback port: every storage class, every syntax we know.

    With the default syntaxes the AE is the one ``dimse-async store-scp`` runs
    (``cli.storage_ae``); otherwise the same, built here with ``syntaxes`` in that order.
    """
    if syntaxes is None:
        options = argparse.Namespace(aet=title, any_called_ae=False, max_associations=8, window=4, out=str(out))
        ae = storage_ae(options)
    else:
        ae = da.AE(title, max_ops_performed=4)
        ae.add_supported_context(da.Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
    store = DirectoryStore(out)
    server = await ae.start_server(HOST, 0)
    scp = OurSCP(server, out, store)

    @ae.on_c_store
    async def on_store(request: Any) -> Any:
        scp.requests.append((request.calling_ae, request.sop_instance_uid, request.transfer_syntax))
        return await store(request)

    try:
        yield scp
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=5), 15)


def check_our_file_meta(path: Path, inst: Instance, transfer_syntax: str, calling_ae: str) -> None:
    meta = file_meta(path)
    assert meta.MediaStorageSOPClassUID == inst.sop_class, path.name
    assert meta.MediaStorageSOPInstanceUID == inst.sop_instance, path.name
    assert meta.TransferSyntaxUID == transfer_syntax, f"{inst.name}: stored as {meta.TransferSyntaxUID}"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle.strip() == calling_ae


@dataclass
class Checked:
    identical: int = 0  # data set bytes as in the original file
    transcoded: int = 0  # sent in another transfer syntax
    pixels: int = 0  # decoded pixel data compared


def check_received(received: dict[str, Path], wire: Wire, sent: dict[str, Instance], calling_ae: str) -> Checked:
    """Every file our SCP stored against the wire (exact) and against the original (same data).

    The peer may re-encode what it sends (another syntax; DCMTK also writes explicit-length
    sequences and drops trailing padding): the original then only has to decode to the
    same elements and pixels.
    """
    assert set(received) == set(sent) == set(wire.instances)
    checked = Checked()
    for uid, inst in sent.items():
        on_wire = wire.instances[uid]
        syntax = wire.accepted[on_wire.context_id]
        path = received[uid]
        check_our_file_meta(path, inst, syntax, calling_ae)
        assert on_wire.sop_class == inst.sop_class
        stored_syntax, stored = _stored_dataset(path)
        assert stored_syntax == syntax
        assert stored == on_wire.dataset, f"{inst.name}: stored data set differs from the one on the wire"
        if syntax == inst.transfer_syntax and stored == inst.dataset_bytes():
            checked.identical += 1
            continue
        checked.transcoded += syntax != inst.transfer_syntax
        original, got = inst.read(), pydicom.dcmread(path)
        assert_same_dataset(original, got, inst.transfer_syntax, syntax, f"{inst.name}: ")
        checked.pixels += assert_same_pixels(original, got, inst.transfer_syntax, syntax, inst.name)
    return checked


# --------------------------------------------------------------------------- wire tap


@dataclass
class WireInstance:
    context_id: int
    sop_class: str
    sop_instance: str
    dataset: bytes


@dataclass
class Wire:
    """What one association carried, decoded just enough to check the receiver."""

    proposed: set[str]  # abstract syntaxes the requestor proposed
    accepted: dict[int, str]  # presentation context id -> accepted transfer syntax
    instances: dict[str, WireInstance]


def _pdus(stream: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 6 <= len(stream):
        kind, length = stream[pos], struct.unpack_from(">I", stream, pos + 2)[0]
        yield kind, stream[pos + 6 : pos + 6 + length]
        pos += 6 + length


def _items(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        kind, length = data[pos], struct.unpack_from(">H", data, pos + 2)[0]
        yield kind, data[pos + 4 : pos + 4 + length]
        pos += 4 + length


def _command_uids(command: bytes) -> tuple[int, str, str]:
    """Command Field, Affected SOP Class and Instance UIDs of an implicit-LE command set."""
    values: dict[tuple[int, int], bytes] = {}
    pos = 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, pos)
        values[(group, elem)] = command[pos + 8 : pos + 8 + length]
        pos += 8 + length
    field_ = struct.unpack("<H", values[(0, 0x0100)])[0]
    uid = lambda key: values.get(key, b"").decode("ascii").rstrip("\0 ")  # noqa: E731
    return field_, uid((0, 0x0002)), uid((0, 0x1000))


def decode_wire(to_scp: bytes, to_scu: bytes) -> Wire:
    """PS3.8 §9.3: A-ASSOCIATE-AC contexts from the acceptor, C-STORE data sets from the requestor."""
    proposed: set[str] = set()
    for kind, body in _pdus(to_scp):
        if kind == 0x01:  # A-ASSOCIATE-RQ: same layout
            for item, value in _items(body[68:]):
                if item == 0x20:  # presentation context: abstract syntax sub-item 0x30
                    proposed |= {v.decode("ascii").rstrip("\0 ") for sub, v in _items(value[4:]) if sub == 0x30}
    accepted: dict[int, str] = {}
    for kind, body in _pdus(to_scu):
        if kind == 0x02:  # A-ASSOCIATE-AC: 68 fixed bytes, then variable items
            for item, value in _items(body[68:]):
                if item == 0x21 and value[2] == 0:  # presentation context, acceptance
                    for sub, uid in _items(value[4:]):
                        if sub == 0x40:
                            accepted[value[0]] = uid.decode("ascii").rstrip("\0 ")
    instances: dict[str, WireInstance] = {}
    command: dict[int, bytearray] = collections.defaultdict(bytearray)
    data: dict[int, bytearray] = collections.defaultdict(bytearray)
    pending: dict[int, tuple[str, str]] = {}
    for kind, body in _pdus(to_scp):
        if kind != 0x04:
            continue
        pos = 0
        while pos + 6 <= len(body):
            length = struct.unpack_from(">I", body, pos)[0]
            ctx, header = body[pos + 4], body[pos + 5]
            fragment = body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if header & 1:  # command fragment
                command[ctx] += fragment
                if header & 2:
                    cmd_field, sop_class, sop_instance = _command_uids(bytes(command.pop(ctx)))
                    if cmd_field == 0x0001:  # C-STORE-RQ
                        pending[ctx] = (sop_class, sop_instance)
            else:
                data[ctx] += fragment
                if header & 2:
                    sop_class, sop_instance = pending.pop(ctx)
                    instances[sop_instance] = WireInstance(ctx, sop_class, sop_instance, bytes(data.pop(ctx)))
    return Wire(proposed, accepted, instances)


class WireTap:
    """A TCP relay in front of a server that keeps a copy of every byte in each direction."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.connections: list[tuple[bytearray, bytearray]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> WireTap:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for task in self._tasks:
            task.cancel()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        to_server, to_client = bytearray(), bytearray()
        self.connections.append((to_server, to_client))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray) -> None:
            try:
                while data := await src.read(1 << 16):
                    record += data
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, to_server), pump(up_reader, writer, to_client))

    def wires(self) -> list[Wire]:
        return [decode_wire(bytes(a), bytes(b)) for a, b in self.connections]


# --------------------------------------------------------------------------- 1. storescu -> our SCP


@dataclass
class StorescuRun:
    attempted: dict[Path, str]  # file -> what storescu said about it
    succeeded: set[Path]


def parse_storescu(output: str, base: Path) -> StorescuRun:
    """Split ``storescu -v`` output into one block per file it tried to send."""
    attempted: dict[Path, str] = {}
    current: Path | None = None
    for line in output.splitlines():
        m = re.match(r"I: Sending file: (.*)$", line)
        if m:
            current = (base / m.group(1)).resolve()
            attempted[current] = ""
        elif current is not None:
            attempted[current] += line + "\n"
    succeeded = {p for p, text in attempted.items() if "Received Store Response (Success)" in text}
    return StorescuRun(attempted, succeeded)


# option -> the compressed syntax it makes storescu propose (None: uncompressed only)
STORESCU_PROPOSALS: dict[str, str | None] = {
    "-xi": None,
    "-xe": None,
    "-xb": None,
    "-xd": DEFLATED_LE,
    "-xy": JPEG_BASELINE,
    "-xx": JPEG_EXTENDED,
    "-xs": JPEG_LOSSLESS_SV1,
    "-xv": J2K_LOSSLESS,
    "-xw": J2K,
    "-xt": JPEG_LS_LOSSLESS,
    "-xu": JPEG_LS_NEAR,
    "-xr": RLE,
}


@pytest.mark.parametrize(
    "mode",
    ["default", "scan-directories", *STORESCU_PROPOSALS],
)
async def test_storescu_to_our_scp(mode: str, corpus: Corpus, tmp_path: Path) -> None:
    instances = corpus.all
    syntaxes: list[str] | None = None  # the store-scp AE
    if mode == "default":
        # storescu's defaults: all its storage classes, uncompressed syntaxes, one file per argument.
        options, inputs = [], [str(i.path) for i in instances]
    elif mode == "scan-directories":
        options, inputs = ["-R", "+sd", "+r"], [str(corpus.root)]
    elif mode == "-xb":
        # One context per SOP class with all uncompressed syntaxes (+C), and our SCP
        # preferring big endian: storescu has to convert every little endian file.
        syntaxes = [EXPLICIT_BE, *(s for s in STORE_TRANSFER_SYNTAXES if s != EXPLICIT_BE)]
        options, inputs = ["-R", "+C", mode], [str(i.path) for i in instances]
    elif STORESCU_PROPOSALS[mode] in (None, DEFLATED_LE):
        options, inputs = ["-R", mode], [str(i.path) for i in instances]
    else:  # a compressed proposal: the files stored in that syntax, and uncompressed ones beside them
        wanted = STORESCU_PROPOSALS[mode]
        instances = [i for i in corpus.testdata if i.transfer_syntax in (wanted, EXPLICIT_LE, IMPLICIT_LE)]
        instances += corpus.series[:3]
        options, inputs = ["-R", mode], [str(i.path) for i in instances]
    async with our_scp(tmp_path / "received", "OUR_SCP", syntaxes) as scp, WireTap(scp.port) as tap:
        done = await run(
            dcmtk("storescu"), "-v", "-nh", "-to", "10", "-ta", "10", "-td", "20",
            "-aet", STORESCU_AE, "-aec", "OUR_SCP", *options, HOST, str(tap.port), *inputs,
            env=DCMTK_ENV,
        )  # fmt: skip
    assert done.returncode == 0, done
    result = parse_storescu(done.stdout + done.stderr, Path.cwd())
    by_path = {i.path.resolve(): i for i in instances}
    assert set(result.attempted) == set(by_path), f"storescu did not try every file\n{done}"

    wires = tap.wires()
    assert len(wires) == 1, f"{len(wires)} associations"
    wire = wires[0]

    # Only storescu's own limits may keep a file back: it did not propose the SOP class,
    # or has no codec to convert a compressed file to what it proposed.
    for path, text in result.attempted.items():
        if path in result.succeeded:
            continue
        inst = by_path[path]
        if "No presentation context for" in text:
            assert inst.sop_class not in wire.proposed, f"{inst.name}: proposed, but not accepted\n{text}"
            continue
        assert inst.transfer_syntax not in UNCOMPRESSED, f"{inst.name} not stored:\n{text}"
        assert inst.transfer_syntax != STORESCU_PROPOSALS.get(mode), f"{inst.name} not stored:\n{text}"
        assert "unable to convert dataset" in text, f"{inst.name}: unexpected failure\n{text}"
    expect_compressed = STORESCU_PROPOSALS.get(mode)
    if expect_compressed is not None and expect_compressed != DEFLATED_LE:
        natives = [i for i in instances if i.transfer_syntax == expect_compressed]
        assert natives and all(i.path.resolve() in result.succeeded for i in natives)
        # ... and went out compressed, as stored.
        assert {wire.accepted[wire.instances[i.sop_instance].context_id] for i in natives} == {expect_compressed}

    # What arrived is exactly what storescu says it sent successfully.
    sent = {by_path[p].sop_instance: by_path[p] for p in result.succeeded}
    received = scp.received()
    assert set(received) == set(sent), f"received {len(received)} files for {len(sent)} sent\n{done}"
    assert all(calling == STORESCU_AE for calling, _, _ in scp.requests)
    checked = check_received(received, wire, sent, STORESCU_AE)

    # The proposal decided the syntax: check that it did what it says.
    used = collections.Counter(wire.accepted[wire.instances[u].context_id] for u in sent)
    if mode == "-xi":
        assert set(used) == {IMPLICIT_LE}, used
    if mode == "-xb":
        assert set(used) == {EXPLICIT_BE}, used
    if mode == "-xd":
        assert used[DEFLATED_LE] > 0 and checked.transcoded > 0
    if mode in ("default", "scan-directories", "-xe"):
        assert checked.identical >= len(sent) // 2, f"only {checked.identical} of {len(sent)} sent unchanged"
    if mode in ("-xi", "-xb"):
        assert checked.transcoded > 0 and checked.pixels > 0


# --------------------------------------------------------------------------- corpus sanity


def test_corpus_covers_every_syntax(corpus: Corpus) -> None:
    """What the other tests rely on: the syntaxes, the odd-length deflated file, the series."""
    syntaxes = corpus.syntaxes()
    assert syntaxes >= UNCOMPRESSED
    assert {JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, JPEG_LS_NEAR} <= syntaxes
    assert {J2K_LOSSLESS, J2K, RLE} <= syntaxes
    odd = corpus.named(ODD_DEFLATED)
    assert odd.transfer_syntax == DEFLATED_LE and len(odd.dataset_bytes()) % 2 == 1
    series = {pydicom.dcmread(i.path, stop_before_pixels=True).SeriesInstanceUID for i in corpus.series}
    assert len(series) == 1 and all(i.transfer_syntax == EXPLICIT_LE for i in corpus.series)


# --------------------------------------------------------------------------- 2. our SCU -> storescp


def _stored_dataset(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a Part 10 file."""
    with path.open("rb") as fp:
        meta = read_file_meta(fp)
        assert meta is not None, path
        fp.seek(meta.dataset_offset)
        return meta.transfer_syntax, fp.read()


async def test_our_scu_to_storescp(corpus: Corpus, storescp: StoreSCP) -> None:
    """The whole corpus through send_files: storescp writes the very bytes of each file."""
    instances = corpus.all
    report = await asyncio.wait_for(
        send_files(da.AE(OUR_AE), HOST, storescp.port, "STORESCP", [str(i.path) for i in instances], window=4),
        WAIT,
    )
    assert [(r.path, r.error or r.status) for r in report.failed] == []
    assert len(report.results) == len(instances)
    assert all(r.status == 0x0000 for r in report.results)
    received = storescp.received()
    assert set(received) == {i.sop_instance for i in instances}
    for inst in instances:
        path = received[inst.sop_instance]
        syntax, data = _stored_dataset(path)
        assert syntax == inst.transfer_syntax, inst.name  # never transcoded when the syntax was accepted
        assert data == inst.sent_bytes(), f"{inst.name}: storescp received other data set bytes"
        meta = file_meta(path)
        assert meta.MediaStorageSOPClassUID == inst.sop_class
        assert meta.SourceApplicationEntityTitle.strip() == OUR_AE


async def test_our_scu_transcodes_for_storescp(corpus: Corpus, storescp: StoreSCP) -> None:
    """Only Implicit VR LE accepted: explicit LE and big endian files are converted, JPEG decoded."""
    explicit = corpus.named("CT_small.dcm")
    big_endian = _instance(Path(get_testdata_file("MR_small_bigendian.dcm")))
    jpeg = corpus.named("SC_rgb_jpeg_dcmtk.dcm")
    assert big_endian is not None
    assert (explicit.transfer_syntax, big_endian.transfer_syntax) == (EXPLICIT_LE, EXPLICIT_BE)
    assert jpeg.transfer_syntax == JPEG_BASELINE
    contexts = [da.ContextSpec(c, [IMPLICIT_LE]) for c in (CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, SC_IMAGE_STORAGE)]
    ae = da.AE(OUR_AE, dimse_timeout=WAIT)
    async with ae.associate(HOST, storescp.port, "STORESCP", contexts=contexts) as assoc:
        assert [c.transfer_syntax for c in assoc.accepted_contexts] == [IMPLICIT_LE] * 3
        assert await assoc.c_store(explicit.path) == 0x0000
        assert await assoc.c_store(big_endian.path) == 0x0000
        assert await assoc.c_store(jpeg.path) == 0x0000  # decoded by pydicom, marked lossy
        assert await assoc.c_store(corpus.series[0].path) == 0x0000
    received = storescp.received()
    assert set(received) == {
        explicit.sop_instance, big_endian.sop_instance, jpeg.sop_instance, corpus.series[0].sop_instance,
    }  # fmt: skip
    decoded = pydicom.dcmread(received[jpeg.sop_instance])
    assert _stored_dataset(received[jpeg.sop_instance])[0] == IMPLICIT_LE
    assert decoded.LossyImageCompression == "01"
    assert (decoded.pixel_array == jpeg.read().pixel_array).all()
    for inst in (explicit, big_endian, corpus.series[0]):
        path = received[inst.sop_instance]
        assert _stored_dataset(path)[0] == IMPLICIT_LE
        original, got = inst.read(), pydicom.dcmread(path)
        assert_same_dataset(original, got, inst.transfer_syntax, IMPLICIT_LE, f"{inst.name}: ")
        assert assert_same_pixels(original, got, inst.transfer_syntax, IMPLICIT_LE, inst.name)


async def test_our_scu_sends_odd_length_deflated_file(corpus: Corpus, storescp: StoreSCP) -> None:
    inst = corpus.named(ODD_DEFLATED)
    ae = da.AE(OUR_AE, dimse_timeout=WAIT)
    contexts = [da.ContextSpec(inst.sop_class, [DEFLATED_LE])]
    async with ae.associate(HOST, storescp.port, "STORESCP", contexts=contexts) as assoc:
        assert await assoc.c_store(inst.path) == 0x0000
    syntax, data = _stored_dataset(storescp.received()[inst.sop_instance])
    assert syntax == DEFLATED_LE
    assert data == inst.dataset_bytes() + b"\x00"  # padded to even length with a NUL byte
    assert_same_dataset(inst.read(), pydicom.dcmread(storescp.received()[inst.sop_instance]), syntax, syntax)


# --------------------------------------------------------------------------- 3. pynetdicom


@dataclass
class PynetdicomStore:
    calling_ae: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset: Dataset
    encoded: bytes


@pytest.fixture
def pynetdicom_store_scp() -> Iterator[tuple[int, list[PynetdicomStore]]]:
    """A pynetdicom storage SCP in this process (its own threads): every storage class and syntax."""
    received: list[PynetdicomStore] = []
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        record = PynetdicomStore(
            event.assoc.requestor.ae_title,
            event.request.AffectedSOPClassUID,
            event.request.AffectedSOPInstanceUID,
            event.context.transfer_syntax,
            event.dataset,
            event.encoded_dataset(include_meta=False),
        )
        with lock:
            received.append(record)
        return 0x0000

    ae = PynetdicomAE("PYNETDICOM_SCP")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, received
    finally:
        server.shutdown()


async def test_our_scu_to_pynetdicom_scp(
    corpus: Corpus, pynetdicom_store_scp: tuple[int, list[PynetdicomStore]]
) -> None:
    port, received = pynetdicom_store_scp
    instances = corpus.all
    report = await asyncio.wait_for(
        send_files(da.AE(OUR_AE), HOST, port, "PYNETDICOM_SCP", [str(i.path) for i in instances], window=2), WAIT
    )
    assert [(r.path, r.error or r.status) for r in report.failed] == []
    assert sorted(int(r.status) for r in report.results if r.status is not None) == [0] * len(instances)
    by_uid = {r.sop_instance: r for r in received}
    assert len(received) == len(by_uid) == len(instances)
    for inst in instances:
        got = by_uid[inst.sop_instance]
        assert (got.calling_ae, got.sop_class) == (OUR_AE, inst.sop_class)
        assert got.transfer_syntax == inst.transfer_syntax, inst.name
        assert got.encoded == inst.sent_bytes(), f"{inst.name}: pynetdicom received other bytes"
        # pynetdicom's own decoding sees the same instance.
        assert got.dataset.SOPInstanceUID == inst.sop_instance
        assert got.dataset.SOPClassUID == inst.sop_class


def _pynetdicom_send(port: int, called: str, instances: Sequence[Instance]) -> list[tuple[str, int | None]]:
    """Blocking: one pynetdicom association, C-STORE each file as is, release."""
    ae = PynetdicomAE(PYNETDICOM_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class, syntax in sorted({(i.sop_class, i.transfer_syntax) for i in instances}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(HOST, port, ae_title=called)
    assert assoc.is_established, "pynetdicom could not associate with our SCP"
    # pynetdicom writes command and data set PDUs separately: without this, Nagle's algorithm
    # meets the receiver's delayed ACK and every C-STORE waits ~40 ms.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    statuses: list[tuple[str, int | None]] = []
    try:
        for inst in instances:
            park(assoc)
            rsp = assoc.send_c_store(inst.path)
            statuses.append((inst.sop_instance, int(rsp.Status) if "Status" in rsp else None))
    finally:
        assoc.release()
    return statuses


async def test_pynetdicom_scu_to_our_scp(corpus: Corpus, tmp_path: Path) -> None:
    instances = corpus.all
    async with our_scp(tmp_path / "received", "OUR_SCP") as scp, WireTap(scp.port) as tap:
        statuses = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_send, tap.port, "OUR_SCP", instances), WAIT)
    assert statuses == [(i.sop_instance, 0x0000) for i in instances]
    (wire,) = tap.wires()
    # pynetdicom sends each file in its own syntax (re-encoding some data sets on the way).
    assert {uid: wire.accepted[w.context_id] for uid, w in wire.instances.items()} == {
        i.sop_instance: i.transfer_syntax for i in instances
    }
    checked = check_received(scp.received(), wire, {i.sop_instance: i for i in instances}, PYNETDICOM_AE)
    assert checked.transcoded == 0 and checked.identical > len(instances) // 2


# --------------------------------------------------------------------------- 4. Orthanc

ORTHANC = "/usr/sbin/Orthanc"


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    log: Path

    def request(self, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://{HOST}:{self.http_port}{path}", data=body)
        with urllib.request.urlopen(req, timeout=10) as rsp:
            data = rsp.read()
        return json.loads(data) if rsp.headers.get_content_type() == "application/json" else data

    async def get(self, path: str, body: bytes | None = None) -> Any:
        return await asyncio.to_thread(self.request, path, body)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc with a throw-away configuration: loopback clients only, storage in tmp_path."""
    if not os.access(ORTHANC, os.X_OK):
        pytest.fail(f"{ORTHANC} not found: install Orthanc (apt-get install -y orthanc)")
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    storage = tmp_path / "orthanc-db"
    config = {
        "Name": "dimse-async-interop",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [],
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP from 127.0.0.1 only
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": False,
        # C-STORE only from our AE title on the loopback address.
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {"interop": [OUR_AE, HOST, 104]},
        "ConcurrentJobs": 1,
        "SaveJobs": False,
    }
    config_file = tmp_path / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    log = tmp_path / "orthanc.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([ORTHANC, str(config_file)], stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path)
    peer = Orthanc(dicom_port, http_port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                system = peer.request("/system")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc's HTTP port did not answer within 30 s:\n{log.read_text(errors='replace')}")
                time.sleep(0.1)
        assert system["DicomPort"] == dicom_port and system["DicomAet"] == "ORTHANC"
        _wait_tcp(proc, dicom_port, log)
        yield peer
    finally:
        kill_process(proc)  # its storage is thrown away: no graceful shutdown to wait for


async def test_our_scu_to_orthanc(corpus: Corpus, orthanc: Orthanc) -> None:
    """One instance per transfer syntax (compressed ones included) and part of the CT series."""
    per_syntax: dict[str, Instance] = {}
    for inst in corpus.testdata:
        if inst.name == ODD_DEFLATED or inst.transfer_syntax in per_syntax:
            continue
        ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
        # Orthanc files instances by patient/study/series: it refuses (0xA700) those without.
        if "PatientID" in ds and ds.get("StudyInstanceUID") and ds.get("SeriesInstanceUID"):
            per_syntax[inst.transfer_syntax] = inst
    instances = [*per_syntax.values(), *corpus.series[:5]]
    # pydicom's JPEG-LS near-lossless files have no patient/study/series: none to send here.
    assert set(per_syntax) == corpus.syntaxes() - {DEFLATED_LE, JPEG_LS_NEAR}
    refused = corpus.named("JPEGLSNearLossless_08.dcm")
    paths = [str(i.path) for i in instances]
    paths.insert(3, str(refused.path))
    ae = da.AE(OUR_AE, dimse_timeout=WAIT)
    report = await asyncio.wait_for(send_files(ae, HOST, orthanc.dicom_port, "ORTHANC", paths), WAIT)
    # Orthanc's refusal is a failure status for that instance only; the rest goes through.
    assert [(r.path, int(r.status)) for r in report.failed if r.status is not None] == [(str(refused.path), 0xA700)]
    assert len(report.failed) == 1 and len(report.results) == len(paths)
    assert all(r.status == 0x0000 for r in report.results if r.path != str(refused.path))

    listed = await orthanc.get("/instances")
    assert len(listed) == len(instances)
    for inst in instances:
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": inst.sop_instance}}
        found = await orthanc.get("/tools/find", json.dumps(query).encode())
        assert len(found) == 1, f"{inst.name}: Orthanc found {found}"
        ident = found[0]
        assert ident in listed
        tags = await orthanc.get(f"/instances/{ident}/tags?simplify")
        assert (tags["SOPInstanceUID"], tags["SOPClassUID"]) == (inst.sop_instance, inst.sop_class)
        metadata = {k: await orthanc.get(f"/instances/{ident}/metadata/{k}") for k in ("TransferSyntax", "RemoteAET")}
        assert metadata == {"TransferSyntax": inst.transfer_syntax.encode(), "RemoteAET": OUR_AE.encode()}
        # What Orthanc stored decodes to the instance we sent.
        stored = pydicom.dcmread(io.BytesIO(await orthanc.get(f"/instances/{ident}/file")))
        assert stored.file_meta.TransferSyntaxUID == inst.transfer_syntax
        assert_same_dataset(inst.read(), stored, inst.transfer_syntax, inst.transfer_syntax, f"{inst.name}: ")


# --------------------------------------------------------------------------- 5. dimse-async CLI


@contextlib.asynccontextmanager
async def cli_store_scp(out: Path, log: Path) -> AsyncIterator[tuple[int, asyncio.subprocess.Process, list[str]]]:
    """``dimse-async store-scp`` on a free port (``--port 0``); yields the port it reports."""
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "store-scp", "--host", HOST, "--port", "0", "--out", str(out), "--aet", "CLI_SCP",
            "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE, stderr=sink,
        )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        m = re.search(r"listening on [\d.]+:(\d+)", first)
        assert m, f"store-scp said {first!r}\n{log.read_text(errors='replace')}"
        yield int(m.group(1)), proc, lines
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stdout.read(), WAIT)
        lines.extend(rest.decode().splitlines())
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)


async def test_cli_send_to_cli_store_scp(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "cli-in"
    series_dir = corpus.series[0].path.parent
    good = [corpus.named("CT_small.dcm"), corpus.named("SC_rgb_jpeg_dcmtk.dcm")]
    junk = tmp_path / "notes.txt"
    junk.write_text("not a DICOM file\n" * 20)
    async with cli_store_scp(out, tmp_path / "store-scp.log") as (port, _proc, lines):
        sent = await run(
            *CLI, "send", HOST, str(port), str(series_dir), "--recurse", "--aec", "CLI_SCP", "--aet", "CLI_SCU",
            "--window", "4", "--timeout", "20",
        )  # fmt: skip
        assert sent.returncode == 0, sent
        assert f"sent {len(corpus.series)}/{len(corpus.series)} instances" in sent.stdout, sent
        assert "FAILED" not in sent.stderr

        partial = await run(
            *CLI, "send", HOST, str(port), str(good[0].path), str(junk), str(good[1].path), "--aec", "CLI_SCP",
            "--aet", "CLI_SCU", "--timeout", "20",
        )  # fmt: skip
        assert partial.returncode == 1, partial
        assert "sent 2/3 instances" in partial.stdout and "1 failed" in partial.stdout, partial
        failed = [line for line in partial.stderr.splitlines() if line.startswith("FAILED ")]
        assert len(failed) == 1 and failed[0].startswith(f"FAILED {junk}:"), partial
    total = len(corpus.series) + len(good)
    assert f"stored {total} instances" in lines, lines
    received = {p.stem: p for p in out.glob("*.dcm")}
    assert set(received) == {i.sop_instance for i in [*corpus.series, *good]}
    for inst in [*corpus.series, *good]:
        path = received[inst.sop_instance]
        check_our_file_meta(path, inst, inst.transfer_syntax, "CLI_SCU")
        assert _stored_dataset(path)[1] == inst.dataset_bytes(), inst.name
