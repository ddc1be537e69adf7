"""A raw peer exceeding the asynchronous operations window (PS3.7 D.3.3.3) while our
SCP awaits responses of its own: a C-GET's C-STORE sub-operations (PS3.4 C.4.3).

Requests beyond the window are held back until a place frees (the SCP stops reading
meanwhile); the C-STORE-RSPs of the sub-operations must still be read, or the C-GET,
and every request held behind it, waits for good (until the DIMSE timeout aborts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from rawpeer import CT_IMAGE_STORAGE, EXPLICIT_LE, IMPLICIT_LE, VERIFICATION, RawPeer, ct_dataset, echo_rq, pdata

import dimse_async as da
from dimse_async.acse import ContextSpec, build_request
from dimse_async.codec import decode_identifier
from dimse_async.dimse import Command, CommandField, decode_command, encode_command
from dimse_async.pdu import ReleaseRQ
from dimse_async.services.storage import encode_dataset

pytestmark = pytest.mark.timeout(60)

STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
DIMSE_TIMEOUT = 5.0  # the SCP's: a C-GET stuck on unread responses ends only then
INSTANCES = 3


@contextlib.asynccontextmanager
async def get_scp() -> AsyncIterator[int]:
    ae = da.AE("SCP", dimse_timeout=DIMSE_TIMEOUT)
    ae.add_supported_context(VERIFICATION)
    ae.add_supported_context(CT_IMAGE_STORAGE, scu_role=True, scp_role=True)
    ae.add_supported_context(STUDY_GET)

    @ae.on_c_get
    async def get(request: da.QueryRequest) -> AsyncIterator[Dataset]:
        for _ in range(INSTANCES):
            yield ct_dataset()

    server = await ae.start_server("127.0.0.1", 0)
    try:
        yield server.port
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=2), 10)


def command_of(pdu: bytes) -> Command | None:
    """The command set of a P-DATA-TF holding one whole command (else ``None``)."""
    (length,) = struct.unpack_from(">I", pdu, 6)
    if pdu[11] != 0x03:
        return None
    return decode_command(pdu[12 : 10 + length])


def study_get() -> tuple[list[ContextSpec], Dataset, Command]:
    """What the C-GET peers here propose (Verification, CT Image Storage in both roles,
    Study Root GET), their STUDY level identifier and its C-GET-RQ (message id 1)."""
    specs = [
        ContextSpec(VERIFICATION, [IMPLICIT_LE]),
        ContextSpec(CT_IMAGE_STORAGE, [EXPLICIT_LE], scu_role=True, scp_role=True),
        ContextSpec(STUDY_GET, [IMPLICIT_LE]),
    ]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    get_rq = Command(CommandField.C_GET_RQ, message_id=1, affected_sop_class_uid=STUDY_GET, priority=0, data_set_type=0)
    return specs, query, get_rq


@pytest.mark.parametrize("extra", [1, 5], ids=["one", "five"])
async def test_requests_beyond_the_window_during_a_c_get_leave_its_sub_operations_answered(extra: int) -> None:
    """C-GET-RQ, then C-ECHO-RQs beyond the window of 1 in the same write: every
    sub-operation is answered by the peer and read, the C-GET ends Success, then each
    C-ECHO is answered, in well under the DIMSE timeout (before: the C-STORE-RSPs
    stayed unread behind the paused socket and the association was aborted after it,
    "no C-STORE-RQ response")."""
    specs, query, get_rq = study_get()
    async with get_scp() as port:
        peer = await RawPeer.connect(port)
        try:
            await peer.associate(build_request("SCP", "RAW", specs, max_pdu=65536).encode())
            start = time.monotonic()
            await peer.send(
                pdata(5, encode_command(get_rq), command=True)
                + pdata(5, encode_dataset(query, IMPLICIT_LE), command=False)
                + b"".join(echo_rq(2 + i) for i in range(extra))
            )
            stored, get_statuses, echoes = 0, [], []
            while len(echoes) < extra:
                pdu = await peer.read_pdu(DIMSE_TIMEOUT + 2)
                assert pdu is not None and pdu[0] == 0x04, f"ended with {pdu!r} after {time.monotonic() - start:.1f} s"
                cmd = command_of(pdu)
                if cmd is None:
                    continue  # a sub-operation's data set
                if cmd.command_field == CommandField.C_STORE_RQ:
                    await peer.read_pdu()  # its data set
                    rsp = Command(
                        CommandField.C_STORE_RSP,
                        message_id_being_responded_to=cmd.message_id,
                        affected_sop_class_uid=cmd.affected_sop_class_uid,
                        affected_sop_instance_uid=cmd.affected_sop_instance_uid,
                        status=0,
                    )
                    await peer.send(pdata(pdu[10], encode_command(rsp), command=True))
                    stored += 1
                elif cmd.command_field == CommandField.C_GET_RSP:
                    get_statuses.append(cmd.status)
                elif cmd.command_field == CommandField.C_ECHO_RSP:
                    assert get_statuses[-1:] == [0x0000], "the C-ECHO was answered before the C-GET ended"
                    echoes.append((cmd.message_id_being_responded_to, cmd.status))
            assert stored == INSTANCES
            assert get_statuses == [0xFF00] * (INSTANCES - 1) + [0x0000]
            assert echoes == [(2 + i, 0x0000) for i in range(extra)]
            assert time.monotonic() - start < DIMSE_TIMEOUT / 2
            await peer.release()
        finally:
            await peer.close()


STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
HELD_IDENTIFIER = 900_000  # bytes: each held C-FIND-RQ's identifier, under max_request_dataset (1 MiB)
HELD_REQUESTS = 16  # beyond the window, sent while a sub-operation awaits its response


def big_identifier(size: int) -> bytes:
    """A C-FIND identifier (Implicit VR Little Endian) of ``size`` bytes: the level and a
    long Patient Comments (0010,4000), written directly (the SCP holds it unparsed)."""
    level = struct.pack("<HHI", 0x0008, 0x0052, 6) + b"STUDY "
    rest = size - len(level) - 8
    return level + struct.pack("<HHI", 0x0010, 0x4000, rest) + b"x" * rest


def held_bytes(assoc: da.Association) -> int:
    """The data set bytes of the peer's requests the SCP holds back (read, not started)."""
    session = assoc.session
    held = session.operations()[len(session.operations()) - session.held :]
    return sum(len(op.message.dataset or b"") for op in held)


