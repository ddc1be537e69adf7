"""One patient per study, one study per series (PS3.3 A.1.2: a UID names one entity;
PS3.4 C.6.1.1, C.6.2.1: the Q/R hierarchy). An instance naming a Series Instance UID
the archive holds under another study, or a Study Instance UID it holds for another
patient, would move that series or study and every instance already in it: those
acknowledged instances would then be answered under a study or patient their data
sets do not name, and no longer found under their own. Such an instance is refused
0xA900 naming the element (PS3.4 B.2.3, Table B.2-1) with a log line; what is held
stays as it was. Stored by DCMTK storescu, found by DCMTK findscu, both index back ends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_archive_qr_hostile import Lines
from test_integrity import HOST, SERVE_AE, findscu, running_serve, store_statuses, storescu, write_ct

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def pynetdicom_store(port: int, *paths: Path) -> list[tuple[int, str, list[int]]]:
    """pynetdicom C-STOREs each file on one association: (status, Error Comment,
    Offending Element) of each answer."""
    from pynetdicom import AE as PynetAE

    scu = PynetAE(ae_title="PYNET")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 30
    scu.add_requested_context(CT_IMAGE_STORAGE, pydicom.uid.ExplicitVRLittleEndian)
    assoc = scu.associate(HOST, port, ae_title=SERVE_AE)
    assert assoc.is_established
    out = []
    try:
        for path in paths:
            rsp = assoc.send_c_store(pydicom.dcmread(path))
            offending = rsp.get("OffendingElement")
            tags = (
                []
                if offending is None
                else [int(t) for t in (offending if isinstance(offending, list) else [offending])]
            )
            out.append((int(rsp.Status), str(rsp.get("ErrorComment", "")), tags))
    finally:
        assoc.release()
    return out


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SERIES_UID, PATIENT_ID = 0x0020000E, 0x00100020


async def _images(port: int, tmp: Path, study: str) -> dict[str, tuple[str, str, str]]:
    """The instances findscu finds at IMAGE level under each series of ``study``:
    SOP Instance UID -> (Patient ID, Study, Series) as answered."""
    status, series = await findscu(port, tmp, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                                   "SeriesInstanceUID")  # fmt: skip
    assert status == "Success"
    out = {}
    for s in series:
        status, found = await findscu(port, tmp, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                                      f"SeriesInstanceUID={s.SeriesInstanceUID}", "SOPInstanceUID", "PatientID")  # fmt: skip
        assert status == "Success"
        for d in found:
            out[str(d.SOPInstanceUID)] = (str(d.get("PatientID", "")), study, str(s.SeriesInstanceUID))
    return out


async def _patients_of(port: int, tmp: Path, study: str) -> list[str]:
    status, found = await findscu(port, tmp, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}", "PatientID")
    assert status == "Success"
    return [str(d.get("PatientID", "")) for d in found]


@pytest.mark.parametrize("duplicates", ["keep", "replace"])
async def test_an_instance_naming_a_held_series_or_study_under_another_parent_is_refused(
    tmp_path: Path, index: str | None, duplicates: str
) -> None:
    study_a, study_b, series_x, series_y = (generate_uid() for _ in range(4))
    one, two, three, four = (generate_uid() for _ in range(4))

    def ct(name: str, uid: str, study: str, series: str, patient: str) -> Path:
        return write_ct(tmp_path / f"{name}.dcm", SOPInstanceUID=uid, StudyInstanceUID=study,
                        SeriesInstanceUID=series, PatientID=patient)  # fmt: skip

    async with running_serve(tmp_path / "arch", duplicates=duplicates, index=index) as srv:
        _code, out = await storescu(srv.port, ct("1", one, study_a, series_x, "P1"))
        assert store_statuses(out) == ["Success"], out
        with Lines() as log:
            # Series X is study A's: an instance of it naming study B is refused; study A
            # is patient P1's: an instance of it for patient P2 is refused.
            answers = await asyncio.to_thread(pynetdicom_store, srv.port, ct("2", two, study_b, series_x, "P1"),
                                              ct("3", three, study_a, series_y, "P2"))  # fmt: skip
        assert [(status, tags) for status, _comment, tags in answers] == [
            (0xA900, [SERIES_UID]),
            (0xA900, [PATIENT_ID]),
        ]
        assert "another study" in answers[0][1] and "another patient" in answers[1][1], answers
        refusals = [m for m in log.lines if m.startswith("C-STORE data set cannot be indexed")]
        assert len(refusals) == 2, log.lines
        assert "another study" in refusals[0] and "another patient" in refusals[1], refusals
        # What was held is found as it was: instance one under study A, series X, P1.
        assert await _images(srv.port, tmp_path, study_a) == {one: ("P1", study_a, series_x)}
        assert await _images(srv.port, tmp_path, study_b) == {}
        assert await _patients_of(srv.port, tmp_path, study_a) == ["P1"]
        # Another instance of study A for P1, in a new series: stored.
        _code, out = await storescu(srv.port, ct("4", four, study_a, series_y, "P1"))
        assert store_statuses(out) == ["Success"], out
        assert await _images(srv.port, tmp_path, study_a) == {
            one: ("P1", study_a, series_x),
            four: ("P1", study_a, series_y),
        }
        if duplicates == "replace":
            # The only instance of series X sent again under study B moves with its series
            # (no other instance is in it), and study A keeps instance four.
            _code, out = await storescu(srv.port, ct("1b", one, study_b, series_x, "P1"))
            assert store_statuses(out) == ["Success"], out
            assert await _images(srv.port, tmp_path, study_b) == {one: ("P1", study_b, series_x)}
            assert await _images(srv.port, tmp_path, study_a) == {four: ("P1", study_a, series_y)}


async def test_stores_naming_one_series_under_two_studies_at_once_keep_one(tmp_path: Path, index: str | None) -> None:
    """Two associations at once (pynetdicom), each storing one instance of every new
    series X1..X12, one under study S1..S12, the other under T1..T12: for each series
    exactly one store succeeds and the other is refused 0xA900; the series is found
    under the winner's study only, with its one instance (on PostgreSQL, with four
    writers, the series and the study are locked for the transaction first)."""
    pairs = [(generate_uid(), generate_uid(), generate_uid()) for _ in range(12)]  # (series, study S, study T)
    first = [ct_file(tmp_path / f"s{i}.dcm", generate_uid(), s, x) for i, (x, s, _t) in enumerate(pairs)]
    second = [ct_file(tmp_path / f"t{i}.dcm", generate_uid(), t, x) for i, (x, _s, t) in enumerate(pairs)]
    async with running_serve(tmp_path / "arch", index=index) as srv:
        a, b = await asyncio.gather(
            asyncio.to_thread(pynetdicom_store, srv.port, *first),
            asyncio.to_thread(pynetdicom_store, srv.port, *second),
        )
        for i, (x, s, t) in enumerate(pairs):
            statuses = sorted((a[i][0], b[i][0]))
            assert statuses == [0, 0xA900], (i, a[i], b[i])
            winner = s if a[i][0] == 0 else t
            for study in (s, t):
                found = await _images(srv.port, tmp_path, study)
                assert len(found) == (1 if study == winner else 0), (i, study, found)
                assert all(series == x for _pid, _study, series in found.values())


def ct_file(path: Path, uid: str, study: str, series: str) -> Path:
    return write_ct(path, SOPInstanceUID=uid, StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="P1")


async def test_postgresql_judges_a_series_named_by_a_store_not_yet_committed(postgresql, tmp_path: Path) -> None:
    """PostgreSQL, several writers: one transaction has put instance B under series X of
    study T and not committed; a store of instance A naming X under study S waits for it
    (the series' lock), then sees B and is refused (SQLSTATE DA001) instead of moving X."""
    import asyncpg

    from dimse_async.archive.backend import IndexRow
    from dimse_async.archive.index import Archive

    dsn = postgresql.new_database()
    arch = Archive(tmp_path / "arch", index=dsn)
    assert await arch.count() == 0  # migrated
    arch.close()

    def row(sop: str, study: str, series: str) -> list[object]:
        return list(IndexRow("P", "P", "{}", "", study, "", "", "{}", series, "CT", "{}", sop, "1.2.3",
                             "1.2.840.10008.1.2", f"/x/{sop}.dcm", 1, 0.0, "{}"))  # fmt: skip

    call = f"SELECT index_instance({', '.join(f'${i + 1}' for i in range(18))})"
    a, b = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        tx = b.transaction()
        await tx.start()
        await b.execute(call, *row("1.2", "9.2", "9.9"))  # B: series 9.9 under study 9.2, not committed
        storing = asyncio.ensure_future(a.execute(call, *row("1.1", "9.1", "9.9")))  # A: 9.9 under 9.1
        await asyncio.sleep(0.3)
        assert not storing.done()  # waits for B's transaction
        await tx.commit()
        with pytest.raises(asyncpg.PostgresError) as raised:
            await asyncio.wait_for(storing, 10)
        assert raised.value.sqlstate == "DA001", raised.value
        assert [tuple(r) for r in await a.fetch("SELECT series_uid, study_uid FROM series")] == [("9.9", "9.2")]
        assert [r[0] for r in await a.fetch("SELECT sop_uid FROM instances")] == ["1.2"]
    finally:
        await a.close()
        await b.close()
