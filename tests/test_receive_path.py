"""The storage SCP's receive path: file work off the event loop, durable stores.

PS3.4 B.2.3: a success status means the instance is stored. The file operations of a
C-STORE run in the association's writer thread (small instances on the loop while such
writes are fast, see test_inline_store.py), so a slow file system never stalls the
other associations; with ``durable`` the file and its directory entry are fsynced
before the status is sent, the directory ``fsync`` shared by concurrent stores.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from rawpeer import RawPeer, command_bytes, response_status, rq_bytes

from dimse_async import AE, Status, filewriter
from dimse_async.dimse import Command, CommandField
from dimse_async.filewriter import group_commit
from dimse_async.part10 import read_file_meta
from dimse_async.pdu import RECEIVE_BUFFERS
from dimse_async.services.storage import STORAGE_SOP_CLASSES, STORE_TRANSFER_SYNTAXES, DirectoryStore, StoreRequest

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
STORESCU = "/usr/bin/storescu"


def storage_scp() -> AE:
    ae = AE("SCP", require_called_ae=False)
    ae.add_supported_context(VERIFICATION)
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, STORE_TRANSFER_SYNTAXES)
    return ae


def write_instances(directory: Path, n: int) -> list[str]:
    """``n`` copies of CT_small.dcm with fresh SOP Instance UIDs; their UIDs."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uids = []
    for i in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(directory / f"{i:03d}.dcm", enforce_file_format=True)
        uids.append(uid)
    return uids


