"""Memory of ``serve`` with C-GET clients that never read: the sub-operations' file
read-ahead and transport buffers stay within the server-wide output budget
(``max_buffered_output``), small per association, and go when the clients do."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from rawpeer import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    HOST,
    MiB,
    RawPeer,
    ServerProcess,
    command_bytes,
    legit_echo,
    pdata,
    server_process,
)

import dimse_async as da
from dimse_async.acse import ContextSpec, build_request
from dimse_async.codec import encode_dataset
from dimse_async.dimse import Command, CommandField
from dimse_async.part10 import read_file_meta
from dimse_async.services.send import send_files

STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
CLIENTS = int(os.environ.get("RETRIEVE_CLIENTS", "32"))
SIZE = int(os.environ.get("RETRIEVE_SIZE_MIB", "16")) * MiB
BUDGET = int(os.environ.get("RETRIEVE_BUDGET_MIB", "8")) * MiB


def large_instance(path: Path, size: int) -> str:
    """A CT instance of ``size`` bytes of pixel data; its Study Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BIG", "Big^Pat", "CT"
    ds.Rows, ds.Columns = 1024, size // 2048
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = os.urandom(1024) * (size // 1024)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def get_rq(study: str) -> bytes:
    """The PDUs of a C-GET-RQ for ``study`` on context 1."""
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    cmd = Command(CommandField.C_GET_RQ, message_id=1, affected_sop_class_uid=STUDY_GET, priority=0, data_set_type=0)
    return pdata(1, command_bytes(cmd), command=True) + pdata(1, encode_dataset(ident, EXPLICIT_LE), command=False)


async def non_reading_get(port: int, study: str) -> RawPeer:
    """An association that C-GETs ``study`` and never reads again (a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
    peer = RawPeer(reader, writer)
    specs = [
        ContextSpec(STUDY_GET, [EXPLICIT_LE]),
        ContextSpec(CT_IMAGE_STORAGE, [EXPLICIT_LE], scu_role=False, scp_role=True),
    ]
    await peer.associate(build_request("ARCHIVE", "HOG", specs, max_pdu=65536).encode())
    writer.transport.pause_reading()  # not a byte more read from here on
    await peer.send(get_rq(study))
    return peer


def dataset_bytes(path: Path) -> bytes:
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        assert meta is not None
        fp.seek(meta.dataset_offset)
        return fp.read()


async def get_whole(port: int, study: str) -> bytes:
    """C-GET ``study`` with our SCU; the data set bytes received."""
    ae = da.AE("READER", dimse_timeout=30)
    ae.add_requested_context(STUDY_GET)
    ae.add_requested_context(CT_IMAGE_STORAGE, [EXPLICIT_LE], scu_role=False, scp_role=True)
    received: list[bytes] = []

    @ae.on_c_store
    async def on_store(request: Any) -> int:
        with request.open() as fp:  # Part 10: the data set after the file meta
            meta = read_file_meta(fp)
            assert meta is not None
            fp.seek(meta.dataset_offset)
            received.append(fp.read())
        return 0

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    async with ae.associate(HOST, port, "ARCHIVE") as assoc:
        progress = [p async for p in assoc.c_get(query, model="study")]
    assert int(progress[-1].status) == 0, progress[-1]
    (data,) = received
    return data


async def settled(server: ServerProcess, quiet: float = 0.5, timeout: float = 15.0) -> int:
    """The server's RSS once it stopped growing for ``quiet`` s (bounded wait)."""
    deadline = time.monotonic() + timeout
    last, since = server.rss(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        await asyncio.sleep(0.1)
        now = server.rss()
        if now > last + MiB // 2:
            last, since = now, time.monotonic()
    return server.rss()


async def test_non_reading_get_clients_stay_within_the_output_budget(tmp_path: Path) -> None:
    """Clients that C-GET a large instance and never read: while the output budget is
    exceeded, each sub-operation's data set waits for its peer before its next write
    batch and gives back what it read ahead, so the server holds about the budget plus
    well under 2 MiB per association (before: ~5 MiB each, budget or not: +246 MiB for
    32 clients of a 16 MiB instance), and an echo from another client is answered."""
    budget = BUDGET
    path = tmp_path / "big.dcm"
    study = large_instance(path, SIZE)
    with server_process(tmp_path, "serve", "--max-buffered-output", str(budget)) as server:
        report = await send_files(da.AE("MODALITY"), HOST, server.port, "ARCHIVE", [str(path)])
        assert not report.failed, report.failed
        await legit_echo(server.port)
        baseline = await settled(server)
        peers = [await non_reading_get(server.port, study) for _ in range(CLIENTS)]
        try:
            held = await settled(server, quiet=0.7)
            assert await legit_echo(server.port, timeout=5) < 2.0
            # A client that reads still gets the instance whole, a batch at a time.
            assert await asyncio.wait_for(get_whole(server.port, study), 30) == dataset_bytes(path)
            peak = server.peak_rss()
        finally:
            for peer in peers:
                peer.writer.transport.abort()
        print(
            f"clients={CLIENTS} size={SIZE // MiB}MiB baseline={baseline / MiB:.0f} held=+{(held - baseline) / MiB:.0f}"
            f" peak=+{(peak - baseline) / MiB:.0f} MiB"
        )
        # Generous (allocator slack, the first associations' 4 MiB before the budget
        # is reached), yet far below what unbounded read-ahead and transports hold.
        limit = budget + CLIENTS * 5 * MiB // 2 + 16 * MiB
        assert peak - baseline < limit, f"serve grew {(peak - baseline) / MiB:.0f} MiB (limit {limit / MiB:.0f})"
        server.check_log()
