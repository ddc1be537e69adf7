"""Storage service end to end between our SCU and our SCP: streaming, spooling,
backpressure, failure statuses, safe names, transcoding, pipelining."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dimse_async import AE, AssociationAborted, NoAcceptedContext, Status
from dimse_async.dimse import Command, CommandField, DIMSEError
from dimse_async.part10 import encode_file_meta, read_file_meta
from dimse_async.services.storage import (
    STORAGE_SOP_CLASSES,
    STORE_TRANSFER_SYNTAXES,
    DirectoryStore,
    encode_dataset,
)
from dimse_async.status import response_status

CT = get_testdata_file("CT_small.dcm")
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def storage_scp(**kw) -> AE:
    ae = AE("SCP", **kw)
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, STORE_TRANSFER_SYNTAXES)
    return ae


def scu(*contexts: tuple[str, list[str]], **kw) -> AE:
    ae = AE("SCU", **kw)
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    return ae


def dataset_bytes(path: str | Path) -> bytes:
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        assert meta is not None
        fp.seek(meta.dataset_offset)
        return fp.read()


async def test_store_file_streams_bytes_unchanged(tmp_path):
    ae = storage_scp()
    ae.on_c_store(DirectoryStore(tmp_path))
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP") as assoc:
            status = await assoc.c_store(CT)
    assert status == 0 and status.category == "success"
    uid = pydicom.dcmread(CT).SOPInstanceUID
    out = tmp_path / f"{uid}.dcm"
    assert dataset_bytes(out) == dataset_bytes(CT)
    meta = pydicom.dcmread(out).file_meta
    assert meta.MediaStorageSOPInstanceUID == uid
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.SourceApplicationEntityTitle == "SCU"


@pytest.mark.parametrize("target", [ImplicitVRLittleEndian, ExplicitVRBigEndian, "1.2.840.10008.1.2.1.99"])
async def test_store_transcodes_uncompressed(tmp_path, target):
    ae = storage_scp()
    ae.on_c_store(DirectoryStore(tmp_path))
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu((CT_CLASS, [target])).associate("127.0.0.1", server.port, "SCP") as assoc:
            assert assoc.accepted_contexts[0].transfer_syntax == target
            status = await assoc.c_store(CT)
    assert status.is_success
    original = pydicom.dcmread(CT)
    received = pydicom.dcmread(tmp_path / f"{original.SOPInstanceUID}.dcm")
    assert received.file_meta.TransferSyntaxUID == target
    assert np.array_equal(received.pixel_array, original.pixel_array)
    assert received.PatientName == original.PatientName


def test_big_endian_transcoding_swaps_words():
    be = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    raw = encode_dataset(be, ExplicitVRLittleEndian, ExplicitVRBigEndian)
    back = pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(encode_file_meta(be.SOPClassUID, be.SOPInstanceUID, ExplicitVRLittleEndian) + raw)
    )
    assert np.array_equal(back.pixel_array, be.pixel_array)


async def test_compressed_file_is_decompressed_for_a_peer_taking_only_uncompressed(tmp_path):
    """JPEG baseline, the peer accepts explicit LE only: pydicom decodes the pixel data,
    the instance goes out in explicit LE and stays marked lossy (PS3.3 C.7.6.1.1.5)."""
    jpeg = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    received = []
    ae = storage_scp()

    @ae.on_c_store
    async def handler(request):
        received.append((request.transfer_syntax, request.dataset))

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu((SC_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP") as assoc:
            assert (await assoc.c_store(jpeg)).is_success
    ((ts, got),) = received
    original = pydicom.dcmread(jpeg)
    assert ts == ExplicitVRLittleEndian and got.SOPInstanceUID == original.SOPInstanceUID
    assert got.LossyImageCompression == "01" and "ISO_10918_1" in str(got.LossyImageCompressionMethod)
    assert np.array_equal(got.pixel_array, original.pixel_array)


async def test_compressed_file_without_an_uncompressed_context_is_never_sent(tmp_path):
    jpeg = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    received = []
    ae = storage_scp()

    @ae.on_c_store
    async def handler(request):
        received.append(request.sop_instance_uid)

    async with await ae.start_server("127.0.0.1", 0) as server:
        rle = "1.2.840.10008.1.2.5"
        async with scu((SC_CLASS, [rle])).associate("127.0.0.1", server.port, "SCP") as assoc:
            with pytest.raises(NoAcceptedContext, match="nor an uncompressed syntax"):
                await assoc.c_store(jpeg)
            assert assoc.is_established
    assert received == []


async def test_failed_handler_returns_failure_status_and_association_lives(tmp_path):
    ae = storage_scp()
    calls = 0

    @ae.on_c_store
    async def handler(request):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(28, "No space left on device")
        if calls == 2:
            raise RuntimeError("cannot parse")
        return 0xB000

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP") as assoc:
            first = await assoc.c_store(CT)
            second = await assoc.c_store(CT)
            third = await assoc.c_store(CT)
            assert assoc.is_established
    assert int(first) == 0xA700 and first.category == "failure" and "No space" in first.error_comment
    assert int(second) == 0xC000 and "cannot parse" in second.error_comment
    assert int(third) == 0xB000 and third.category == "warning"


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")
async def test_unsafe_uids_never_become_paths(tmp_path):
    out = tmp_path / "out"
    ae = storage_scp()
    ae.on_c_store(DirectoryStore(out))
    ds = pydicom.dcmread(CT)
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP") as assoc:
            statuses = []
            for bad in ("../../escape", "/etc/passwd", "1." + "2" * 80, "1.2..3", "1.2.*"):
                ds.SOPInstanceUID = bad
                statuses.append(await assoc.c_store(ds))
            # A leading zero in a component (PS3.5 §9.1 forbids it, devices make it): stored.
            ds.SOPInstanceUID = "1.2.3.04"
            kept = await assoc.c_store(ds)
    assert [int(s) for s in statuses] == [0xC000] * 5
    assert int(kept) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != ".incoming") == ["1.2.3.04.dcm"]
    assert not (tmp_path / "escape").exists()


async def test_dataset_access_is_lazy_and_decodes_on_demand(tmp_path):
    seen = {}
    ae = storage_scp()

    @ae.on_c_store
    async def handler(request):
        seen["decoded_before"] = request.decoded
        seen["name"] = str(request.dataset.PatientName)
        seen["size"] = request.size
        seen["ts"] = request.transfer_syntax

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP") as assoc:
            assert (await assoc.c_store(CT)).is_success
    assert seen == {
        "decoded_before": False,
        "name": str(pydicom.dcmread(CT).PatientName),
        "size": len(dataset_bytes(CT)),
        "ts": ExplicitVRLittleEndian,
    }


async def test_pipelining_fills_the_negotiated_window(tmp_path):
    """16 concurrent C-STOREs over one association, SCP performs at most 4 at a time."""
    active = peak = 0
    ae = storage_scp(max_ops_performed=4)

    @ae.on_c_store
    async def handler(request):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1

    async with await ae.start_server("127.0.0.1", 0) as server:
        client = scu((CT_CLASS, [ExplicitVRLittleEndian]), max_ops_invoked=16)
        async with client.associate("127.0.0.1", server.port, "SCP") as assoc:
            assert assoc.negotiated.max_ops_invoked == 4
            statuses = await asyncio.gather(*(assoc.c_store(CT) for _ in range(16)))
    assert all(s.is_success for s in statuses)
    assert peak == 4


async def test_slow_handler_pauses_reading(tmp_path):
    """Backpressure: a peer exceeding the window while handlers are slow is not read."""
    release = asyncio.Event()
    ae = storage_scp(max_ops_performed=2)
    paused_seen = []

    @ae.on_c_store
    async def handler(request):
        paused_seen.append(request.sop_instance_uid)
        await release.wait()

    async with await ae.start_server("127.0.0.1", 0) as server:
        client = scu((CT_CLASS, [ExplicitVRLittleEndian]), max_ops_invoked=2)
        async with client.associate("127.0.0.1", server.port, "SCP") as assoc:
            assert assoc.negotiated.max_ops_invoked == 2
            context = assoc.context_for(CT_CLASS)
            data = dataset_bytes(CT)

            async def store_ignoring_the_window(i: int) -> Status:
                # Misbehave: invoke without waiting for a slot in the negotiated window.
                cmd = Command(CommandField.C_STORE_RQ, affected_sop_class_uid=CT_CLASS, priority=0)
                cmd.affected_sop_instance_uid = f"2.25.{i + 1}"
                waiter = assoc.begin_request(context, cmd, multi=False)
                try:
                    await assoc.send(context.id, cmd, data)
                    return response_status((await waiter.get(10)).command.status)
                finally:
                    assoc.end_request(waiter)

            tasks = [asyncio.ensure_future(store_ignoring_the_window(i)) for i in range(6)]
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(paused_seen) == 2:
                    break
            (server_assoc,) = server.associations
            for _ in range(100):
                if server_assoc.reading_paused_by:
                    break
                await asyncio.sleep(0.01)
            assert server_assoc.reading_paused_by == {"window"}
            assert server_assoc.session.held >= 1
            assert len(paused_seen) == 2  # no third handler while two run
            release.set()
            statuses = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert all(s.is_success for s in statuses)


async def test_spool_to_disk_above_threshold(tmp_path):
    spool_dir = tmp_path / "spool"
    out = tmp_path / "out"
    paths = []
    ae = storage_scp(spool_threshold=8192, spool_dir=str(spool_dir))
    store = DirectoryStore(out)

    @ae.on_c_store
    async def handler(request):
        paths.append(request.spool.path)
        return await store(request)

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP") as assoc:
            assert (await assoc.c_store(CT)).is_success
    assert paths[0] is not None and paths[0].startswith(str(spool_dir)) and paths[0].endswith(".partial")
    assert os.listdir(spool_dir) == []  # moved into place, nothing left behind
    (written,) = out.iterdir()
    assert dataset_bytes(written) == dataset_bytes(CT)


class _BrokenPayload:
    """A data set source that fails after ``fail_after`` bytes (a disk error midway)."""

    def __init__(self, length: int, fail_after: int):
        self.length, self.fail_after, self.sent = length, fail_after, 0

    def read(self, n: int) -> bytes:
        if self.sent + n > self.fail_after:
            raise OSError(5, "Input/output error")
        self.sent += n
        return b"\x00" * n


def _slow_disk(monkeypatch) -> None:
    """Spool writes take 0.2 s each: an abort finds one under way."""
    from dimse_async.services import spool as spool_module

    real = spool_module.writev_all

    def slow_writev(fd, chunks):
        time.sleep(0.2)
        return real(fd, chunks)

    monkeypatch.setattr(spool_module, "writev_all", slow_writev)


async def test_abort_mid_instance_leaves_no_complete_file(tmp_path, monkeypatch):
    """No spool file outlives the association, even with a write under way at the abort."""
    from dimse_async.dimse import Command, CommandField

    _slow_disk(monkeypatch)
    spool_dir = tmp_path / "spool"
    out = tmp_path / "out"
    ae = storage_scp(spool_threshold=1 << 20, spool_dir=str(spool_dir))
    ae.on_c_store(DirectoryStore(out))
    async with await ae.start_server("127.0.0.1", 0) as server:
        assoc = await scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP")
        (theirs,) = server.associations
        ctx = assoc.accepted_contexts[0]
        cmd = Command(
            CommandField.C_STORE_RQ,
            message_id=1,
            affected_sop_class_uid=CT_CLASS,
            affected_sop_instance_uid="1.2.3.4.5",
            priority=0,
        )
        with pytest.raises(OSError):
            await assoc.send_message(ctx.id, cmd, _BrokenPayload(64 << 20, 8 << 20))
        await asyncio.wait_for(assoc.wait_closed(), 10)
        assert "failed midway" in (assoc.end_reason or "")
        await asyncio.wait_for(theirs.wait_closed(), 10)
        assert not spool_dir.exists() or os.listdir(spool_dir) == []
        assert not server.associations
    assert not out.exists() or [p for p in out.iterdir() if p.name != ".incoming"] == []


async def test_abort_with_requests_held_back_leaves_no_spool_file(tmp_path):
    """A peer sends requests past the operations window; the association is aborted: the
    spools of those never started go with it (PS3.7 §D.3.3.3, PS3.8 §7.3)."""
    from rawpeer import RawPeer, command_bytes, pdata, rq_bytes

    spool_dir = tmp_path / "spool"
    # ARTIM short: reading stays paused after the abort, so ARTIM ends the connection.
    ae = storage_scp(spool_threshold=64 << 10, spool_dir=str(spool_dir), artim_timeout=0.5)
    started, never = asyncio.Event(), asyncio.Event()

    @ae.on_c_store
    async def store(request):
        started.set()
        await never.wait()  # still performing the first when the abort comes
        return 0

    def store_rq(uid: str) -> bytes:
        cmd = Command(
            CommandField.C_STORE_RQ,
            message_id=int(uid.rsplit(".", 1)[1]),
            affected_sop_class_uid=CT_CLASS,
            affected_sop_instance_uid=uid,
            priority=0,
            data_set_type=0,
        )
        data = b"\x00" * (2 << 20)
        frags = [data[i : i + (16 << 10)] for i in range(0, len(data), 16 << 10)]
        return pdata(3, command_bytes(cmd), command=True) + b"".join(
            pdata(3, f, command=False, last=i == len(frags) - 1) for i, f in enumerate(frags)
        )

    async with await ae.start_server("127.0.0.1", 0) as server:
        peer = await RawPeer.connect(server.port)
        try:
            await peer.associate(rq_bytes(called="SCP", max_pdu=1 << 20))
            (theirs,) = server.associations
            await peer.send(store_rq("1.2.3.4.1") + store_rq("1.2.3.4.2"))
            await asyncio.wait_for(started.wait(), 10)
            for _ in range(500):  # the second one's data set arrives and is held back
                if theirs.session.held:
                    break
                await asyncio.sleep(0.01)
            assert theirs.session.held == 1
            assert os.listdir(spool_dir)  # both spooled to disk
            theirs.abort("shutting down")  # reading is paused (the window): it cannot see the peer's abort
            await peer.close()
            await asyncio.wait_for(theirs.wait_closed(), 10)
            assert os.listdir(spool_dir) == []
        finally:
            await peer.close()


def _write_large_instance(path: Path, pixel_bytes: int) -> str:
    """A Secondary Capture file with ``pixel_bytes`` of pixel data, written in pieces."""
    uid = generate_uid()
    rows = 4096
    cols = pixel_bytes // (rows * 2)
    elems = [
        ((0x0008, 0x0016), b"UI", SC_CLASS.encode() + b"\x00"),
        ((0x0008, 0x0018), b"UI", (uid.encode() + b"\x00") if len(uid) % 2 else uid.encode()),
        ((0x0008, 0x0064), b"CS", b"WSD "),
        ((0x0010, 0x0010), b"PN", b"LARGE^TEST"),
        ((0x0028, 0x0002), b"US", struct.pack("<H", 1)),
        ((0x0028, 0x0004), b"CS", b"MONOCHROME2 "),
        ((0x0028, 0x0010), b"US", struct.pack("<H", rows)),
        ((0x0028, 0x0011), b"US", struct.pack("<H", cols)),
        ((0x0028, 0x0100), b"US", struct.pack("<H", 16)),
        ((0x0028, 0x0101), b"US", struct.pack("<H", 16)),
        ((0x0028, 0x0102), b"US", struct.pack("<H", 15)),
        ((0x0028, 0x0103), b"US", struct.pack("<H", 0)),
    ]
    block = bytes(range(256)) * 4096  # 1 MiB pattern
    with open(path, "wb") as f:
        f.write(encode_file_meta(SC_CLASS, uid, ExplicitVRLittleEndian))
        for (g, e), vr, value in elems:
            f.write(struct.pack("<HH2sH", g, e, vr, len(value)) + value)
        n = rows * cols * 2
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n))
        left = n
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return uid


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _sha256(path: Path, skip: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.timeout(240)
async def test_large_instance_bounded_memory_in_receiver(tmp_path):
    """A 256 MiB instance passes through a separate SCP process whose peak RSS barely moves."""
    size = 256 << 20
    src = tmp_path / "large.dcm"
    uid = _write_large_instance(src, size)
    out = tmp_path / "out"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dimse_async", "store-scp", "--port", str(port), "--host", "127.0.0.1",
        "--out", str(out), "--aet", "BIG", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(proc.stdout.readline(), 30)  # "... listening ..."
        client = scu((SC_CLASS, [ExplicitVRLittleEndian]), dimse_timeout=120)
        # Warm up: one small instance so imports and buffers are in the baseline.
        small = tmp_path / "small.dcm"
        _write_large_instance(small, 4096 * 2 * 16)
        async with client.associate("127.0.0.1", port, "BIG") as assoc:
            assert (await assoc.c_store(small)).is_success
        baseline = _vm(proc.pid, "VmHWM")
        t0 = time.monotonic()
        async with client.associate("127.0.0.1", port, "BIG") as assoc:
            status = await assoc.c_store(src)
        elapsed = time.monotonic() - t0
        assert status.is_success, status
        peak = _vm(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    grew = peak - baseline
    print(f"256 MiB instance in {elapsed:.1f} s; receiver peak RSS grew {grew / 2**20:.1f} MiB")
    assert grew < 48 << 20, f"receiver peak RSS grew {grew / 2**20:.1f} MiB for a 256 MiB instance"
    received = out / f"{uid}.dcm"
    with open(src, "rb") as f:
        src_offset = read_file_meta(f).dataset_offset
    with open(received, "rb") as f:
        dst_offset = read_file_meta(f).dataset_offset
    assert _sha256(received, dst_offset) == _sha256(src, src_offset)


async def test_store_after_peer_abort_raises(tmp_path):
    ae = storage_scp()

    @ae.on_c_store
    async def handler(request):
        request.assoc.abort("handler aborts")

    async with await ae.start_server("127.0.0.1", 0) as server:
        assoc = await scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP")
        with pytest.raises(AssociationAborted):
            await assoc.c_store(CT)
        await asyncio.wait_for(assoc.wait_closed(), 5)


async def test_save_after_the_association_ended_writes_nothing(tmp_path):
    """The peer aborts while a handler waits; the association's end drops the instance's
    spool and cancels the handler. A save() the handler still makes (finishing its work
    on the way out) fails with OSError and leaves no file: never an empty or partial one
    under the instance's name."""
    ae = storage_scp()
    started = asyncio.Event()
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    dest = tmp_path / "stored.dcm"

    @ae.on_c_store
    async def handler(request):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            try:
                await request.save(dest)
            except OSError as exc:
                outcome.set_result(exc)
            else:
                outcome.set_result(None)
            raise

    async with await ae.start_server("127.0.0.1", 0) as server:
        assoc = await scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP")
        store = asyncio.create_task(assoc.c_store(CT))
        await asyncio.wait_for(started.wait(), 5)
        assoc.abort()
        with pytest.raises(AssociationAborted):
            await store
        assert isinstance(await asyncio.wait_for(outcome, 5), OSError)
        for theirs in list(server.associations):
            await asyncio.wait_for(theirs.wait_closed(), 5)
    assert not dest.exists()


