"""Our SCU when the application stops awaiting a request (``asyncio.wait_for``, a task
cancelled) after it went out, against a real peer (pynetdicom) that answers late.

The peer still answers it (PS3.7 §9.1): that late response is no protocol violation.
It is dropped, its message id and its place in the window of operations we invoke
(PS3.7 D.3.3.3) are held until it arrives, and the association goes on: the next
request is answered, leaving ``async with`` releases normally.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import free_port
from pynetdicom import AE as PynetdicomAE
from pynetdicom import evt

import dimse_async as da

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
VERIFICATION = "1.2.840.10008.1.1"
SLOW = 0.4  # seconds the peer takes to answer each C-ECHO


@pytest.fixture
def slow_peer() -> Iterator[tuple[int, list[float]]]:
    """A pynetdicom verification SCP answering each C-ECHO after :data:`SLOW` seconds;
    its port, and when each C-ECHO reached it."""
    seen: list[float] = []

    def echo(event: Any) -> int:
        seen.append(time.monotonic())
        time.sleep(SLOW)
        return 0x0000

    ae = PynetdicomAE("SLOW")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_supported_context(VERIFICATION)
    port = free_port()
    server = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_ECHO, echo)])
    try:
        yield port, seen
    finally:
        server.shutdown()


def scu() -> da.AE:
    ae = da.AE("OUR_SCU", dimse_timeout=10)
    ae.add_requested_context(da.Verification)
    return ae


async def test_a_request_left_unawaited_is_answered_late_and_the_association_goes_on(
    slow_peer: tuple[int, list[float]],
) -> None:
    port, seen = slow_peer
    async with scu().associate(HOST, port, "SLOW") as assoc:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(assoc.c_echo(), 0.05)
        # The next request waits for the window (one operation at a time) and is answered.
        assert int(await assoc.c_echo()) == 0x0000
        assert assoc.is_established
    assert assoc.end_reason is None  # released, not aborted
    assert len(seen) == 2
    assert seen[1] - seen[0] >= SLOW * 0.9  # never two operations at once at the peer
