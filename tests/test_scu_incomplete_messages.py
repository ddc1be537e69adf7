"""A peer that announces a data set in a command (Command Data Set Type, PS3.7 E.1)
and never sends it, or stops midway, or leaves a command set unfinished, and keeps
the association open: our SCP and our SCU each answer with an A-ABORT once the DIMSE
timeout has passed (as pynetdicom's ``dimse_timeout`` and DCMTK's ``-td``; PS3.7 §7.5.2
and PS3.8 §9.3.8 give no status for it), with a warning naming the message. Before,
only the network idle timeout (5 minutes by default; never while a handler ran or a
request of ours was outstanding) ended such an association.

A C-STORE data set streamed to a sink may take as long as it needs while it keeps
arriving: the DIMSE timeout bounds the silence within it, not its whole transfer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from test_hostile import USER, Warnings, a_abort, raw_associate, raw_peer
from test_scu_hostile import Peer, hostile_scp, rsp, scu

from dimse_async import AE
from dimse_async.codec import encode_dataset
from dimse_async.dimse import Command, CommandField, encode_command
from dimse_async.exceptions import AssociationError
from dimse_async.pdu import PDV, PDataTF

HOST = "127.0.0.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
COMMITMENT = "1.2.840.10008.1.20.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DIMSE = 0.4
EVENT = "message incomplete: aborting"


def pdata(ctx: int, data: bytes, *, command: bool, last: bool = True) -> bytes:
    return PDataTF([PDV(ctx, command, last, data)]).encode()


def find_rq() -> bytes:
    cmd = Command(
        CommandField.C_FIND_RQ, message_id=1, affected_sop_class_uid=STUDY_FIND, priority=0, data_set_type=0
    )
    return encode_command(cmd)


def ct_store() -> tuple[bytes, bytes]:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.TextValue = "x" * 4000
    cmd = Command(
        CommandField.C_STORE_RQ,
        message_id=1,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid=str(ds.SOPInstanceUID),
        priority=0,
        data_set_type=0,
    )
    return encode_command(cmd), encode_dataset(ds, IMPLICIT_LE)


async def scp_server(stored: list[str], dimse: float = DIMSE) -> Any:
    ae = AE("SCP", dimse_timeout=dimse, network_timeout=30.0, artim_timeout=1.0, abort_artim_timeout=0.3)
    ae.add_supported_context(STUDY_FIND)
    ae.add_supported_context(CT)

    @ae.on_c_find
    async def find(request: Any) -> Any:
        yield Dataset()

    @ae.on_c_store
    async def store(request: Any) -> int:
        stored.append(request.sop_instance_uid)
        return 0

    return await ae.start_server(HOST, 0)


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


CASES = {
    # The C-FIND-RQ announces its identifier; nothing follows.
    "identifier never sent": (lambda: pdata(1, find_rq(), command=True), "C-FIND-RQ data set not complete"),
    # Half the identifier, then silence.
    "identifier half sent": (
        lambda: pdata(1, find_rq(), command=True) + pdata(1, b"\x08\x00\x52\x00\x06\x00", command=False, last=False),
        "C-FIND-RQ data set not complete",
    ),
    # A C-STORE data set streamed to its sink stops midway.
    "store data set stalls": (
        lambda: pdata(3, ct_store()[0], command=True) + pdata(3, first_half(ct_store()[1]), command=False, last=False),
        "nothing more of the C-STORE-RQ data set",
    ),
    # Half a command set.
    "command set unfinished": (lambda: pdata(1, first_half(find_rq()), command=True, last=False), "command set"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_scp_aborts_a_message_not_completed_within_the_dimse_timeout(case: str) -> None:
    make, reason = CASES[case]
    stored: list[str] = []
    server = await scp_server(stored)
    loop = asyncio.get_running_loop()
    try:
        with Warnings() as warnings:
            async with raw_peer(server.port) as peer:
                await raw_associate(peer, STUDY_FIND, CT)
                start = loop.time()
                await peer.send(make())
                reply = await peer.read_pdu(DIMSE + 3)
                elapsed = loop.time() - start
                assert reply == a_abort(USER, 0), reply
                assert DIMSE * 0.8 <= elapsed <= DIMSE + 2, elapsed
                assert await peer.expect_eof(3) == b""
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
    logged = [str(fields.get("reason")) for fields in warnings.events(EVENT)]
    assert len(logged) == 1 and reason in logged[0] and f"{DIMSE} s" in logged[0], warnings.lines
    assert not stored


async def test_scp_takes_a_slow_store_data_set_that_keeps_arriving() -> None:
    """Its parts come every 0.1 s, the whole takes longer than the DIMSE timeout: stored."""
    stored: list[str] = []
    dimse = 0.6
    server = await scp_server(stored, dimse)
    command, data = ct_store()
    parts = [data[i : i + 512] for i in range(0, len(data), 512)]
    assert len(parts) * 0.1 > dimse + 0.2
    try:
        async with raw_peer(server.port) as peer:
            await raw_associate(peer, STUDY_FIND, CT)
            await peer.send(pdata(3, command, command=True))
            for i, part in enumerate(parts):
                await asyncio.sleep(0.1)
                await peer.send(pdata(3, part, command=False, last=i == len(parts) - 1))
            reply = await peer.read_pdu(5)
            assert reply is not None and reply[0] == 0x04, reply
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
    assert len(stored) == 1


async def test_scu_aborts_a_response_whose_data_set_never_comes() -> None:
    """A pending C-FIND-RSP announcing its identifier, then silence: the C-FIND fails
    within the DIMSE timeout (the response never completed) and the association ends."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        pending = rsp(cmd, 0xFF00)
        pending.data_set_type = 0
        await peer.send(pdata(ctx, encode_command(pending), command=True))
        await peer.drain_until_closed()

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    loop = asyncio.get_running_loop()
    async with hostile_scp(script) as (port, errors):
        assoc = await asyncio.wait_for(
            scu(STUDY_FIND, dimse_timeout=DIMSE, abort_artim_timeout=0.5).associate(HOST, port, called_ae="SCP"), 5
        )
        try:
            start = loop.time()
            with pytest.raises(AssociationError):
                async for _ in assoc.c_find(query):
                    pass
            assert loop.time() - start <= DIMSE + 2
            await asyncio.wait_for(assoc.wait_closed(), 5)
        finally:
            assoc.abort()
    assert not errors, errors