def test_status_of_unknown_code_is_failure():
    assert Status(0xA801).category == "failure"
    with pytest.raises(DIMSEError):
        from dimse_async.dimse import decode_command

        decode_command(b"\x00\x00")


async def test_spool_discard_never_closes_the_file_under_the_writer_thread(tmp_path, monkeypatch):
    """discard() during a disk write leaves the file to the writer: it is closed and
    gone after the write returns, the write is never cut off, and nothing blocks the loop."""
    import threading

    from dimse_async.services import spool as spool_module

    events: list[str] = []
    writing, disk_done = threading.Event(), threading.Event()
    real_writev, real_close = spool_module.writev_all, spool_module._close_fd

    def slow_writev(fd, chunks):
        events.append("write start")
        writing.set()
        disk_done.wait(30)  # a slow disk: the write lasts until the test ends it
        real_writev(fd, chunks)
        events.append("write end")

    def close(fd):
        events.append("close")
        real_close(fd)

    monkeypatch.setattr(spool_module, "writev_all", slow_writev)
    monkeypatch.setattr(spool_module, "_close_fd", close)
    spool = spool_module.Spool(
        b"HEAD", threshold=1024, directory=str(tmp_path), pause=lambda: None, resume=lambda: None
    )
    spool.write(bytes(2 << 20))  # past the threshold and the flush size: a write starts
    await asyncio.wait_for(asyncio.to_thread(writing.wait, 30), 31)
    spool.discard()
    # discard() returned while the write is still under way: the loop does not wait for the
    # disk (had it waited, the write would have ended first, after the 30 s bound)
    assert events == ["write start"]
    disk_done.set()
    for _ in range(500):
        if "close" in events:
            break
        await asyncio.sleep(0.02)
    assert events == ["write start", "write end", "close"]
    assert os.listdir(tmp_path) == []


