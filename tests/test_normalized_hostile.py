"""Malformed N-service requests into ``serve`` from a real peer (pynetdicom): odd SOP
Instance UIDs, attributes of the wrong shape for MPPS (PS3.4 Annex F) and storage
commitment (Annex J). Each gets the standard's failure status with a reason (PS3.7
§10.1), never a handler error, and nothing malformed is kept."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from normalized_helpers import HOST, park, running_serve
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE

from dimse_async.archive.mpps import MPPS, mpps_create_dataset
from dimse_async.services.commitment import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE

WAIT = 30.0
CT = "1.2.840.10008.5.1.4.1.1.2"


def _commit_request(transaction_uid: Any, references: Any = None) -> Dataset:
    ds = Dataset()
    ds.add_new(0x00081195, "UI", transaction_uid)
    if references is None:
        item = Dataset()
        item.ReferencedSOPClassUID = CT
        item.ReferencedSOPInstanceUID = generate_uid()
        ds.ReferencedSOPSequence = Sequence([item])
    else:
        ds.add_new(0x00081199, references[0], references[1])
    return ds


def _session(port: int) -> dict[str, tuple[int, str]]:
    ae = PynetdicomAE("MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MPPS)
    ae.add_requested_context(STORAGE_COMMITMENT)
    out: dict[str, tuple[int, str]] = {}
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    study = generate_uid()

    def record(name: str, result: Any) -> None:
        status = result[0]
        out[name] = (int(status.Status), str(status.get("ErrorComment", "")))

    try:
        park(assoc)
        record(
            "create bad uid",
            assoc.send_n_create(mpps_create_dataset("P1", "A^B", study, "CT", "1", "STATION1"), MPPS, "1.2.abc"),
        )
        park(assoc)  # (pynetdicom refuses to send one over 64 characters)
        record(
            "create path uid",
            assoc.send_n_create(mpps_create_dataset("P1", "A^B", study, "CT", "1", "STATION1"), MPPS, "1.2/../3"),
        )
        ds = mpps_create_dataset("P1", "A^B", study, "CT", "1", "STATION1")
        del ds.ScheduledStepAttributesSequence
        ds.add_new(0x00400270, "LO", "not a sequence")
        park(assoc)
        record("create SSAS not SQ", assoc.send_n_create(ds, MPPS, generate_uid()))
        ds = mpps_create_dataset("P1", "A^B", study, "CT", "1", "STATION1")
        del ds.PatientID
        ds.add_new(0x00100020, "SQ", Sequence([Dataset()]))
        park(assoc)
        record("create PatientID SQ", assoc.send_n_create(ds, MPPS, generate_uid()))
        ds = mpps_create_dataset("P1", "A^B", study, "CT", "1", "STATION1")
        ds.ScheduledStepAttributesSequence[0].StudyInstanceUID = [study, generate_uid()]
        park(assoc)
        record("create two study UIDs", assoc.send_n_create(ds, MPPS, generate_uid()))
        good = generate_uid()
        out["uid"] = (0, good)
        park(assoc)
        record(
            "create", assoc.send_n_create(mpps_create_dataset("P1", "A^B", study, "CT", "1", "STATION1"), MPPS, good)
        )
        mods = Dataset()
        mods.add_new(0x00400340, "LO", "not a sequence")  # Performed Series Sequence
        park(assoc)
        record("set PSS not SQ", assoc.send_n_set(mods, MPPS, good))
        mods = Dataset()
        mods.PerformedProcedureStepStatus = "DISCONTINUED"
        mods.PerformedProcedureStepEndDate = "20261201"
        mods.PerformedProcedureStepEndTime = "120000"
        series = Dataset()
        series.SeriesInstanceUID = generate_uid()
        mods.PerformedSeriesSequence = [series]
        park(assoc)
        record("set bad uid", assoc.send_n_set(mods, MPPS, "1.2.3/../x"))
        park(assoc)
        record("set", assoc.send_n_set(mods, MPPS, good))

        def action(name: str, ds: Dataset) -> None:
            park(assoc)
            record(name, assoc.send_n_action(ds, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE))

        park(assoc)  # MPPS is N-CREATE and N-SET only (PS3.4 Table F.7.1-1)
        record("get mpps", assoc.send_n_get([0x00100020], MPPS, good))
        park(assoc)
        record("delete mpps", (assoc.send_n_delete(MPPS, good),))  # (a status, not a pair)
        action("commit seq as UI", _commit_request(generate_uid(), ("UI", "1.2.3")))
        action("commit empty transaction uid", _commit_request(""))
        no_refs = _commit_request(generate_uid())
        del no_refs.ReferencedSOPSequence
        action("commit without references", no_refs)
        action("commit bad transaction uid", _commit_request("1.2.x"))
        item = Dataset()
        item.ReferencedSOPClassUID = CT
        item.ReferencedSOPInstanceUID = [generate_uid(), generate_uid()]
        action("commit two instance UIDs", _commit_request(generate_uid(), ("SQ", Sequence([item]))))
    finally:
        assoc.release()
    return out


async def test_malformed_n_requests_get_standard_statuses(tmp_path: Path) -> None:
    async with running_serve(tmp_path / "archive", storage_commitment=True, commitment_same_association=True) as serve:
        out = await asyncio.wait_for(asyncio.to_thread(_session, serve.port), WAIT)
        store = serve.extras.mpps
        assert store is not None
        steps = await store.find()
    good = out.pop("uid")[1]
    status = {name: code for name, (code, _) in out.items()}
    assert status == {
        "create bad uid": 0x0117,  # PS3.7 §10.1.5.1.6 Invalid SOP Instance
        "create path uid": 0x0117,
        "create SSAS not SQ": 0x0106,  # Invalid Attribute Value
        "create PatientID SQ": 0x0106,
        "create two study UIDs": 0x0106,
        "create": 0x0000,
        "set PSS not SQ": 0x0106,
        "set bad uid": 0x0117,
        "set": 0x0000,
        "get mpps": 0x0211,  # PS3.7 Annex C Unrecognized Operation: the class is served, not by N-GET
        "delete mpps": 0x0211,
        "commit seq as UI": 0x0115,
        "commit empty transaction uid": 0x0121,  # Table J.3-1 1/1, PS3.4 §5.4.2.1
        "commit without references": 0x0120,  # PS3.7 §10.1.4.1.10 Invalid Argument Value
        "commit bad transaction uid": 0x0115,
        "commit two instance UIDs": 0x0115,
    }
    assert out["create SSAS not SQ"][1] == "(0040,0270) must be a sequence"
    assert out["create PatientID SQ"][1] == "(0010,0020) must not be a sequence"
    assert "Unable to process" not in str(out)
    # Only the well-formed step was kept, and its N-SET applied.
    assert [(s.SOPInstanceUID, s.PerformedProcedureStepStatus) for s in steps] == [(good, "DISCONTINUED")]
    assert steps[0].PatientID == "P1"