async def storescu(port: int, *paths: Path) -> int:
    proc = await asyncio.create_subprocess_exec(
        STORESCU,
        "-aec",
        "SCP",
        "-R",  # propose the files' own transfer syntax only: stored bytes = sent bytes
        "+sd",
        "127.0.0.1",
        str(port),
        *map(str, paths),
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        return await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def dataset_part(path: Path) -> bytes:
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        assert meta is not None
        fp.seek(meta.dataset_offset)
        return fp.read()


def sent_intact(received: bytes, src: Path) -> bool:
    """``received`` is a Part 10 file holding the data set of ``src`` as storescu sends
    it: byte for byte up to the trailing padding (FFFC,FFFC), which DCMTK drops."""
    sent = dataset_part(src)
    data = received[received.index(sent[:64]) :] if sent[:64] in received else b""
    return received[128:132] == b"DICM" and len(data) > 30_000 and sent.startswith(data)


async def test_a_file_write_that_blocks_never_stalls_the_event_loop(tmp_path, monkeypatch):
    """The instance's file write blocks in its writer thread for 1.5 s (a stalled disk):
    the loop keeps its pace (no sleep late by anything near the blocked time) and another
    association's C-ECHO is answered meanwhile. Then the write goes on: the file holds
    every byte of the instance, and storescu got its success status."""
    src = tmp_path / "src"
    (uid,) = write_instances(src, 1)
    out = tmp_path / "out"
    ae = storage_scp()
    ae.on_c_store(DirectoryStore(out, inline=False))  # the writer thread's path
    unblocked = threading.Event()
    real_writev_all = filewriter.writev_all

    def stalled_writev_all(fd: int, chunks: Any) -> None:
        unblocked.wait(30)
        real_writev_all(fd, chunks)

    monkeypatch.setattr(filewriter, "writev_all", stalled_writev_all)
    timer = threading.Timer(1.5, unblocked.set)
    loop = asyncio.get_running_loop()
    worst_lag = 0.0
    async with await ae.start_server("127.0.0.1", 0) as server:
        store = asyncio.ensure_future(storescu(server.port, src))

        async def watch() -> None:
            nonlocal worst_lag
            while not store.done():
                t0 = loop.time()
                await asyncio.sleep(0.005)
                worst_lag = max(worst_lag, loop.time() - t0 - 0.005)

        watcher = asyncio.ensure_future(watch())
        try:
            # The C-STORE has arrived and its write is stalled (storescu's start-up takes what
            # it takes on a loaded machine: the 1.5 s of blocking count from here).
            deadline = loop.time() + 30
            while not any(a.writer.submitted for a in server.associations):
                assert loop.time() < deadline and not store.done(), "the C-STORE never reached the writer"
                await asyncio.sleep(0.005)
            timer.start()
            echo_ae = AE("ECHO")
            echo_ae.add_requested_context(VERIFICATION)
            t0 = time.monotonic()
            async with echo_ae.associate("127.0.0.1", server.port, "SCP") as assoc:
                assert (await assoc.c_echo()).is_success
            echo_seconds = time.monotonic() - t0
            assert not unblocked.is_set(), "the C-ECHO was answered while the write was blocked"
            assert await asyncio.wait_for(store, 30) == 0
            await watcher
        finally:
            timer.cancel()
            unblocked.set()
    assert echo_seconds < 1.0
    assert worst_lag < 0.5, f"event loop stalled {worst_lag:.3f} s"
    assert sent_intact((out / f"{uid}.dcm").read_bytes(), src / "000.dcm")


async def test_durable_stores_fsync_file_and_directory_before_success(tmp_path, monkeypatch):
    """``DirectoryStore(durable=True)``: three storescu at once; every instance's file was
    fsynced (before its rename: the ``.partial`` name) and the directory after it, in
    group-commit rounds shared by concurrent stores; every status success, every file
    complete. A durable save that cannot write answers out of resources (0xA700)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def observed_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    sources = [tmp_path / f"src{i}" for i in range(3)]
    uids = [write_instances(src, 5) for src in sources]
    out = tmp_path / "out"
    ae = storage_scp()
    ae.on_c_store(DirectoryStore(out, durable=True))
    async with await ae.start_server("127.0.0.1", 0) as server:
        codes = await asyncio.gather(*(storescu(server.port, src) for src in sources))
        commit = group_commit()
    assert codes == [0, 0, 0]
    stored = sorted(p.name for p in out.iterdir() if p.suffix == ".dcm")
    assert stored == sorted(f"{u}.dcm" for us in uids for u in us)
    for src, us in zip(sources, uids, strict=True):
        for i, uid in enumerate(us):
            assert sent_intact((out / f"{uid}.dcm").read_bytes(), src / f"{i:03d}.dcm")
    files = {s for s in synced if s.endswith(".dcm.partial")}
    assert files == {str(out / f"{u}.dcm.partial") for us in uids for u in us}
    assert synced.count(str(out)) == commit.rounds >= 1
    assert commit.waiters == 15 and commit.rounds <= 15

    async def failing(request: StoreRequest) -> Status:
        await request.save(out / "000.dcm" / "x.dcm", durable=True)  # a file, not a directory
        return Status(0)

    ae2 = storage_scp()
    ae2.on_c_store(failing)
    scu = AE("SCU")
    scu.add_requested_context(CT_CLASS, [ExplicitVRLittleEndian])
    (out / "000.dcm").write_bytes(b"")
    async with await ae2.start_server("127.0.0.1", 0) as server:
        async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
            status = await assoc.c_store(sources[0] / "000.dcm")
    assert int(status) == 0xA700


async def test_writer_threads_are_few_shared_and_end_when_idle(tmp_path):
    """Four storescu at once: their file work runs in at most four shared writer
    threads, which end a few seconds after the last job (idle associations hold none)."""
    sources = [tmp_path / f"src{i}" for i in range(4)]
    for src in sources:
        write_instances(src, 3)
    ae = storage_scp()
    ae.on_c_store(DirectoryStore(tmp_path / "out"))
    seen = 0

    def writers() -> int:
        return len([t for t in threading.enumerate() if t.name == "dimse-async-writer"])

    async with await ae.start_server("127.0.0.1", 0) as server:
        runs = asyncio.gather(*(storescu(server.port, src) for src in sources))
        while not runs.done():
            seen = max(seen, writers())
            await asyncio.sleep(0.01)
        assert await runs == [0, 0, 0, 0]
        for _ in range(800):
            if not writers():
                break
            await asyncio.sleep(0.01)
    assert 1 <= seen <= 4
    assert writers() == 0
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 12


async def test_store_scp_durable_flag_and_serve_durable_setting(tmp_path):
    """``store-scp --durable`` answers success for what it stored, fsynced; serve's TOML
    takes ``durable`` (the older ``fsync`` still works; both disagreeing is an error)."""
    import subprocess
    import sys

    import pytest
    from conftest import free_port, stop_process, wait_tcp

    from dimse_async.archive.config import load_config

    src = tmp_path / "src"
    uids = write_instances(src, 3)
    out = tmp_path / "out"
    port = free_port()
    log = tmp_path / "scp.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dimse_async", "store-scp", "--port", str(port), "--out", str(out), "--durable"],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_tcp(proc, port, log)
        assert await storescu(port, src) == 0
    finally:
        stop_process(proc)
    assert sorted(p.name for p in out.glob("*.dcm")) == sorted(f"{u}.dcm" for u in uids)

    cfg = tmp_path / "serve.toml"
    cfg.write_text("durable = false\n")
    assert load_config(cfg).fsync is False
    cfg.write_text("fsync = false\n")
    assert load_config(cfg).fsync is False
    cfg.write_text("durable = true\nfsync = false\n")
    with pytest.raises(ValueError, match="disagree"):
        load_config(cfg)


def write_large_instances(directory: Path, sizes: list[int]) -> dict[str, Path]:
    """CT instances with ``sizes`` bytes of random pixel data each (a different stream
    per instance, explicit VR little endian); by SOP Instance UID."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds[0xFFFCFFFC]  # trailing padding, which storescu does not send
    files = {}
    for i, size in enumerate(sizes):
        side = int((size // 2) ** 0.5)
        ds.Rows = ds.Columns = side
        ds.PixelData = random.Random(i).randbytes(side * side * 2)
        ds["PixelData"].VR = "OW"
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        files[uid] = directory / f"{i:03d}.dcm"
        ds.save_as(files[uid], enforce_file_format=True)
    return files


async def test_large_instances_through_reused_receive_buffers_are_stored_intact(tmp_path):
    """storescu sends instances kept in memory until written (2.5 MB) and one spooled
    to disk as it arrives (9 MB): the receive buffers of the earlier fragments are
    reused for later ones once written (the pool hands some out again), and every
    stored file holds exactly the data set sent."""
    files = write_large_instances(tmp_path / "src", [2_500_000, 2_500_000, 9_000_000, 2_500_000, 2_500_000])
    out = tmp_path / "out"
    ae = storage_scp()
    ae.on_c_store(DirectoryStore(out))
    reused = RECEIVE_BUFFERS.reused
    async with await ae.start_server("127.0.0.1", 0) as server:
        assert await storescu(server.port, tmp_path / "src") == 0
    assert RECEIVE_BUFFERS.reused > reused
    for uid, src in files.items():
        assert dataset_part(out / f"{uid}.dcm") == dataset_part(src), f"{src.name} stored differently"


async def test_inline_and_awaiting_handlers_answer_every_request_within_the_window(tmp_path):
    """C-ECHOs answered at once (the response goes out without a task switch) mixed
    with C-STOREs whose handler awaits: over one association whose SCP performs at
    most 2 operations at once (PS3.7 D.3.3.3), every request gets its own response,
    never more than 2 run at once, and with a window of 1 the responses come back in
    the order the requests were sent."""
    src = tmp_path / "src"
    write_instances(src, 6)
    paths = sorted(src.glob("*.dcm"))
    running = peak = 0
    finished: list[str] = []
    started: list[str] = []  # the order the SCP took the requests up

    async def quick_echo(request) -> None:
        started.append(f"echo{request.message_id}")

    async def slow_store(request: StoreRequest) -> Status:
        nonlocal running, peak
        started.append(f"store{request.message_id}")
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.02)
            return Status(0)
        finally:
            running -= 1
            finished.append(request.sop_instance_uid)

    ae = storage_scp()
    ae.max_ops_performed = 2
    ae.on_c_store(slow_store)
    ae.on_c_echo(quick_echo)
    scu = AE("SCU")
    scu.add_requested_context(VERIFICATION)
    scu.add_requested_context(CT_CLASS, ExplicitVRLittleEndian)
    order: list[str] = []

    async def echo(assoc) -> None:
        assert (await assoc.c_echo()).is_success
        order.append(f"echo{assoc.session._next_id}")  # window 1: the id just answered

    async def store(assoc, path: Path) -> None:
        assert (await assoc.c_store(path)).is_success
        order.append(f"store{assoc.session._next_id}")

    async with await ae.start_server("127.0.0.1", 0) as server:
        for window in (2, 1):  # the SCU proposes 8 (or none); the SCP allows 2
            order.clear()
            started.clear()
            peak = 0
            proposed = (8, 8) if window == 2 else (1, 1)
            async with scu.associate("127.0.0.1", server.port, "SCP", async_ops=proposed) as assoc:
                assert assoc.negotiated is not None and (assoc.negotiated.max_ops_invoked or 1) == window
                jobs = [job for path in paths for job in (store(assoc, path), echo(assoc))]
                await asyncio.wait_for(asyncio.gather(*jobs), 30)
            assert len(order) == len(started) == 12
            assert 1 <= peak <= window
        # window 1: every request was answered before the next one was taken up
        assert order == started
    assert len(finished) == 12


async def test_directory_store_answers_each_instance_from_its_file_job(tmp_path):
    """A plain DirectoryStore answers from the outcome of the instance's one file job
    (no task per instance): pipelined stores within the window all succeed with their
    files complete; a file that cannot be created is answered 0xA700 with the reason
    and the association goes on (PS3.4 B.2.3)."""
    src = tmp_path / "src"
    uids = write_instances(src, 6)
    paths = sorted(src.glob("*.dcm"))
    out = tmp_path / "out"
    store = DirectoryStore(out)
    (out / f"{uids[2]}.dcm" / "x").mkdir(parents=True)  # instance 2's name: cannot be replaced
    ae = storage_scp()
    ae.max_ops_performed = 2
    ae.on_c_store(store)
    scu = AE("SCU")
    scu.add_requested_context(VERIFICATION)
    scu.add_requested_context(CT_CLASS, ExplicitVRLittleEndian)
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu.associate("127.0.0.1", server.port, "SCP", async_ops=(8, 8)) as assoc:
            statuses = await asyncio.wait_for(asyncio.gather(*(assoc.c_store(p) for p in paths)), 30)
            assert (await assoc.c_echo()).is_success
    assert [int(s) for s in statuses] == [0, 0, 0xA700, 0, 0, 0]
    assert statuses[2].error_comment is not None and statuses[2].error_comment.startswith("Out of resources")
    assert store.stored == 5
    for i, (uid, path) in enumerate(zip(uids, paths)):
        assert (out / f"{uid}.dcm").is_file() == (i != 2)
        if i != 2:
            assert sent_intact((out / f"{uid}.dcm").read_bytes(), path)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]  # the failed one's removed


async def test_thousands_of_requests_in_one_pdu_beyond_the_window_are_all_answered():
    """A raw peer packs 2000 C-ECHO-RQs into one P-DATA-TF PDU without negotiating a
    window (PS3.7 D.3.3.3: one at a time): each is held back, then answered at once as
    the one before it finishes (iteratively, however many: no recursion), in order;
    reading resumes once none is held, so the A-RELEASE-RQ that follows is answered."""
    n = 2000
    ae = AE("ARCHIVE", require_called_ae=False)
    ae.add_supported_context(VERIFICATION)
    async with await ae.start_server("127.0.0.1", 0) as server:
        peer = await RawPeer.connect(server.port)
        await peer.associate(rq_bytes(max_pdu=1 << 20))
        pdvs = b"".join(
            struct.pack(">IBB", len(c) + 2, 1, 3) + c
            for c in (
                command_bytes(Command(CommandField.C_ECHO_RQ, message_id=i + 1, affected_sop_class_uid=VERIFICATION))
                for i in range(n)
            )
        )
        await peer.send(struct.pack(">BBI", 4, 0, len(pdvs)) + pdvs)
        answered = []
        for _ in range(n):
            pdu = await peer.read_pdu(timeout=20)
            assert pdu is not None
            answered.append(response_status(pdu))
        assert answered == [(0x8030, 0)] * n
        await peer.release()  # read again: the release is answered
        await peer.close()


async def test_instances_spooled_as_they_arrive_are_moved_into_place_by_the_answering_job(tmp_path):
    """A data set past the spool threshold goes to a temporary file as it arrives; with
    a plain DirectoryStore that writes nothing on the loop (``inline=False``) its last
    bytes, the close and the move into place are one writer job after the earlier
    writes, then the status (PS3.4 B.2.3). Instances on both sides of the threshold are
    stored byte for byte, and no temporary file is left in the spool directory or
    beside the stored files. (Written on the loop instead: ``test_inline_store``.)"""
    files = write_large_instances(tmp_path / "src", [700_000, 2_500_000, 9_000_000, 100_000, 2_500_000])
    out = tmp_path / "out"
    spool_dir = out / ".incoming"
    ae = storage_scp()
    ae.spool_threshold = 256 << 10
    ae.spool_dir = str(spool_dir)
    store = DirectoryStore(out, inline=False)
    ae.on_c_store(store)
    async with await ae.start_server("127.0.0.1", 0) as server:
        assert await storescu(server.port, tmp_path / "src") == 0
    assert store.stored == len(files)
    for uid, src in files.items():
        assert dataset_part(out / f"{uid}.dcm") == dataset_part(src), f"{src.name} stored differently"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(f"{uid}.dcm" for uid in files)
    assert not spool_dir.exists() or list(spool_dir.iterdir()) == []


async def test_a_spool_that_cannot_be_written_fails_the_store_not_the_association(tmp_path):
    """The spool directory cannot hold files (it is a file): an instance past the
    threshold is answered 0xA700 (out of resources) and not stored, whichever of the
    answering paths learns of the failed write; the association goes on."""
    files = write_large_instances(tmp_path / "src", [2_500_000])
    path = next(iter(files.values()))
    out = tmp_path / "out"
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    ae = storage_scp()
    ae.spool_threshold = 0
    ae.spool_dir = str(not_a_directory)
    ae.on_c_store(DirectoryStore(out))
    scu = AE("SCU")
    scu.add_requested_context(VERIFICATION)
    scu.add_requested_context(CT_CLASS, ExplicitVRLittleEndian)
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
            status = await asyncio.wait_for(assoc.c_store(path), 30)
            assert (await assoc.c_echo()).is_success
    assert int(status) == 0xA700
    assert status.error_comment is not None and status.error_comment.startswith("Out of resources")
    assert list(out.iterdir()) == []


def test_a_taken_temporary_name_is_never_shared(tmp_path):
    """``write_file`` creates its temporary file: when ``dest.partial`` is taken (the same
    instance written by another association or process at this moment, or a FIFO), it
    writes under a name of its own, never into the other file, never blocking on it."""
    dest = tmp_path / "1.2.3.dcm"
    other = tmp_path / "1.2.3.dcm.partial"
    other.write_bytes(b"another writer's half")
    filewriter.write_file(str(dest), [b"DICM", memoryview(b" complete")], False)
    assert dest.read_bytes() == b"DICM complete"
    assert other.read_bytes() == b"another writer's half"  # untouched
    other.unlink()
    os.mkfifo(other)  # nobody reads it: opening it for writing would block
    filewriter.write_file(str(dest), [b"second"], False)
    assert dest.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.2.3.dcm", "1.2.3.dcm.partial"]


def _failing_spool_writes(monkeypatch: Any, after: int) -> list[int]:
    """Spool writes fail with ENOSPC (disk full) once ``after`` of them went through;
    the number of bytes each successful write was handed."""
    import errno

    from dimse_async.services import spool as spool_module

    real = spool_module.writev_all
    done: list[int] = []

    def writev(fd: int, chunks: Any) -> int:
        if len(done) >= after:
            raise OSError(errno.ENOSPC, "No space left on device")
        done.append(sum(map(len, chunks)))
        return real(fd, chunks)

    monkeypatch.setattr(spool_module, "writev_all", writev)
    return done


async def test_a_disk_full_in_the_middle_of_a_spooled_instance_fails_only_that_store(tmp_path, monkeypatch):
    """The disk fills up after the first of several spool writes of a large instance: it
    is answered 0xA700 and not stored, through both answering paths (a plain
    DirectoryStore's writer job and a handler awaiting ``save``); no temporary file is
    left; the association goes on and the next instance is stored."""
    files = write_large_instances(tmp_path / "src", [9_000_000])
    path = next(iter(files.values()))
    scu = AE("SCU")
    scu.add_requested_context(VERIFICATION)
    scu.add_requested_context(CT_CLASS, ExplicitVRLittleEndian)
    for plain in (True, False):
        out = tmp_path / f"out-{plain}"
        spool_dir = out / ".incoming"
        ae = storage_scp()
        ae.spool_threshold = 256 << 10
        ae.spool_dir = str(spool_dir)
        store = DirectoryStore(out)
        if plain:
            ae.on_c_store(store)
        else:

            @ae.on_c_store
            async def awaiting(request: StoreRequest, store: DirectoryStore = store) -> Status:
                return await store(request)

        done = _failing_spool_writes(monkeypatch, after=1)
        async with await ae.start_server("127.0.0.1", 0) as server:
            async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
                status = await asyncio.wait_for(assoc.c_store(path), 30)
                assert int(status) == 0xA700, plain
                assert status.error_comment is not None and "No space left" in status.error_comment
                assert len(done) == 1
                monkeypatch.undo()
                assert (await asyncio.wait_for(assoc.c_store(path), 30)).is_success
                assert (await assoc.c_echo()).is_success
        assert [p.name for p in out.iterdir() if p.is_file()] == [f"{next(iter(files))}.dcm"]
        assert not spool_dir.exists() or list(spool_dir.iterdir()) == []


async def test_spool_write_jobs_queue_without_waiting_and_pause_reading_while_the_disk_lags(tmp_path, monkeypatch):
    """Past the threshold, every MiB becomes a write job queued behind the earlier ones
    (no wait for each); reading pauses while more than the high-water mark waits for
    the disk and resumes once the writer is below the low-water mark; ``finish`` waits
    for every job; the file holds the bytes in order. A discard with jobs still queued
    writes nothing more and leaves no file."""
    from dimse_async.services import spool as spool_module

    gate = threading.Event()
    real = spool_module.writev_all

    def gated(fd: int, chunks: Any) -> int:
        gate.wait(30)
        return real(fd, chunks)

    monkeypatch.setattr(spool_module, "writev_all", gated)
    calls: list[str] = []
    spool = spool_module.Spool(
        b"HEAD",
        threshold=1024,
        directory=str(tmp_path),
        pause=lambda: calls.append("pause"),
        resume=lambda: calls.append("resume"),
    )
    payload = os.urandom(1 << 20)
    for _ in range(12):
        spool.write(memoryview(payload))
    assert calls == ["pause"]  # 12 MiB queued, none written
    assert spool.writer is not None and spool.writer.submitted == 12
    gate.set()
    await asyncio.wait_for(spool.finish(), 30)
    assert calls == ["pause", "resume"]
    assert spool.path is not None
    with open(spool.path, "rb") as fp:
        assert fp.read() == b"HEAD" + payload * 12
    spool.discard()
    await spool.writer.submit(lambda: None)
    assert os.listdir(tmp_path) == []

    gate.clear()
    second = spool_module.Spool(b"HEAD", threshold=0, directory=str(tmp_path), pause=lambda: None, resume=lambda: None)
    for _ in range(4):
        second.write(payload)
    second.discard()  # four jobs queued, the first one blocked
    gate.set()
    assert second.writer is not None
    await second.writer.submit(lambda: None)
    assert os.listdir(tmp_path) == []


def test_spool_files_are_new_files_of_their_own(tmp_path: Path, monkeypatch: Any) -> None:
    """A spool's temporary file is created with ``O_EXCL`` under a name of this process
    (``.incoming-<pid>-<n>.partial``, mode 0600, an absolute path); a name already
    taken (a file or a link left behind) is never opened: another name is used and
    what was there is untouched."""
    import itertools

    from dimse_async.services import spool as spool_mod

    monkeypatch.setattr(spool_mod, "_spool_names", itertools.count(7))
    taken = tmp_path / f".incoming-{os.getpid()}-7.partial"
    taken.write_bytes(b"someone else's")
    link = tmp_path / f".incoming-{os.getpid()}-8.partial"
    link.symlink_to(tmp_path / "target")
    fds = []
    try:
        fd, path = spool_mod._create_spool_file(str(tmp_path))  # the taken name: another one
        fds.append(fd)
        assert path not in (str(taken), str(link)) and Path(path).parent == tmp_path
        assert Path(path).name.startswith(".incoming-") and path.endswith(".partial")
        fd, path2 = spool_mod._create_spool_file(str(tmp_path))  # the link's name: another one
        fds.append(fd)
        assert path2 not in (str(taken), str(link), path)
        monkeypatch.chdir(tmp_path)
        fd, path3 = spool_mod._create_spool_file(".")  # a relative directory: an absolute path
        fds.append(fd)
        assert path3 == str(tmp_path / f".incoming-{os.getpid()}-9.partial")
        assert os.stat(path3).st_mode & 0o777 == 0o600
    finally:
        for fd in fds:
            os.close(fd)
    assert taken.read_bytes() == b"someone else's" and not (tmp_path / "target").exists()


async def test_spool_pauses_and_resumes_reading_through_its_flow(tmp_path, monkeypatch):
    """A spool given a ``flow`` (what ``make_spool`` passes: the association) calls its
    ``pause_reading("spool")`` / ``resume_reading("spool")`` while the disk lags, as the
    ``pause`` / ``resume`` callables are called otherwise (not those)."""
    from dimse_async.services import spool as spool_module

    gate = threading.Event()
    real = spool_module.writev_all

    def gated(fd: int, chunks: Any) -> int:
        gate.wait(30)
        return real(fd, chunks)

    class Flow:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def pause_reading(self, reason: str) -> None:
            self.calls.append(f"pause {reason}")

        def resume_reading(self, reason: str) -> None:
            self.calls.append(f"resume {reason}")

    monkeypatch.setattr(spool_module, "writev_all", gated)
    flow, called = Flow(), []
    spool = spool_module.Spool(
        b"HEAD", 1024, str(tmp_path), lambda: called.append("pause"), lambda: called.append("resume"), None, None, flow
    )
    payload = os.urandom(1 << 20)
    for _ in range(12):
        spool.write(memoryview(payload))
    assert flow.calls == ["pause spool"]  # 12 MiB queued, none written
    gate.set()
    await asyncio.wait_for(spool.finish(), 30)
    assert flow.calls == ["pause spool", "resume spool"] and called == []
    spool.discard()
    assert spool.writer is not None
    await spool.writer.submit(lambda: None)


async def test_a_messages_pdus_share_a_receive_buffer_and_none_is_held_between_messages(tmp_path):
    """Within a message the reader keeps its buffer at a PDU boundary: the message's next
    PDU goes to its rest, no buffer taken from the pool (after a command set and after
    a fragment that is not the last, PS3.8 E.2). Between messages (after a C-STORE's last
    fragment, after a C-ECHO) the association holds no receive buffer."""
    from rawpeer import ct_dataset, echo_rq, pdata, store_rq

    ae = storage_scp()
    ae.on_c_store(DirectoryStore(tmp_path))
    server = await ae.start_server("127.0.0.1", 0)

    async def until(condition: Any) -> None:
        for _ in range(1000):  # bounded: the server reads what was sent within 10 s
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the server did not read what was sent")

    try:
        peer = await RawPeer.connect(server.port)
        await peer.associate(rq_bytes(called="SCP"))
        [assoc] = list(server.associations)
        reader = assoc.fsm.reader
        for message_id in (1, 2):
            cmd, data = store_rq(ct_dataset(), ctx=3, message_id=message_id)
            await peer.send(pdata(3, cmd, command=True))
            await until(lambda: assoc.session.assembler.current)
            buf, taken = reader._buf, RECEIVE_BUFFERS.reused + RECEIVE_BUFFERS.allocated
            assert buf and reader.end == reader.start  # kept at the boundary: its data set follows
            half = len(data) // 2
            await peer.send(pdata(3, data[:half], command=False, last=False))
            await until(lambda: assoc.session.assembler.received == half)  # noqa: B023
            assert reader._buf is buf and reader.end == reader.start
            await peer.send(pdata(3, data[half:], command=False, last=True))
            rsp = await peer.read_pdu()
            assert rsp is not None and response_status(rsp) == (0x8001, 0)
            assert RECEIVE_BUFFERS.reused + RECEIVE_BUFFERS.allocated == taken  # in the same buffer
            assert reader._buf == bytearray() and reader.end == 0  # between messages: none held
            await peer.send(echo_rq(message_id=10 + message_id, ctx=1))
            rsp = await peer.read_pdu()
            assert rsp is not None and response_status(rsp) == (0x8030, 0)
            assert reader._buf == bytearray() and reader.end == 0
        await peer.release()
        await peer.close()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
    assert len(list(tmp_path.rglob("*.dcm"))) == 2