async def test_a_small_data_set_goes_with_its_command_in_one_write(tmp_path, monkeypatch):
    """A C-STORE whose data set is in memory and under 64 KiB is written at once with its
    command, one buffer, without the send lock, also when the peer's maximum PDU length
    cuts it into several PDUs; what arrives is the data set unchanged."""
    from dimse_async.messaging import DIMSEMessaging

    locked = []
    original = DIMSEMessaging._send_locked

    async def counted(self, *args):
        locked.append(args[1].name)
        return await original(self, *args)

    monkeypatch.setattr(DIMSEMessaging, "_send_locked", counted)
    ae = storage_scp(max_pdu=4096)
    ae.on_c_store(DirectoryStore(tmp_path))
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu((CT_CLASS, [ExplicitVRLittleEndian])).associate("127.0.0.1", server.port, "SCP") as assoc:
            writes = []
            send_pdata = assoc.fsm.send_pdata
            assoc.fsm.send_pdata = lambda data: writes.append(data) or send_pdata(data)
            status = await assoc.c_store(CT)
    assert status == 0 and locked == []
    (written,) = writes  # one buffer: the command's PDU and the data set's, each at most 4096 bytes
    assert isinstance(written, bytes)
    pos, sizes = 0, []
    while pos < len(written):
        assert written[pos] == 0x04  # P-DATA-TF
        (length,) = struct.unpack_from(">I", written, pos + 2)
        sizes.append(length)
        pos += 6 + length
    assert pos == len(written) and len(sizes) == 1 + -(-len(dataset_bytes(CT)) // 4090) and max(sizes) <= 4096
    uid = pydicom.dcmread(CT).SOPInstanceUID
    assert dataset_bytes(tmp_path / f"{uid}.dcm") == dataset_bytes(CT)


_UID_TEXT = st.text("0123456789.", max_size=70) | st.sampled_from(
    ["1.2.840.10008.5.1.4.1.1.2", "1.2.3.04", "1.2.3.0", "1.2.3.", "1.2.3.4\u0663", "0.1", "00.1"]
)


@settings(max_examples=400, deadline=None)
@given(uids=st.lists(_UID_TEXT, max_size=6))
def test_valid_uid_with_kept_heads_judges_as_the_pattern(uids: list[str]) -> None:
    """valid_uid keeps what comes before the last component of UIDs it found valid and
    then judges only that last component: every answer is still PS3.5 §9.1's (the
    pattern's), whatever was seen before, and the heads kept are bounded."""
    import re

    from dimse_async import part10

    rule = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
    for uid in uids + [u + ".7" for u in uids] + [u + ".07" for u in uids] + [u + "." for u in uids]:
        for _ in range(2):  # judged in full, then (if its head was kept) by the last component
            assert part10.valid_uid(uid) == (0 < len(uid) <= 64 and rule.fullmatch(uid) is not None), uid
    assert len(part10._VALID_HEADS) <= part10._HEADS_KEPT


@settings(max_examples=300, deadline=None)
@given(uids=st.lists(_UID_TEXT, max_size=5), ends=st.lists(_UID_TEXT, min_size=1, max_size=4))
def test_valid_uid_with_kept_roots_judges_as_the_pattern(uids: list[str], ends: list[str]) -> None:
    """Where the last two components differ from one UID to the next (a series number,
    then an instance number), valid_uid judges those two alone once the rest was seen
    valid: every answer is still PS3.5 §9.1's (the pattern's), whatever was seen before."""
    import re

    from dimse_async import part10

    rule = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
    for uid in uids:
        for end in [*ends, "7.1", "07.1", "7.01", "7.", ".1", "7.1.", "\u0663.1"]:
            for case in (f"{uid}.{end}", f"{uid}.{end}.0", f"{uid}{end}"):
                for _ in range(2):
                    assert part10.valid_uid(case) == (0 < len(case) <= 64 and rule.fullmatch(case) is not None), case
    assert len(part10._VALID_HEADS) <= part10._HEADS_KEPT


@settings(max_examples=300, deadline=None)
@given(
    mid=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    sop_class=st.one_of(st.none(), _UID_TEXT),
    instance=st.one_of(st.none(), _UID_TEXT, st.text(max_size=70)),
    priority=st.sampled_from([None, 0, 2]),
    originator=st.sampled_from([None, ("MOVESCU", 7)]),
)
def test_success_response_is_the_general_one_byte_for_byte(mid, sop_class, instance, priority, originator) -> None:
    """The C-STORE-RSP Success of the inline path, with its command set encoded from the
    kept parts (no check of the other fields), is the response scp.response makes and,
    byte for byte, the general encoder's bytes for it."""
    from dimse_async import dimse
    from dimse_async.services.scp import response
    from dimse_async.services.storage import success_response

    rq = Command(CommandField.C_STORE_RQ, message_id=mid, affected_sop_class_uid=sop_class,
                 affected_sop_instance_uid=instance, priority=priority, data_set_type=0)  # fmt: skip
    if originator is not None:
        rq.move_originator_ae, rq.move_originator_message_id = originator
    expected = response(rq, Status(0))
    body = dimse._encode_elements(zip(dimse._ENCODING, dimse._ALL_VALUES(expected)))
    general = struct.pack("<HHII", 0, 0, 4, len(body)) + bytes(body)
    for _ in range(2):  # the shape's parts are made, then used
        rsp, encoded = success_response(rq)
        assert rsp == expected
        assert (encoded if encoded is not None else dimse.encode_command(rsp)) == general
        assert (encoded is None) == (mid is None)
        if mid is not None and instance is not None:  # the inline path's own encoder (no Command)
            assert dimse.encode_store_success(sop_class, mid, instance) == general


@settings(max_examples=200, deadline=None)
@given(
    sop_class=st.text(alphabet="0123456789.", min_size=1, max_size=64),
    instance=st.text(alphabet="0123456789.", max_size=64),
    syntax=st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"]),
    source=st.sampled_from([None, "", "SCU", "ODD_AE"]),
)
def test_file_meta_is_the_elements_encoded_one_by_one(sop_class, instance, syntax, source) -> None:
    """encode_file_meta (the parts kept per class, syntax and source; the SOP Instance
    UID encoded in place) gives the bytes of its elements encoded one by one (PS3.10
    §7.1: explicit VR LE, UIDs padded with NUL to an even length)."""
    from dimse_async import part10

    elems = [
        part10._elem(0x0001, b"OB", b"\x00\x01"),
        part10._elem(0x0002, b"UI", sop_class.encode("ascii")),
        part10._elem(0x0003, b"UI", instance.encode("ascii")),
        part10._elem(0x0010, b"UI", syntax.encode("ascii")),
        part10._elem(0x0012, b"UI", part10.IMPLEMENTATION_CLASS_UID.encode("ascii")),
        part10._elem(0x0013, b"SH", part10.IMPLEMENTATION_VERSION_NAME.encode("ascii")),
        part10._elem(0x0016, b"AE", source.encode("ascii")) if source else b"",
    ]
    body = b"".join(elems)
    expected = bytes(128) + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body
    for _ in range(2):  # the parts are made, then used
        assert encode_file_meta(sop_class, instance, syntax, source or None) == expected