async def test_scu_aborts_an_event_report_whose_data_set_never_comes() -> None:
    """The SCP sends an N-EVENT-REPORT-RQ (a storage commitment result) announcing its
    event information, then nothing, while we have no request outstanding and no
    network timeout: before, the association stayed open for good."""
    got: list[bytes | None] = []

    async def script(peer: Peer) -> None:
        report = Command(
            CommandField.N_EVENT_REPORT_RQ,
            message_id=1,
            affected_sop_class_uid=COMMITMENT,
            affected_sop_instance_uid="1.2.840.10008.1.20.1.1",
            event_type_id=1,
            data_set_type=0,
        )
        await peer.send(pdata(peer.context_id(COMMITMENT), encode_command(report), command=True))
        got.append(await peer.read_pdu(DIMSE + 3))

    loop = asyncio.get_running_loop()
    with Warnings() as warnings:
        async with hostile_scp(script) as (port, errors):
            assoc = await asyncio.wait_for(
                scu(COMMITMENT, dimse_timeout=DIMSE, network_timeout=None, abort_artim_timeout=0.5).associate(
                    HOST, port, called_ae="SCP"
                ),
                5,
            )
            try:
                start = loop.time()
                await asyncio.wait_for(assoc.wait_closed(), DIMSE + 3)
                assert DIMSE * 0.8 <= loop.time() - start <= DIMSE + 2
            finally:
                assoc.abort()
    assert not errors, errors
    assert got == [a_abort(USER, 0)]
    logged = [str(fields.get("reason")) for fields in warnings.events(EVENT)]
    assert len(logged) == 1 and "N-EVENT-REPORT-RQ data set not complete" in logged[0], warnings.lines