async def test_requests_held_during_a_c_get_are_bounded_in_bytes() -> None:
    """While a C-GET's sub-operation awaits its response, a peer sends sixteen C-FIND-RQs
    with 900 KB identifiers beyond the window of 1 and answers nothing: the SCP reads on
    only within a small budget (1 MiB of held data sets, 8 requests) and then stops
    reading, so it holds at most the budget, the request that crossed it and those that
    came in the same read (up to 4 MiB): 2.7 MB here; before, it read on for up to 16
    held requests (16 x 900 KB = 14.4 MB here; 16 x 4 MiB with spooled C-STOREs)."""
    ae = da.AE("SCP", dimse_timeout=DIMSE_TIMEOUT)
    ae.add_supported_context(CT_IMAGE_STORAGE, scu_role=True, scp_role=True)
    ae.add_supported_context(STUDY_GET)
    ae.add_supported_context(STUDY_FIND)
    associations: list[da.Association] = []
    ae.on_association("accepted")(associations.append)

    @ae.on_c_get
    async def get(request: da.QueryRequest) -> AsyncIterator[Dataset]:
        yield ct_dataset()

    @ae.on_c_find
    async def find(request: da.QueryRequest) -> AsyncIterator[Dataset]:
        return
        yield

    specs = [
        ContextSpec(CT_IMAGE_STORAGE, [EXPLICIT_LE], scu_role=True, scp_role=True),
        ContextSpec(STUDY_GET, [IMPLICIT_LE]),
        ContextSpec(STUDY_FIND, [IMPLICIT_LE]),
    ]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    get_rq = Command(CommandField.C_GET_RQ, message_id=1, affected_sop_class_uid=STUDY_GET, priority=0, data_set_type=0)
    identifier = big_identifier(HELD_IDENTIFIER)
    data_pdus = b"".join(
        pdata(5, identifier[at : at + 200_000], command=False, last=at + 200_000 >= len(identifier))
        for at in range(0, len(identifier), 200_000)
    )
    parts = []
    for i in range(HELD_REQUESTS):
        find_rq = Command(
            CommandField.C_FIND_RQ, message_id=2 + i, affected_sop_class_uid=STUDY_FIND, priority=0, data_set_type=0
        )
        parts += [pdata(5, encode_command(find_rq), command=True), data_pdus]
    finds = b"".join(parts)
    server = await ae.start_server("127.0.0.1", 0)
    peer = await RawPeer.connect(server.port)
    try:
        await peer.associate(build_request("SCP", "RAW", specs, max_pdu=65536).encode())
        await peer.send(
            pdata(3, encode_command(get_rq), command=True) + pdata(3, encode_dataset(query, IMPLICIT_LE), command=False)
        )
        pdu = await peer.read_pdu()  # the sub-operation's C-STORE-RQ: the SCP now awaits its response
        assert pdu is not None and (cmd := command_of(pdu)) is not None and cmd.command_field == CommandField.C_STORE_RQ
        peer.writer.write(finds)  # not drained: the SCP may stop reading
        # What the SCP holds once it has stopped reading or has read everything (the
        # C-GET cannot go on: its sub-operation is not answered).
        (assoc,) = associations
        seen, steady_since = -1, time.monotonic()
        deadline = time.monotonic() + 20
        while time.monotonic() - steady_since < 0.5 and time.monotonic() < deadline:
            now = held_bytes(assoc)
            if now != seen:
                seen, steady_since = now, time.monotonic()
            await asyncio.sleep(0.02)
        assert assoc.session.held >= 1, "no request was held back"
        bound = (1 << 20) + HELD_IDENTIFIER + (4 << 20)  # budget, the one crossing it, one read
        assert seen <= bound, f"{seen} bytes held for {assoc.session.held} requests"
    finally:
        peer.writer.transport.abort()
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=0.1), 10)  # (it no longer reads: aborted)


