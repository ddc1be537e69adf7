"""MPPS (PS3.4 Annex F) into ``serve``: a pynetdicom SCU creates and ends performed
procedure steps; the state rules answer illegal transitions; the steps are then
visible through the archive's listing. Our own SCU helpers drive the same SCP."""

from __future__ import annotations

import asyncio
import copy
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
            mpps_create_dataset("PAT7", "Doe^Jane", study_uid, "CT", "PPS1", "STATION1"), MPPS, first
        )[0]
        bad = mpps_create_dataset("PAT7", "Doe^Jane", study_uid, "CT", "PPS9", "STATION1")
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
            mpps_create_dataset("PAT8", "Roe^Rick", study_uid, "MR", "PPS2", "STATION1"), MPPS, second
        )[0]
        park(assoc)
        out["set_weird"] = assoc.send_n_set(weird, MPPS, second)[0]
        stop = Dataset()
        stop.PerformedProcedureStepStatus = "DISCONTINUED"
        park(assoc)
        out["set_discontinued_bare"] = assoc.send_n_set(stop, MPPS, second)[0]
        stop.PerformedProcedureStepEndDate = "20261201"
        stop.PerformedProcedureStepEndTime = "121500"
        stop.PerformedSeriesSequence = [series]
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
        "set_discontinued_bare": 0x0121,  # End Date / Time empty since the N-CREATE
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
            created = await assoc.n_create(
                MPPS, None, mpps_create_dataset("P1", "A^B", generate_uid(), "US", "S1", "STATION1")
            )
            assert created.is_success and created.sop_instance_uid  # assigned by the SCP
            assert created.status.attributes == ()
            partial = mpps_create_dataset("P1", "A^B", generate_uid(), "US", "S2", "STATION1")
            del partial.PerformedProcedureStepID
            refused = await assoc.n_create(MPPS, None, partial)
            # 0x0120 with Attribute Identifier List (0000,1005) naming the attribute (PS3.7 Annex C).
            assert refused.status == 0x0120 and refused.status.attributes == (0x00400253,)
            assert "(0040,0253)" in repr(refused.status)
            end = Dataset()
            end.PerformedProcedureStepStatus = "COMPLETED"
            end.PerformedProcedureStepEndDate = "20261201"
            end.PerformedProcedureStepEndTime = "130000"
            series = Dataset()
            series.SeriesInstanceUID = generate_uid()
            series.ReferencedImageSequence = []
            end.PerformedSeriesSequence = [series]
            assert (await assoc.n_set(MPPS, created.sop_instance_uid, end)).is_success
            assert (await assoc.n_set(MPPS, created.sop_instance_uid, end)).status == 0x0110
        assert serve.extras.mpps is not None
        step = await serve.extras.mpps.get(created.sop_instance_uid)
        assert step is not None and step.PerformedProcedureStepStatus == "COMPLETED" and step.Modality == "US"


def _tags(status: Dataset) -> list[int]:
    """The Attribute Identifier List (0000,1005) pynetdicom received with ``status``."""
    value = status.get("AttributeIdentifierList")
    return [] if value is None else [int(t) for t in (value if isinstance(value, list) else [value])]


