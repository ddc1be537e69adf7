"""Responses whose data set is missing where one belongs, or present where none does,
from a raw SCP (the acceptor of ``test_scu_hostile``): a Pending C-FIND-RSP without its
identifier (PS3.7 §9.1.2.1: pending responses carry the match) is a DIMSEFailure, not
a match skipped unsaid; a C-ECHO-RSP or C-STORE-RSP with a data set (Data Set Type
0101H, PS3.7 §9.3.5.2, §9.3.1.2) is an A-ABORT at its command set, and a final
C-FIND-RSP's data set is collected up to 64 KiB (then ignored with a warning), an
A-ABORT beyond: it used to be collected up to 64 MiB and ignored."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from test_scu_hostile import CT, HOST, STUDY_FIND, VERIFICATION, Peer, ct_instance, hostile_scp, identifier, rsp, scu

from dimse_async.dimse import CommandField
from dimse_async.exceptions import AssociationAborted, DIMSEFailure

pytestmark = pytest.mark.timeout(30)


def query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = ""
    return ds


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The library's log lines while the test runs (``.messages``)."""
    logger = logging.getLogger("dimse_async")
    logger.addHandler(caplog.handler)  # (it does not propagate to root)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


async def test_pending_c_find_response_without_identifier_is_a_failure(warnings: pytest.LogCaptureFixture) -> None:
    """One match, then a Pending response without an identifier: the match is handed
    on, then DIMSEFailure naming the fault (and a warning); leaving ``async with``
    cancels the rest (PS3.7 §9.3.2.3) and the association goes on."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        await peer.reply(ctx, rsp(cmd, 0xFF00), identifier(1, 10))
        await peer.reply(ctx, rsp(cmd, 0xFF00))  # no data set
        _, cancel, _ = await peer.read_message()
        assert cancel.command_field == CommandField.C_CANCEL_RQ
        await peer.reply(ctx, rsp(cmd, 0xFE00))
        await peer.drain_until_closed()

    got: list[Dataset] = []
    async with hostile_scp(script) as (port, errors):
        async with scu(STUDY_FIND).associate(HOST, port, called_ae="SCP") as assoc:
            with pytest.raises(DIMSEFailure, match="C-FIND response 2: pending without an identifier"):
                async with assoc.c_find(query()) as responses:
                    async for match in responses:
                        got.append(match)
            assert responses.status is not None and int(responses.status) == 0xFE00
    assert not errors, errors
    assert [str(m.PatientID) for m in got] == ["P1"]
    assert any("C-FIND pending response without an identifier" in line for line in warnings.messages)


@pytest.mark.parametrize("operation", ["echo", "store"])
async def test_response_that_never_carries_a_data_set_with_one_is_an_abort(operation: str) -> None:
    """A C-ECHO-RSP or C-STORE-RSP announcing a data set (and sending one): A-ABORT as
    its command set arrives, the operation fails; nothing of the data set is collected."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        await peer.reply(ctx, rsp(cmd, 0), b"\x00" * 4096)
        pdus = await peer.drain_until_closed()
        assert pdus and pdus[-1][0] == 0x07, pdus  # A-ABORT

    async with hostile_scp(script) as (port, errors):
        with pytest.raises((AssociationAborted, DIMSEFailure)):
            async with scu(VERIFICATION, CT).associate(HOST, port, called_ae="SCP") as assoc:
                if operation == "echo":
                    await assoc.c_echo()
                else:
                    await assoc.c_store(ct_instance())
    assert not errors, errors


@pytest.mark.parametrize("size", [1000, 200_000])
async def test_final_c_find_response_data_set_is_bounded(size: int, warnings: pytest.LogCaptureFixture) -> None:
    """A final Success carrying a data set: a small one is ignored with a warning and the
    C-FIND ends Success with its match; one over 64 KiB is an A-ABORT."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        await peer.reply(ctx, rsp(cmd, 0xFF00), identifier(1, 10))
        await peer.reply(ctx, rsp(cmd, 0), identifier(2, size))
        pdus = await peer.drain_until_closed()
        if size > 65536:
            assert pdus and pdus[-1][0] == 0x07, pdus  # A-ABORT

    got: list[Dataset] = []
    async with hostile_scp(script) as (port, errors):
        if size > 65536:
            with pytest.raises(AssociationAborted):
                async with scu(STUDY_FIND).associate(HOST, port, called_ae="SCP") as assoc:
                    got = [m async for m in assoc.c_find(query())]
        else:
            async with scu(STUDY_FIND).associate(HOST, port, called_ae="SCP") as assoc:
                responses = assoc.c_find(query())
                got = [m async for m in responses]
            assert responses.status is not None and int(responses.status) == 0
            assert [str(m.PatientID) for m in got] == ["P1"]
            logged = [line for line in warnings.messages if "C-FIND final response carries a data set" in line]
            assert len(logged) == 1, warnings.messages
    assert not errors, errors
