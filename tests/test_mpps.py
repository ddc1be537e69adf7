"""MPPS (PS3.4 Annex F) into ``serve``: a pynetdicom SCU creates and ends performed
procedure steps; the state rules answer illegal transitions; the steps are then
visible through the archive's listing. Our own SCU helpers drive the same SCP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from normalized_helpers import HOST, park, running_serve
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE as PynetdicomAE

import dimse_async as da
from dimse_async.archive.mpps import MPPS, mpps_create_dataset

WAIT = 30.0


def _pynetdicom_mpps(port: int, study_uid: str) -> dict[str, Any]:
    ae = PynetdicomAE("MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MPPS)
    out: dict[str, Any] = {}
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established
    try:
        first, second = generate_uid(), generate_uid()
        out["uids"] = (first, second)
        park(assoc)
        out["create"] = assoc.send_n_create(
            mpps_create_dataset("PAT7", "Doe^Jane", study_uid, "CT", "PPS1", "CT1"), MPPS, first
        )[0]
        park(assoc)
        out["duplicate"] = assoc.send_n_create(
            mpps_create_dataset("PAT7", "Doe^Jane", study_uid, "CT", "PPS1"), MPPS, first
        )[0]
        bad = mpps_create_dataset("PAT7", "Doe^Jane", study_uid, "CT", "PPS9")
        bad.PerformedProcedureStepStatus = "COMPLETED"
        park(assoc)
        out["create_completed"] = assoc.send_n_create(bad, MPPS, generate_uid())[0]
        progress = Dataset()
        series = Dataset()
        series.SeriesInstanceUID = generate_uid()
        series.ReferencedImageSequence = []
        series.RetrieveAETitle = "ARCHIVE"
        progress.PerformedSeriesSequence = [series]
        park(assoc)
        out["set_progress"] = assoc.send_n_set(progress, MPPS, first)[0]
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate = "20261201"
        done.PerformedProcedureStepEndTime = "120000"
        park(assoc)
        out["set_completed"] = assoc.send_n_set(done, MPPS, first)[0]
        reopen = Dataset()
        reopen.PerformedProcedureStepStatus = "IN PROGRESS"
        park(assoc)
        out["set_after_end"] = assoc.send_n_set(reopen, MPPS, first)[0]
        park(assoc)
        out["set_unknown"] = assoc.send_n_set(done, MPPS, generate_uid())[0]
        weird = Dataset()
        weird.PerformedProcedureStepStatus = "PAUSED"
        park(assoc)
        out["create_second"] = assoc.send_n_create(
            mpps_create_dataset("PAT8", "Roe^Rick", study_uid, "MR", "PPS2"), MPPS, second
        )[0]
        park(assoc)
        out["set_weird"] = assoc.send_n_set(weird, MPPS, second)[0]
        stop = Dataset()
        stop.PerformedProcedureStepStatus = "DISCONTINUED"
        park(assoc)
        out["set_discontinued"] = assoc.send_n_set(stop, MPPS, second)[0]
    finally:
        assoc.release()
    return out


async def test_pynetdicom_mpps_into_serve(tmp_path: Path) -> None:
    study_uid = generate_uid()
    async with running_serve(tmp_path / "archive") as serve:
        out = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_mpps, serve.port, study_uid), WAIT)
        store = serve.extras.mpps
        assert store is not None
        completed = await store.find(status="COMPLETED")
        discontinued = await store.find(status="DISCONTINUED")
        in_study = await store.find(study_uid=study_uid)
    first, second = out["uids"]
    status = {k: int(v.Status) for k, v in out.items() if k != "uids"}
    assert status == {
        "create": 0x0000,
        "duplicate": 0x0111,
        "create_completed": 0x0106,
        "set_progress": 0x0000,
        "set_completed": 0x0000,
        "set_after_end": 0x0110,
        "set_unknown": 0x0112,
        "create_second": 0x0000,
        "set_weird": 0x0106,
        "set_discontinued": 0x0000,
    }
    assert str(out["set_after_end"].ErrorComment).startswith("Performed Procedure Step Object may no longer be updated")
    (step,) = completed
    assert step.SOPInstanceUID == first and step.PatientID == "PAT7"
    assert step.PerformedProcedureStepEndTime == "120000" and step.PerformedStationAETitle == "CT1"
    assert len(step.PerformedSeriesSequence) == 1
    assert [s.SOPInstanceUID for s in discontinued] == [second]
    assert {s.SOPInstanceUID for s in in_study} == {first, second}


async def test_our_mpps_scu_helpers(tmp_path: Path) -> None:
    async with running_serve(tmp_path / "archive") as serve:
        ae = da.AE("MODALITY", dimse_timeout=WAIT)
        ae.add_requested_context(MPPS)
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            created = await assoc.n_create(MPPS, None, mpps_create_dataset("P1", "A^B", generate_uid(), "US", "S1"))
            assert created.is_success and created.sop_instance_uid  # assigned by the SCP
            end = Dataset()
            end.PerformedProcedureStepStatus = "COMPLETED"
            assert (await assoc.n_set(MPPS, created.sop_instance_uid, end)).is_success
            assert (await assoc.n_set(MPPS, created.sop_instance_uid, end)).status == 0x0110
        assert serve.extras.mpps is not None
        step = await serve.extras.mpps.get(created.sop_instance_uid)
        assert step is not None and step.PerformedProcedureStepStatus == "COMPLETED" and step.Modality == "US"