def _pynetdicom_nset_rules(port: int, uid: str) -> dict[str, tuple[int, str, list[int]]]:
    ae = PynetdicomAE("MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MPPS)
    out: dict[str, tuple[int, str, list[int]]] = {}
    assoc = ae.associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established

    def n_set(name: str, mods: Dataset) -> None:
        park(assoc)
        status = assoc.send_n_set(mods, MPPS, uid)[0]
        out[name] = (int(status.Status), str(status.get("ErrorComment", "")), _tags(status))

    try:
        create = mpps_create_dataset(
            "PAT9", "Yamada^Tarou=山田^太郎=やまだ^たろう", generate_uid(), "CT", "PPS9", "CT1"
        )
        create.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        for name, keyword, value in (
            ("create without status", "PerformedProcedureStepStatus", None),
            ("create without step id", "PerformedProcedureStepID", None),
            ("create with empty station", "PerformedStationAETitle", ""),
            ("create with empty start", "PerformedProcedureStepStartDate", ""),
        ):
            partial = copy.deepcopy(create)
            if value is None:
                delattr(partial, keyword)
            else:
                setattr(partial, keyword, value)
            park(assoc)
            out[name] = (int(assoc.send_n_create(partial, MPPS, uid)[0].Status), "", [])
        park(assoc)
        out["create"] = (int(assoc.send_n_create(create, MPPS, uid)[0].Status), "", [])
        other_patient = Dataset()
        other_patient.PatientID = "SOMEONE-ELSE"
        n_set("set patient id", other_patient)
        same_patient = Dataset()
        same_patient.PatientID = "PAT9"  # (some modalities send the whole list again)
        same_patient.PerformedProcedureStepDescription = "first"
        n_set("set patient id unchanged", same_patient)
        other_start = Dataset()
        other_start.PerformedProcedureStepStartDate = "19990101"
        n_set("set start date", other_start)
        latin1 = Dataset()
        latin1.SpecificCharacterSet = "ISO_IR 100"
        latin1.PerformedProcedureStepDescription = "Schädel nativ"
        n_set("set in latin-1", latin1)
        unknown = Dataset()
        unknown.SpecificCharacterSet = "ISO_IR 999"
        unknown.PerformedProcedureStepDescription = "Sch\xe4del"
        n_set("set in an unknown character set", unknown)
        blank = Dataset()
        blank.PerformedProcedureStepStatus = ""
        n_set("set empty status", blank)  # once stored, the step was stuck without a state
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        n_set("complete without end", done)
        done.PerformedProcedureStepEndDate = "20261201"
        done.PerformedProcedureStepEndTime = "120000"
        n_set("complete without series", done)
        series = Dataset()
        series.SeriesInstanceUID = generate_uid()
        series.ReferencedImageSequence = []
        done.PerformedSeriesSequence = [series]
        n_set("complete", done)
    finally:
        assoc.release()
    return out


async def test_n_set_keeps_the_step_s_identity_its_text_and_the_final_state_rules(tmp_path: Path) -> None:
    """PS3.4 F.7.2.2.3 and Table F.7.2-1: an N-CREATE needs its Type 1 attributes (none
    of the refused ones is kept, the UID stays free); an N-SET may not change the patient or the
    step's start (0x0105, nothing applied); an N-SET in another character set leaves
    the N-CREATE's text as it was; COMPLETED needs End Date, End Time and a Performed
    Series Sequence item (0x0121 while they are empty; the step stays IN PROGRESS)."""
    uid = generate_uid()
    async with running_serve(tmp_path / "archive") as serve:
        out = await asyncio.wait_for(asyncio.to_thread(_pynetdicom_nset_rules, serve.port, uid), WAIT)
        assert serve.extras.mpps is not None
        step = await serve.extras.mpps.get(uid)
        by_patient = await serve.extras.mpps.find(patient_id="PAT9")
    assert {name: code for name, (code, _, _) in out.items()} == {
        "create without status": 0x0120,  # Type 1 in N-CREATE: absent 0x0120, empty 0x0121 (PS3.4 5.4.2.1)
        "create without step id": 0x0120,
        "create with empty station": 0x0121,
        "create with empty start": 0x0121,
        "create": 0x0000,
        "set patient id": 0x0105,
        "set start date": 0x0105,
        "set patient id unchanged": 0x0000,
        "set in latin-1": 0x0000,
        "set empty status": 0x0106,
        "set in an unknown character set": 0x0106,  # F.7.2.2.3: cannot convert, nothing applied
        "complete without end": 0x0121,
        "complete without series": 0x0121,
        "complete": 0x0000,
    }
    assert out["set patient id"][1] == "PatientID may not be set by N-SET"
    assert out["complete without end"][1].startswith("PerformedProcedureStepEndDate")
    assert out["complete without series"][1].startswith("PerformedSeriesSequence")
    # PS3.7 Annex C: 0x0105 / 0x0106 / 0x0121 name the attribute in Attribute Identifier List (0000,1005).
    assert {name: tags for name, (_, _, tags) in out.items() if tags} == {
        "set patient id": [0x00100020],  # Patient ID
        "set start date": [0x00400244],  # Performed Procedure Step Start Date
        "set empty status": [0x00400252],  # Performed Procedure Step Status
        "set in an unknown character set": [0x00080005],  # Specific Character Set
        "complete without end": [0x00400250],  # Performed Procedure Step End Date
        "complete without series": [0x00400340],  # Performed Series Sequence
    }
    assert step is not None and step.PerformedProcedureStepStatus == "COMPLETED"
    assert step.PatientID == "PAT9" and step.PerformedProcedureStepStartDate != "19990101"
    assert str(step.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert step.PerformedProcedureStepDescription == "Schädel nativ"
    assert [s.SOPInstanceUID for s in by_patient] == [uid]
