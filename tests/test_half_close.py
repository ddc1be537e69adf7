"""Releases at odd moments: an A-RELEASE-RQ that cuts a C-STORE data set, or that
arrives while a C-MOVE's sub-operations are under way (PS3.8 §7.2, Sta8)."""

from __future__ import annotations

import asyncio
import struct
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
