"""A command whose Command Data Set Type (0000,0800) announces a data set (any value but
0101H, PS3.7 E.1) that never comes: pynetdicom sends one for an empty ``Dataset()``.

- Another command set arriving where the data set is due is a PDV out of turn (PS3.8
  Annex E: a message's fragments, command then data set, before the next message's):
  A-ABORT, service-provider source, reason unexpected-PDU parameter (PS3.8 Table 9-26,
  as dcm4che answers it), and one warning naming the message that announced it and its
  Command Data Set Type. Before, the reason was not-specified and the warning did not
  say which message.
- When nothing follows (pynetdicom waits for our answer), the DIMSE timeout ends it, its
  reason saying that none of the announced data set came (before: only that it was not
  complete).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE as PynetdicomAE
from rawpeer import CONTEXTS, STUDY_FIND, VERIFICATION, RawPeer, echo_rq, pdata, rq_bytes

import dimse_async as da
from dimse_async.dimse import Command, CommandField, encode_command

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("dimse_async")
    handler = Capture(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def archive(**settings: Any) -> da.AE:
    ae = da.AE("ARCHIVE", **settings)
    for context_id in (1, 7):
        ae.add_supported_context(*CONTEXTS[context_id])

    @ae.on_c_find
    async def find(request: Any) -> Any:
        if False:  # pragma: no cover - never reached: no identifier ever arrives
            yield Dataset()

    return ae


async def test_a_command_set_where_an_announced_data_set_is_due_is_an_unexpected_pdu_parameter(
    warnings: list[str],
) -> None:
    server = await archive(dimse_timeout=20).start_server(HOST, 0)
    peer = await RawPeer.connect(server.port)
    try:
        await peer.associate(rq_bytes())
        find = Command(CommandField.C_FIND_RQ, message_id=7, affected_sop_class_uid=STUDY_FIND, priority=0, data_set_type=1)
        await peer.send(pdata(7, encode_command(find), command=True) + echo_rq(8))
        abort = await peer.read_pdu(10)
        assert abort is not None and abort[0] == 0x07, abort
        assert (abort[8], abort[9]) == (2, 5), abort  # service-provider, unexpected-PDU parameter
    finally:
        await peer.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
    (line,) = [w for w in warnings if w.startswith("DIMSE protocol violation")]
    assert "C-FIND-RQ" in line and "message id 7" in line and "Command Data Set Type 0x0001" in line, line


def _find_with_an_empty_identifier(port: int) -> list[Any]:
    ae = PynetdicomAE("PYNET_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(STUDY_FIND)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    try:
        return [status for status, _identifier in assoc.send_c_find(Dataset(), STUDY_FIND)]
    finally:
        assoc.release()


async def test_pynetdicoms_empty_identifier_ends_at_the_dimse_timeout_with_a_reason_that_says_so(
    warnings: list[str],
) -> None:
    server = await archive(dimse_timeout=1).start_server(HOST, 0)
    try:
        statuses = await asyncio.wait_for(asyncio.to_thread(_find_with_an_empty_identifier, server.port), 30)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
    assert not [s for s in statuses if s and "Status" in s], statuses  # aborted, never answered
    (line,) = [w for w in warnings if w.startswith("message incomplete")]
    assert "C-FIND-RQ data set not complete within 1 s: none of it came" in line, line
    assert "Command Data Set Type 0x0001 announced one" in line, line