async def test_a_release_during_a_c_get_gets_its_final_response_first() -> None:
    """The peer sends A-RELEASE-RQ with our first C-STORE sub-operation unanswered: no
    response to it can follow (PS3.8 Sta8), so it and the sub-operations not performed
    fail, and the C-GET's final response (0xA702, the three instances in the Failed SOP
    Instance UID List) goes out before A-RELEASE-RP (PS3.8 §7.2: every request answered);
    before, the C-GET was left without a final response."""
    specs, query, get_rq = study_get()
    async with get_scp() as port:
        peer = await RawPeer.connect(port)
        try:
            await peer.associate(build_request("SCP", "RAW", specs, max_pdu=65536).encode())
            await peer.send(
                pdata(5, encode_command(get_rq), command=True) + pdata(5, encode_dataset(query, IMPLICIT_LE), command=False)
            )
            pdu = await peer.read_pdu()
            assert pdu is not None and (cmd := command_of(pdu)) is not None and cmd.command_field == CommandField.C_STORE_RQ
            await peer.send(ReleaseRQ().encode())
            seen: list[Any] = []
            while not seen or seen[-1] != "A-RELEASE-RP":
                pdu = await peer.read_pdu(DIMSE_TIMEOUT / 2)
                assert pdu is not None, f"closed after {seen}"
                if pdu[0] == 0x06:
                    seen.append("A-RELEASE-RP")
                elif (cmd := command_of(pdu)) is not None and cmd.command_field == CommandField.C_GET_RSP:
                    seen.append(cmd.status)
                    if cmd.status != 0xFF00:
                        data = await peer.read_pdu()
                        assert data is not None
                        failed = decode_identifier(data[12:], IMPLICIT_LE).FailedSOPInstanceUIDList
                        seen.append(len(failed))
            assert seen == [0xA702, INSTANCES, "A-RELEASE-RP"]
        finally:
            await peer.close()
