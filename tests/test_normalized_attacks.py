"""Normalized services against peers that lie or misbehave (PS3.4 Annexes F, J, R;
PS3.7 §10): what a demanding user of the SCU and SCP sides expects, each case a
status or a result that tells the truth."""

from __future__ import annotations

import asyncio
from typing import Any

from normalized_helpers import HOST
from pydicom.uid import generate_uid

import dimse_async as da
from dimse_async.services.commitment import (
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentResult,
    commitment_request,
    report_dataset,
)
from dimse_async.services.normalized import NRequest

WAIT = 30.0
CT = "1.2.840.10008.5.1.4.1.1.2"


def _lying_commitment_scp(report: Any) -> da.AE:
    """A commitment SCP that accepts every request and reports on the same association
    what ``report(references)`` makes of it: a (committed, failed, event type) triple."""
    ae = da.AE("LIAR", dimse_timeout=WAIT)
    ae.add_supported_context(STORAGE_COMMITMENT)
    tasks: set[asyncio.Task[Any]] = set()

    @ae.on_n_action(sop_class=STORAGE_COMMITMENT)
    async def on_action(request: NRequest) -> Any:
        parsed = commitment_request(request)
        assert not isinstance(parsed, int)
        committed, failed, event_type = report(parsed.references)

        async def send() -> None:
            _type, info = report_dataset(CommitmentResult(parsed.transaction_uid, committed, failed))
            await request.assoc.n_event_report(STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, event_type, info)

        task = asyncio.ensure_future(send())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return None

    return ae


async def _request_from(scp: da.AE, refs: list[tuple[str, str]]) -> CommitmentResult:
    scu = da.AE("OUR_SCU", dimse_timeout=WAIT)
    scu.add_requested_context(STORAGE_COMMITMENT)
    async with await scp.start_server(HOST, 0) as server:
        async with scu.associate(HOST, server.port, "LIAR") as assoc:
            return await assoc.request_commitment(refs, timeout=WAIT)


async def test_a_report_that_omits_or_contradicts_references_is_no_success() -> None:
    """PS3.4 J.3.3: every reference of the request is in the report, committed or
    failed. A report leaving some out (here: event type 1, "successful", naming only
    the first) must not read as every instance committed: the SCU would delete the
    local copies of instances nobody committed. Those left out fail (0x0110), those
    reported both committed and failed fail, and instances never asked for are no
    part of the result."""
    refs = [(CT, generate_uid()) for _ in range(3)]
    stranger = (CT, generate_uid())
    scp = _lying_commitment_scp(lambda asked: ([asked[0], stranger], [], 1))
    result = await _request_from(scp, refs)
    assert not result.success
    assert result.committed == [refs[0]]
    assert sorted(result.failed) == sorted((c, i, 0x0110) for c, i in refs[1:])

    both = _lying_commitment_scp(lambda asked: (asked, [(*asked[1], 0x0112)], 2))
    result = await _request_from(both, refs)
    assert not result.success
    assert result.committed == [refs[0], refs[2]]
    assert result.failed == [(*refs[1], 0x0112)]
