"""Normalized services against peers that lie or misbehave (PS3.4 Annexes F, J, R;
PS3.7 §10): what a demanding user of the SCU and SCP sides expects, each case a
status or a result that tells the truth."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from normalized_helpers import HOST, park, running_serve
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE

import dimse_async as da
from dimse_async.archive.mpps import MPPS, mpps_create_dataset, mpps_final_dataset
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


def _pynetdicom_mpps_after_end(port: int) -> dict[str, Any]:
    ae = PynetdicomAE("MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MPPS)
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    out: dict[str, Any] = {}
    try:
        uid = generate_uid()
        park(assoc)
        create = mpps_create_dataset("P1", "A^B", generate_uid(), "CT", "1", "CT1")
        out["create"] = assoc.send_n_create(create, MPPS, uid)[0]
        out["uid"] = uid
        park(assoc)
        out["end"] = assoc.send_n_set(mpps_final_dataset("COMPLETED"), MPPS, uid)[0]
        again = Dataset()
        again.PerformedProcedureStepDescription = "late"
        park(assoc)
        out["after end"] = assoc.send_n_set(again, MPPS, uid)[0]
    finally:
        assoc.release()
    return out


async def test_mpps_n_set_after_the_end_carries_the_error_id_of_the_standard(tmp_path: Path) -> None:
    """PS3.4 F.7.2.2.4, Table F.7.2-2: an N-SET of a COMPLETED step is 0x0110 with Error
    Comment "Performed Procedure Step Object may no longer be updated" and Error ID
    (0000,0903) A710 (what an SCU tests to tell it from other processing failures)."""
    async with running_serve(tmp_path / "archive") as serve:
        out = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_mpps_after_end, serve.port), WAIT)
        ours = da.AE("MODALITY", dimse_timeout=WAIT)
        ours.add_requested_context(MPPS)
        late = Dataset()
        late.PerformedProcedureStepDescription = "later still"
        async with ours.associate(HOST, serve.port, "ARCHIVE") as assoc:
            seen = (await assoc.n_set(MPPS, out["uid"], late)).status
    assert (int(seen), seen.error_id) == (0x0110, 0xA710)  # our SCU hands the Error ID on
    assert int(out["create"].Status) == 0
    assert int(out["end"].Status) == 0
    refused = out["after end"]
    assert int(refused.Status) == 0x0110
    assert refused.ErrorComment == "Performed Procedure Step Object may no longer be updated"
    assert refused.get("ErrorID") == 0xA710
