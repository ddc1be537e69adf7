"""Releases at odd moments: an A-RELEASE-RQ that cuts a C-STORE data set, or that
arrives while a C-MOVE's sub-operations are under way (PS3.8 §7.2, Sta8); and peers
that half-close their TCP connection (shutdown of their sending side, reading on).

After its A-RELEASE-RQ a half-close is no lost connection: no P-DATA could follow the
A-RELEASE-RQ anyway, so whatever waited on the peer ends at once (a C-GET's C-STORE
sub-operation under way fails, none starts), while the answers to its requests and the
A-RELEASE-RP still go out, then the connection closes at once (not at ARTIM). Anywhere
else the half-close is the end of the connection (PS3.8 Table 9-10, Evt17), taken at
once even with megabytes queued for a peer that no longer reads."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from rawpeer import pdata, response_status

import dimse_async as da
from dimse_async.acse import ContextSpec, build_request
from dimse_async.codec import encode_dataset
from dimse_async.dimse import Command, CommandField, encode_command
from dimse_async.pdu import ReleaseRQ

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MATCHES = 3


async def read_pdu(reader: asyncio.StreamReader) -> bytes | None:
    try:
        header = await asyncio.wait_for(reader.readexactly(6), 10)
        return header + await asyncio.wait_for(reader.readexactly(struct.unpack(">I", header[2:])[0]), 10)
    except asyncio.IncompleteReadError:
        return None


@contextlib.asynccontextmanager
async def associated(
    ae: da.AE, request: bytes, *, small_window: bool = False, limit: int = 1 << 16
) -> AsyncIterator[tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]]:
    """``ae`` serving on a free port and a raw connection to it that sent ``request`` and
    read its A-ASSOCIATE-AC; with ``small_window`` the connection's receive buffer is
    64 KiB (the server's writes back up). Connection and server closed after."""
    server = await ae.start_server(HOST, 0)
    try:
        if small_window:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (HOST, server.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        else:
            reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(request)
            ac = await read_pdu(reader)
            assert ac is not None and ac[0] == 0x02
            yield server, reader, writer
        finally:
            writer.close()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)


async def test_a_release_cutting_a_c_store_data_set_is_answered_and_logged(tmp_path: Any) -> None:
    """A-RELEASE-RQ after half a C-STORE data set: no P-DATA can follow it (PS3.8 Sta8),
    so the message is never complete; A-RELEASE-RP goes out, nothing is stored or left
    spooled, and one warning names the dropped C-STORE-RQ (before, it went silently)."""
    import logging

    from rawpeer import ct_dataset, rq_bytes, store_rq

    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("dimse_async")
    handler = Capture(logging.WARNING)
    logger.addHandler(handler)
    ae = da.AE("ARCHIVE", spool_threshold=0, spool_dir=str(tmp_path))
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    ae.on_c_store(da.DirectoryStore(tmp_path / "stored"))
    server = await ae.start_server(HOST, 0)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        writer.write(rq_bytes())
        ac = await read_pdu(reader)
        assert ac is not None and ac[0] == 0x02
        cmd, data = store_rq(ct_dataset(), ctx=3)
        writer.write(
            pdata(3, cmd, command=True) + pdata(3, data[: len(data) // 2], command=False, last=False) + ReleaseRQ().encode()
        )
        rp = await read_pdu(reader)
        assert rp is not None and rp[0] == 0x06, rp
    finally:
        writer.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if "incomplete" in r.getMessage()]
    assert len(lines) == 1 and "C-STORE-RQ" in lines[0], [r.getMessage() for r in records]
    assert not list((tmp_path / "stored").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


async def test_a_release_during_a_c_move_fails_the_sub_operations_not_performed() -> None:
    """The peer sends A-RELEASE-RQ while a C-MOVE's first sub-operation is under way (one
    at a time, each taking 0.4 s at the destination): the sub-operations not yet started are
    not performed and count as failed, so the final response before A-RELEASE-RP is
    0xB000 with them in the Failed SOP Instance UID List (PS3.4 C.4.2.1.5); before, it
    was Success with two of the three instances never moved."""
    from rawpeer import RawPeer, ct_dataset

    from dimse_async.codec import decode_identifier

    ct, move_class = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.2.2.2"
    dest = da.AE("DEST")
    dest.add_supported_context(ct)
    storing = asyncio.Event()

    @dest.on_c_store
    async def slow(request: Any) -> int:
        storing.set()
        await asyncio.sleep(0.4)
        return 0

    dest_server = await dest.start_server(HOST, 0)
    ae = da.AE("SCP", move_concurrency=1, known_aes={"DEST": (HOST, dest_server.port)})
    ae.add_supported_context(move_class)

    @ae.on_c_move
    async def move(request: Any) -> AsyncIterator[Dataset]:
        for _ in range(3):
            yield ct_dataset()

    server = await ae.start_server(HOST, 0)
    peer = await RawPeer.connect(server.port)
    try:
        await peer.associate(build_request("SCP", "RAW", [ContextSpec(move_class, [IMPLICIT_LE])], max_pdu=65536).encode())
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        cmd = Command(
            CommandField.C_MOVE_RQ, message_id=1, affected_sop_class_uid=move_class, priority=0, data_set_type=0,
            move_destination="DEST",
        )  # fmt: skip
        await peer.send(pdata(1, encode_command(cmd), command=True) + pdata(1, encode_dataset(query, IMPLICIT_LE), command=False))
        await asyncio.wait_for(storing.wait(), 10)  # the first sub-operation under way
        await peer.send(ReleaseRQ().encode())
        seen: list[Any] = []
        while not seen or seen[-1] != "A-RELEASE-RP":
            pdu = await peer.read_pdu(10)
            assert pdu is not None, f"closed after {seen}"
            if pdu[0] == 0x06:
                seen.append("A-RELEASE-RP")
            elif pdu[0] == 0x04 and pdu[11] & 0x01:
                status = response_status(pdu)[1]
                seen.append(status)
                if status == 0xB000:
                    data = await peer.read_pdu()
                    assert data is not None
                    seen.append(len(decode_identifier(data[12:], IMPLICIT_LE).FailedSOPInstanceUIDList))
        assert seen == [0xB000, 2, "A-RELEASE-RP"], seen
    finally:
        await peer.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
        dest_server.close()
        await asyncio.wait_for(dest_server.wait_closed(grace=1), 10)


# --------------------------------------------------------------------------- half-closes

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
CLOSED_WITHIN = 5.0  # seconds: far below the DIMSE timeout (20 s) and ARTIM (20 s) set below


def get_rq_bytes() -> bytes:
    """An A-ASSOCIATE-RQ for C-GET: context 1 the study model, context 3 CT with the
    requestor as SCP (its C-STORE sub-operations)."""
    specs = [ContextSpec(STUDY_GET, [IMPLICIT_LE]), ContextSpec(CT, [EXPLICIT_LE], scu_role=False, scp_role=True)]
    return build_request("SCP", "RAW", specs, max_pdu=1 << 20).encode()


def c_get_rq() -> bytes:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    cmd = Command(CommandField.C_GET_RQ, message_id=1, affected_sop_class_uid=STUDY_GET, priority=0, data_set_type=0)
    return pdata(1, encode_command(cmd), command=True) + pdata(1, encode_dataset(query, IMPLICIT_LE), command=False)


def c_store_rsp(rq: Command) -> bytes:
    rsp = Command(
        CommandField.C_STORE_RSP,
        message_id_being_responded_to=rq.message_id,
        affected_sop_class_uid=rq.affected_sop_class_uid,
        affected_sop_instance_uid=rq.affected_sop_instance_uid,
        status=0,
    )
    return pdata(3, encode_command(rsp), command=True)


async def next_command(reader: asyncio.StreamReader) -> Command | str | None:
    """The next command set (data set PDUs skipped), "A-RELEASE-RP" / "A-ABORT", or ``None`` at EOF."""
    from dimse_async.dimse import decode_command
    from dimse_async.pdu import PDataTF, PDUReader

    while (pdu := await read_pdu(reader)) is not None:
        if pdu[0] == 0x06:
            return "A-RELEASE-RP"
        if pdu[0] == 0x07:
            return "A-ABORT"
        pdu_reader = PDUReader(0)
        pdu_reader.feed(pdu)
        tf = pdu_reader.next_pdu()
        assert isinstance(tf, PDataTF)
        for pdv in tf.pdvs:
            if pdv.is_command:
                assert pdv.is_last  # (our command sets fit in one PDV)
                return decode_command(bytes(pdv.data))
    return None


async def first_sub_operation(reader: asyncio.StreamReader) -> Command:
    """The C-GET's first C-STORE-RQ (whatever came before it skipped)."""
    while True:
        got = await next_command(reader)
        assert isinstance(got, Command), got
        if got.command_field == CommandField.C_STORE_RQ:
            return got


async def rest_of_the_association(reader: asyncio.StreamReader) -> tuple[list[Any], float]:
    """What the server sends until it closes (commands as (name, status, completed,
    failed)), and how long until the close."""
    start = time.monotonic()
    seen: list[Any] = []
    while (got := await next_command(reader)) is not None:
        seen.append(got if isinstance(got, str) else (got.name, got.status, got.completed, got.failed))
    return seen, time.monotonic() - start


@pytest.mark.parametrize("slow", [False, True], ids=["answered-at-once", "answered-later"])
async def test_a_peer_half_closing_after_its_release_request_gets_every_answer(slow: bool) -> None:
    """C-FIND, A-RELEASE-RQ and the half-close in one go: the three matches, the final
    response and A-RELEASE-RP still go out, then the close at once (before: the end of
    its data was taken for a lost connection, the C-FIND aborted unanswered)."""
    ae = da.AE("SCP", artim_timeout=20, dimse_timeout=20)
    ae.add_supported_context(STUDY_FIND)

    @ae.on_c_find
    async def find(request: Any) -> AsyncIterator[Dataset]:
        for _ in range(MATCHES):
            if slow:
                await asyncio.sleep(0.1)
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            yield match

    request = build_request("SCP", "RAW", [ContextSpec(STUDY_FIND, [IMPLICIT_LE])], max_pdu=65536).encode()
    async with associated(ae, request) as (_server, reader, writer):
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        cmd = Command(CommandField.C_FIND_RQ, message_id=1, affected_sop_class_uid=STUDY_FIND, priority=0, data_set_type=0)
        writer.write(
            pdata(1, encode_command(cmd), command=True)
            + pdata(1, encode_dataset(query, IMPLICIT_LE), command=False)
            + ReleaseRQ().encode()
        )
        writer.write_eof()
        seen, took = await rest_of_the_association(reader)
        statuses = [s[1] if isinstance(s, tuple) else s for s in seen]
        assert statuses == [0xFF00] * MATCHES + [0x0000, "A-RELEASE-RP"], seen
        assert took < CLOSED_WITHIN, took  # closed after the A-RELEASE-RP, not at ARTIM


async def test_a_half_close_after_the_release_fails_the_c_get_sub_operation_it_left_unanswered() -> None:
    """The peer reads the C-GET's first C-STORE sub-operation, then sends A-RELEASE-RQ
    and half-closes without its C-STORE-RSP: that sub-operation and the one not started
    fail, and the final C-GET-RSP (Failed 2) and A-RELEASE-RP go out at once, nothing
    more sent to it (before: the association was aborted at its EOF, no final response)."""
    from rawpeer import ct_dataset

    ae = da.AE("SCP", artim_timeout=20, dimse_timeout=20)
    ae.add_supported_context(STUDY_GET, [IMPLICIT_LE])
    ae.add_supported_context(CT, [EXPLICIT_LE], scp_role=True)

    @ae.on_c_get
    async def get(request: Any) -> AsyncIterator[Dataset]:
        for _ in range(2):
            yield ct_dataset()

    async with associated(ae, get_rq_bytes()) as (_server, reader, writer):
        writer.write(c_get_rq())
        await first_sub_operation(reader)  # (its C-STORE-RSP never sent)
        writer.write(ReleaseRQ().encode())
        writer.write_eof()
        seen, took = await rest_of_the_association(reader)
        assert [s if isinstance(s, str) else (s[0], s[2], s[3]) for s in seen] == [
            ("C-GET-RSP", 0, 2),
            "A-RELEASE-RP",
        ], seen
        assert took < CLOSED_WITHIN, took


async def test_a_c_get_sub_operation_due_after_a_half_closed_release_is_not_sent() -> None:
    """The C-GET's handler yields its second instance only after the peer's A-RELEASE-RQ
    and half-close: no P-DATA can answer a request sent in Sta8, so that sub-operation is
    not sent, it fails, and the final response (Completed 1, Failed 1) and A-RELEASE-RP
    go out at once. (Kept open as the peer asks, that C-STORE-RQ was sent and its
    response awaited for the DIMSE timeout; taken for a lost connection, the association
    was aborted with no final response.)"""
    from rawpeer import ct_dataset

    from dimse_async.services.qr import Matches

    ae = da.AE("SCP", artim_timeout=20, dimse_timeout=20)
    ae.add_supported_context(STUDY_GET, [IMPLICIT_LE])
    ae.add_supported_context(CT, [EXPLICIT_LE], scp_role=True)
    released = asyncio.Event()

    @ae.on_c_get
    async def get(request: Any) -> AsyncIterator[Any]:
        yield Matches(2)
        yield ct_dataset()
        await asyncio.wait_for(released.wait(), 10)
        yield ct_dataset()

    async with associated(ae, get_rq_bytes()) as (server, reader, writer):
        writer.write(c_get_rq())
        first = await first_sub_operation(reader)
        writer.write(c_store_rsp(first))
        pending = await next_command(reader)
        assert isinstance(pending, Command) and pending.status == 0xFF00, pending
        writer.write(ReleaseRQ().encode())
        writer.write_eof()
        (assoc,) = server.associations
        deadline = time.monotonic() + 10
        while not assoc.peer_released and time.monotonic() < deadline:  # the server has read the A-RELEASE-RQ
            await asyncio.sleep(0.01)
        released.set()
        seen, took = await rest_of_the_association(reader)
        assert [s if isinstance(s, str) else (s[0], s[2], s[3]) for s in seen] == [
            ("C-GET-RSP", 1, 1),
            "A-RELEASE-RP",
        ], seen
        assert took < CLOSED_WITHIN, took


async def test_a_half_close_mid_c_get_ends_the_association_at_once_though_much_is_queued() -> None:
    """Sta6: the peer sends a C-GET-RQ for a 12 MB instance and half-closes without
    reading a byte. That is the end of the connection (Evt17): the association ends at
    once, its sub-operation failed, the queued megabytes dropped (before: the transport
    was left to drain them to a peer that reads none, and the C-GET waited the 20 s
    DIMSE timeout for the C-STORE-RSP, then ARTIM)."""
    from rawpeer import ct_dataset

    big = ct_dataset()
    big.Rows, big.Columns, big.BitsAllocated, big.BitsStored, big.HighBit = 2048, 3072, 16, 16, 15
    big.SamplesPerPixel, big.PixelRepresentation, big.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    big.PixelData = bytes(2048 * 3072 * 2)
    ae = da.AE("SCP", artim_timeout=20, dimse_timeout=20)
    ae.add_supported_context(STUDY_GET, [IMPLICIT_LE])
    ae.add_supported_context(CT, [EXPLICIT_LE], scp_role=True)
    sending = asyncio.Event()

    @ae.on_c_get
    async def get(request: Any) -> AsyncIterator[Dataset]:
        sending.set()
        yield big

    async with associated(ae, get_rq_bytes(), small_window=True) as (server, _reader, writer):
        (assoc,) = server.associations
        writer.write(c_get_rq())
        await asyncio.wait_for(sending.wait(), 10)
        deadline = time.monotonic() + 10
        while not assoc.buffered_output() and time.monotonic() < deadline:  # what the peer has not taken
            await asyncio.sleep(0.01)
        assert assoc.buffered_output()
        writer.write_eof()
        start = time.monotonic()
        await asyncio.wait_for(assoc.wait_closed(), CLOSED_WITHIN * 2)
        assert time.monotonic() - start < CLOSED_WITHIN
        assert assoc.end_reason and "closed by peer" in assoc.end_reason, assoc.end_reason


async def test_a_half_close_before_the_association_request_is_complete_closes_at_once() -> None:
    """Sta2: half an A-ASSOCIATE-RQ, then the half-close: the connection closes at once
    (Evt17, AA-5), not when ARTIM or the PDU progress timeout would end it."""
    ae = da.AE("SCP", artim_timeout=20, pdu_timeout=20)
    ae.add_supported_context(STUDY_FIND)
    server = await ae.start_server(HOST, 0)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        rq = build_request("SCP", "RAW", [ContextSpec(STUDY_FIND, [IMPLICIT_LE])], max_pdu=65536).encode()
        writer.write(rq[: len(rq) // 2])
        writer.write_eof()
        start = time.monotonic()
        assert await asyncio.wait_for(reader.read(), CLOSED_WITHIN * 2) == b""
        assert time.monotonic() - start < CLOSED_WITHIN
        deadline = time.monotonic() + CLOSED_WITHIN
        while server.associations and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not server.associations
    finally:
        writer.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)


async def test_a_sub_operation_waiting_for_the_send_lock_when_the_peer_releases_is_not_sent(
    logged: pytest.LogCaptureFixture,
) -> None:
    """Two C-GETs at once (window 2): the first one's 12 MB C-STORE-RQ holds the send
    lock for a peer that reads nothing yet; the second one's C-STORE-RQ, begun before the
    peer's A-RELEASE-RQ, waits for the lock. Once the peer has released, no P-DATA can
    answer it (PS3.8 Table 9-10): it is never sent, both sub-operations fail, and each
    C-GET's final response (Failed 1) and A-RELEASE-RP still go out. (Before, that
    C-STORE-RQ went out after the release, to a peer that could no longer answer it.)"""
    from rawpeer import ct_dataset

    big = ct_dataset()
    big.Rows, big.Columns, big.BitsAllocated, big.BitsStored, big.HighBit = 2048, 3072, 16, 16, 15
    big.SamplesPerPixel, big.PixelRepresentation, big.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    big.PixelData = bytes(2048 * 3072 * 2)
    ae = da.AE("SCP", artim_timeout=20, dimse_timeout=20)
    ae.add_supported_context(STUDY_GET, [IMPLICIT_LE])
    ae.add_supported_context(CT, [EXPLICIT_LE], scp_role=True)

    @ae.on_c_get
    async def get(request: Any) -> AsyncIterator[Dataset]:
        yield big if request.identifier.StudyInstanceUID == "1.2.3" else ct_dataset()

    def c_get(message_id: int, study: str) -> bytes:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        cmd = Command(
            CommandField.C_GET_RQ, message_id=message_id, affected_sop_class_uid=STUDY_GET, priority=0, data_set_type=0
        )
        return pdata(1, encode_command(cmd), command=True) + pdata(1, encode_dataset(query, IMPLICIT_LE), command=False)

    server = await ae.start_server(HOST, 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # a small window: the server's writes back up
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    specs = [ContextSpec(STUDY_GET, [IMPLICIT_LE]), ContextSpec(CT, [EXPLICIT_LE], scu_role=False, scp_role=True)]

    async def until(condition: Any) -> None:
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert condition()

    try:
        writer.write(build_request("SCP", "RAW", specs, max_pdu=1 << 20, async_ops=(4, 2)).encode())
        ac = await read_pdu(reader)
        assert ac is not None and ac[0] == 0x02
        (assoc,) = server.associations
        writer.write(c_get(1, "1.2.3"))
        await until(lambda: assoc.buffered_output() > 0)  # the big C-STORE-RQ holds the send lock
        writer.write(c_get(2, "1.2.4"))
        await until(lambda: assoc._sending >= 2)  # the second C-STORE-RQ waits for the lock
        writer.write(ReleaseRQ().encode())
        await until(lambda: assoc.peer_released)
        seen: list[Any] = []  # reading now lets the lock go
        while not seen or seen[-1] != "A-RELEASE-RP":
            got = await next_command(reader)
            assert got is not None, seen
            seen.append(got if isinstance(got, str) else (got.name, got.status, got.completed, got.failed))
        stores = [s for s in seen if isinstance(s, tuple) and s[0] == "C-STORE-RQ"]
        finals = sorted(s[2:] for s in seen if isinstance(s, tuple) and s[0] == "C-GET-RSP" and s[1] != 0xFF00)
        assert len(stores) == 1, seen  # only the one begun before the release
        assert finals == [(0, 1), (0, 1)], seen
        assert seen[-1] == "A-RELEASE-RP", seen
        dropped = [r.getMessage() for r in logged.records if "request not sent" in r.getMessage()]
        assert len(dropped) == 1 and "C-STORE-RQ" in dropped[0], dropped
    finally:
        writer.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
