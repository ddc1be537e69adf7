"""An instance that moves (stored again under another series, study or patient with
``duplicates = "replace"``, or changed on disk and re-indexed) leaves no empty series,
study or patient behind: C-FIND (DCMTK findscu) reports only what can be retrieved.
Stored with DCMTK storescu, on both index back ends; and on PostgreSQL, a parent that a
concurrent store is putting an instance under is not deleted by a move out of it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_integrity import findscu, running_serve, store_statuses, stored_file, storescu, write_ct

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


async def _found(port: int, tmp: Path) -> dict[str, set[str]]:
    """Every patient, study and series C-FIND reports (with its related instance count)."""
    status, patients = await findscu(port, tmp, "QueryRetrieveLevel=PATIENT", "PatientID",
                                     "NumberOfPatientRelatedInstances", model="-P")  # fmt: skip
    assert status == "Success"
    status, studies = await findscu(port, tmp, "QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                                    "NumberOfStudyRelatedInstances")  # fmt: skip
    assert status == "Success"
    series = []
    for study in studies:
        status, found = await findscu(port, tmp, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study.StudyInstanceUID}",
                                      "SeriesInstanceUID", "NumberOfSeriesRelatedInstances")  # fmt: skip
        assert status == "Success"
        series += found
    for ds, key in ((patients, "NumberOfPatientRelatedInstances"), (studies, "NumberOfStudyRelatedInstances"),
                    (series, "NumberOfSeriesRelatedInstances")):  # fmt: skip
        assert all(int(d[key].value) > 0 for d in ds), [(str(d), d[key].value) for d in ds]
    return {
        "patients": {str(d.PatientID) for d in patients},
        "studies": {str(d.StudyInstanceUID) for d in studies},
        "series": {str(d.SeriesInstanceUID) for d in series},
    }


async def test_replaced_instances_moving_leave_no_empty_parents(tmp_path: Path, index: str | None) -> None:
    study_a, study_b, study_c, study_d = (generate_uid() for _ in range(4))
    series_a1, series_a2, series_b1, series_b2, series_x = (generate_uid() for _ in range(5))
    one, two, three, four = (generate_uid() for _ in range(4))

    def ct(name: str, uid: str, study: str, series: str, patient: str) -> Path:
        return write_ct(tmp_path / f"{name}.dcm", SOPInstanceUID=uid, StudyInstanceUID=study,
                        SeriesInstanceUID=series, PatientID=patient)  # fmt: skip

    async with running_serve(tmp_path / "arch", duplicates="replace", index=index) as srv:
        first = [ct("1a", one, study_a, series_a1, "P1"), ct("2a", two, study_a, series_a2, "P1")]
        _code, out = await storescu(srv.port, *first)
        assert store_statuses(out) == ["Success"] * 2, out
        # One instance moves to another series, study and patient: its series goes.
        _code, out = await storescu(srv.port, ct("1b", one, study_b, series_b1, "P2"))
        assert store_statuses(out) == ["Success"], out
        assert await _found(srv.port, tmp_path) == {
            "patients": {"P1", "P2"},
            "studies": {study_a, study_b},
            "series": {series_a2, series_b1},
        }
        # The last instance of study A and patient P1 moves: they go.
        _code, out = await storescu(srv.port, ct("2b", two, study_b, series_b2, "P2"))
        assert store_statuses(out) == ["Success"], out
        assert await _found(srv.port, tmp_path) == {
            "patients": {"P2"},
            "studies": {study_b},
            "series": {series_b1, series_b2},
        }
        # An instance naming series X under another study while X holds another instance
        # is refused (test_archive_hierarchy): nothing moves, nothing is left empty.
        _code, out = await storescu(srv.port, ct("3", three, study_c, series_x, "P3"))
        assert store_statuses(out) == ["Success"], out
        _code, out = await storescu(srv.port, ct("4", four, study_d, series_x, "P3"))
        assert store_statuses(out) == ["Error: DataSetDoesNotMatchSOPClass"], out
        found = await _found(srv.port, tmp_path)
        assert study_c in found["studies"] and study_d not in found["studies"], found
    # Re-index: a file changed on disk moves (the only instance of its series, study and
    # patient: they go); a file gone takes its parents along.
    path = stored_file(tmp_path / "arch", three)
    moved = pydicom.dcmread(path)
    moved.StudyInstanceUID, moved.SeriesInstanceUID, moved.PatientID = study_d, generate_uid(), "P4"
    moved.save_as(path)
    os.unlink(stored_file(tmp_path / "arch", one))
    async with running_serve(tmp_path / "arch", duplicates="replace", index=index) as srv:
        found = await _found(srv.port, tmp_path)
        assert found["studies"] == {study_b, study_d}, found
        assert found["patients"] == {"P2", "P4"}, found
        assert series_b1 not in found["series"] and series_x not in found["series"], found


async def test_a_parent_a_concurrent_store_is_using_stays(postgresql, tmp_path: Path) -> None:
    """PostgreSQL, several writers: one transaction is putting an instance under series X
    (study S, patient P) and has not committed; another moves the only committed
    instance of X elsewhere. The move waits for the first and keeps X, S and P."""
    import asyncpg

    from dimse_async.archive.backend import IndexRow
    from dimse_async.archive.index import Archive

    dsn = postgresql.new_database()
    arch = Archive(tmp_path / "arch", index=dsn)
    assert await arch.count() == 0  # migrated
    arch.close()

    def row(sop: str, study: str, series: str, patient: str) -> list[object]:
        return list(IndexRow(patient, patient, "{}", "", study, "", "", "{}", series, "CT", "{}", sop, "1.2.3",
                             "1.2.840.10008.1.2", f"/x/{sop}.dcm", 1, 0.0, "{}"))  # fmt: skip

    call = f"SELECT index_instance({', '.join(f'${i + 1}' for i in range(18))})"
    a, b = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await a.execute(call, *row("1.1", "9.1", "9.1.1", "P"))
        tx = b.transaction()
        await tx.start()
        await b.execute(call, *row("1.2", "9.1", "9.1.1", "P"))  # holds series X, study S, patient P
        moving = asyncio.ensure_future(a.execute(call, *row("1.1", "9.2", "9.2.1", "Q")))
        await asyncio.sleep(0.3)
        assert not moving.done()  # waits for the concurrent store's rows
        await tx.commit()
        await asyncio.wait_for(moving, 10)
        assert [tuple(r) for r in await a.fetch("SELECT series_uid, study_uid FROM series ORDER BY 1")] == [
            ("9.1.1", "9.1"),
            ("9.2.1", "9.2"),
        ]
        assert [r[0] for r in await a.fetch("SELECT study_uid FROM studies ORDER BY 1")] == ["9.1", "9.2"]
        assert [r[0] for r in await a.fetch("SELECT patient_key FROM patients ORDER BY 1")] == ["P", "Q"]
        # And with nothing in the way, the move out of the last instance drops them.
        await a.execute(call, *row("1.2", "9.2", "9.2.1", "Q"))
        assert [r[0] for r in await a.fetch("SELECT series_uid FROM series")] == ["9.2.1"]
        assert [r[0] for r in await a.fetch("SELECT patient_key FROM patients")] == ["Q"]
    finally:
        await a.close()
        await b.close()
