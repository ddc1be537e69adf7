"""The archive's queries hold nothing of the index while a peer does not read, and
retrieves are read a page at a time within a cap, through ``serve``'s AE on
127.0.0.1: C-FINDs whose responses are never read take no PostgreSQL pool connection
and no SQLite read snapshot (stores go on, WAL checkpoints complete); a C-GET /
C-MOVE over ``retrieve_max_instances`` is refused 0xA702 (PS3.4 C.4.2.1.5, C.4.3.1.3)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import PostgreSQLServer, dcmtk, free_port, stop_process, wait_tcp
from normalized_helpers import HOST, make_instances, park, running_serve, store
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from rawpeer import RawPeer, find_identifier, find_rq, pdata, wait_for
from test_archive_qr_hostile import Lines

import dimse_async as da
from dimse_async.archive.backend import IndexRow, index_statements
from dimse_async.archive.schema import name_key, patient_key_of
from dimse_async.services.qr import MODELS

WAIT = 30.0
CT = "1.2.840.10008.5.1.4.1.1.2"


def populate(archive: Any, studies: int, patients: int = 20, comments: int = 10_000) -> None:
    """``studies`` studies (a series and an instance each, no files) of ``patients``
    patients whose Patient Comments are ``comments`` long: each STUDY-level response
    asking for them is that large."""
    statements = []
    for k in range(studies):
        patient = {"PatientID": f"P{k % patients}", "PatientName": "Doe^Pat", "PatientComments": "x" * comments}
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        row = IndexRow(
            patient_key_of(patient, study), patient["PatientID"], json.dumps(patient), name_key("Doe^Pat"),
            study, "20200101", f"A{k}", json.dumps({"StudyInstanceUID": study, "StudyDate": "20200101"}),
            series, "CT", json.dumps({"SeriesInstanceUID": series, "Modality": "CT"}),
            sop, CT, "1.2.840.10008.1.2.1", f"/nonexistent/{sop}", 100, 0.0, json.dumps({"SOPInstanceUID": sop}),
        )  # fmt: skip
        statements += index_statements(row)[0 if k < patients else 1 :]  # each patient written once
    db = archive.backend.connect()  # closed after: a PostgreSQL one is back in the pool
    try:
        archive.backend.transaction(db, statements)  # one round trip to PostgreSQL's loop
    finally:
        db.close()


async def non_reading_finds(serve: Any, count: int) -> list[RawPeer]:
    """``count`` associations, each sending a C-FIND of every study (with its large
    Patient Comments) and never reading a response; once each has responses queued
    for it (its query stopped on its output)."""
    hogs = []
    for _ in range(count):
        peer = await RawPeer.connect(serve.port)
        hogs.append(peer)
        await peer.associate()
        peer.writer.transport.pause_reading()
        q = find_identifier("STUDY")
        q.PatientComments = ""
        cmd, data = find_rq(q)
        await peer.send(pdata(7, cmd, command=True) + pdata(7, data, command=False))
    await wait_for(lambda: serve.ae.output_budget.holders >= count, 10, "every C-FIND stuck on its output")
    return hogs


async def find_patient(port: int, patient_id: str) -> list[Dataset]:
    ae = da.AE("VICTIM", dimse_timeout=WAIT)
    ae.add_requested_context(MODELS["study"]["find"])
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id
    q.StudyInstanceUID = ""
    async with ae.associate(HOST, port, "ARCHIVE") as assoc:
        async with assoc.c_find(q, model="study") as responses:
            found = [d async for d in responses]
    assert int(responses.status) == 0, responses.status
    return found


async def test_finds_not_read_take_no_postgresql_connection(tmp_path: Path, postgresql: PostgreSQLServer) -> None:
    """More non-reading C-FIND clients than the pool has connections: none holds one
    (each batch returns its connection before its matches go out), so C-STOREs from
    another client are answered at once and found."""
    dsn = postgresql.new_database()
    async with running_serve(tmp_path / "archive", index=dsn, max_buffered_output=256 << 10) as serve:
        backend: Any = serve.archive.backend
        assert backend._pool is None, "the pool was opened before its size could be set"
        backend.pool_size = 4
        await asyncio.to_thread(populate, serve.archive, 1500)
        hogs = await non_reading_finds(serve, 5)
        try:
            pool = backend._pool
            # None held (at most one a moment, by a batch just finishing): before, each kept one.
            await wait_for(lambda: pool.get_size() - pool.get_idle_size() <= 1, 5, "pool connections released")
            files = make_instances(tmp_path / "in", 3, patient_id="LEGIT")
            started = time.monotonic()
            await asyncio.wait_for(store(serve.port, [p for p, _c, _i in files]), 10)
            assert time.monotonic() - started < 5.0
            assert len(await asyncio.wait_for(find_patient(serve.port, "LEGIT"), 10)) == 1
        finally:
            for peer in hogs:
                peer.writer.transport.abort()


async def test_find_not_read_does_not_stop_wal_checkpoints(tmp_path: Path) -> None:
    """A non-reading C-FIND client holds no SQLite read transaction: while stores go on,
    another connection's ``PRAGMA wal_checkpoint(TRUNCATE)`` completes (not busy, the
    WAL emptied), so the WAL cannot grow without bound behind a stuck query."""
    async with running_serve(tmp_path / "archive", max_buffered_output=256 << 10) as serve:
        await asyncio.to_thread(populate, serve.archive, 1500)
        hogs = await non_reading_finds(serve, 1)
        try:
            files = make_instances(tmp_path / "in", 3, patient_id="LEGIT")
            await asyncio.wait_for(store(serve.port, [p for p, _c, _i in files]), 10)
            path = serve.archive.backend.path  # type: ignore[attr-defined]
            con = sqlite3.connect(path, timeout=0.5)
            try:
                busy, frames, done = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                con.close()
            assert busy == 0, f"checkpoint blocked by a reader ({frames} frames, {done} checkpointed)"
            assert Path(f"{path}-wal").stat().st_size == 0
            assert len(await asyncio.wait_for(find_patient(serve.port, "LEGIT"), 10)) == 1
        finally:
            for peer in hogs:
                peer.writer.transport.abort()


def getter(sop_class: str) -> tuple[da.AE, list[str]]:
    ae = da.AE("GETTER", dimse_timeout=WAIT)
    ae.add_requested_context(MODELS["study"]["get"])
    ae.add_requested_context(sop_class, scu_role=False, scp_role=True)
    received: list[str] = []

    @ae.on_c_store
    async def on_store(request: Any) -> int:
        received.append(request.sop_instance_uid)
        return 0

    return ae, received


def study_key(study: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    return query


async def test_retrieve_over_the_cap_is_refused(tmp_path: Path) -> None:
    """A study of 3 instances with ``retrieve_max_instances = 2``: the C-GET (ours) and
    the C-MOVE (pynetdicom's) are refused 0xA702 before any sub-operation, and the
    reason is logged."""
    from pynetdicom import AE as PynetAE  # type: ignore[import-untyped]

    files = make_instances(tmp_path / "in", 3)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    known = {"DEST": (HOST, free_port())}  # never reached: refused before
    lines = Lines()
    async with running_serve(tmp_path / "archive", retrieve_max_instances=2, known_aes=known) as serve:
        await store(serve.port, [p for p, _c, _i in files])
        ae, received = getter(files[0][1])
        with lines:
            async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
                progress = [p async for p in assoc.c_get(study_key(study), model="study")]
        assert int(progress[-1].status) == 0xA702, progress
        assert len(progress) == 1 and received == []

        def move() -> list[int]:
            scu = PynetAE(ae_title="MOVER")
            scu.add_requested_context(MODELS["study"]["move"])
            assoc = scu.associate(HOST, serve.port, ae_title="ARCHIVE")
            assert assoc.is_established
            try:
                park(assoc)
                return [int(s.Status) for s, _i in assoc.send_c_move(study_key(study), "DEST", MODELS["study"]["move"])]
            finally:
                assoc.release()

        with lines:
            assert await asyncio.to_thread(move) == [0xA702]
    refused = [line for line in lines.lines if "too many instances" in line]
    assert len(refused) == 2, lines.lines


def fill_study(serve: Any, source: Path, sop_class: str, study: str, count: int) -> None:
    """``count`` instances of one study and series in the index, each a copy of ``source``."""
    copies = source.parent / "copies"
    copies.mkdir()
    size = source.stat().st_size
    series = generate_uid()
    patient = {"PatientID": "MANY"}
    db = serve.archive.connection()
    with db:
        for n in range(count):
            uid = generate_uid()
            path = copies / f"{n}.dcm"
            shutil.copyfile(source, path)
            row = IndexRow(
                patient_key_of(patient, study), "MANY", json.dumps(patient), "",
                study, "", "", json.dumps({"StudyInstanceUID": study}),
                series, "CT", json.dumps({"SeriesInstanceUID": series}),
                uid, sop_class, "1.2.840.10008.1.2.1", str(path), size, 0.0, json.dumps({}),
            )  # fmt: skip
            for sql, parameters in index_statements(row):
                db.execute(sql, parameters)


async def test_retrieve_of_many_instances_is_paged(tmp_path: Path) -> None:
    """600 instances of one study (three pages of the look-up), exactly the cap: a
    C-GET sends every one, the counters add up from the first pending response (the
    total was counted), and the later pages are read while the sub-operations go on
    (the instances are not collected first)."""
    source, sop_class, _uid = make_instances(tmp_path / "in", 1)[0]
    study = generate_uid()
    async with running_serve(tmp_path / "archive", retrieve_max_instances=600) as serve:
        await asyncio.to_thread(fill_study, serve, source, sop_class, study, 600)
        ae, received = getter(sop_class)
        pages: list[int] = []  # instances received when each page was read
        real = serve.archive._retrieve_page

        def page(*args: Any) -> Any:
            pages.append(len(received))
            return real(*args)

        serve.archive._retrieve_page = page  # type: ignore[method-assign]
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            progress = [p async for p in assoc.c_get(study_key(study), model="study")]
    final = progress[-1]
    assert int(final.status) == 0, final
    assert (final.completed, final.failed, final.warning) == (600, 0, 0), final
    assert len(received) == 600
    assert [p.remaining for p in progress[:-1]] == list(range(599, 0, -1))
    assert len(pages) == 3 and pages[0] == 0 and pages[-1] > 0, pages


async def test_move_of_many_instances_to_dcmtk_storescp(tmp_path: Path) -> None:
    """A C-MOVE of 300 instances to DCMTK's storescp: the contexts come from the
    index (no file read ahead), every instance arrives, the final status is Success."""
    source, sop_class, _uid = make_instances(tmp_path / "in", 1)[0]
    study = generate_uid()
    port = free_port()
    out = tmp_path / "storescp-out"
    out.mkdir()
    log = tmp_path / "storescp.log"
    argv = [dcmtk("storescp"), "+B", "-aet", "DEST", "-od", str(out), str(port)]
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_tcp(proc, port, log)
        async with running_serve(tmp_path / "archive", known_aes={"DEST": (HOST, port)}) as serve:
            await asyncio.to_thread(fill_study, serve, source, sop_class, study, 300)
            ae = da.AE("MOVER", dimse_timeout=WAIT)
            ae.add_requested_context(MODELS["study"]["move"])
            async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
                progress = [p async for p in assoc.c_move(study_key(study), "DEST", model="study")]
    finally:
        stop_process(proc)
    final = progress[-1]
    assert int(final.status) == 0, (final, log.read_text(errors="replace")[-2000:])
    assert (final.completed, final.failed, final.warning) == (300, 0, 0), final
    assert progress[0].remaining == 299
    assert len(list(out.iterdir())) == 1  # 300 copies of one instance, stored under its UID


@pytest.mark.parametrize("batch", [5, 64])
async def test_paged_find_yields_every_match_once(tmp_path: Path, batch: int) -> None:
    """Batches of any size cut pages anywhere (a page's rows left for the next batch):
    every one of 150 studies is found exactly once, also when another study is stored
    between batches (found once or not at all, never twice)."""
    from dimse_async.archive.index import Archive

    archive = Archive(tmp_path / "archive", fsync=False)
    try:
        await asyncio.to_thread(populate, archive, 150, 20, 10)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        found = []
        async for ds in archive.find_iter(MODELS["study"]["find"], query, batch=batch):
            found.append(str(ds.StudyInstanceUID))
            if len(found) == 75:
                await asyncio.to_thread(populate, archive, 1, 1, 10)
        assert len(found) == len(set(found)) and len(found) in (150, 151), len(found)
        assert len(await archive.find(MODELS["study"]["find"], query)) == 151
    finally:
        archive.close()


#: (model, level, keys, relational, the table whose index gives the key order)
PLANS = [
    ("patient", "PATIENT", {"PatientName": ""}, False, "patients"),
    ("study", "STUDY", {"StudyInstanceUID": ""}, False, "studies"),
    ("patient", "STUDY", {"PatientID": "BIG", "StudyInstanceUID": ""}, False, "studies"),
    ("study", "SERIES", {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": ""}, False, "series"),
    ("study", "SERIES", {"SeriesInstanceUID": ""}, True, "series"),
    ("study", "IMAGE", {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.0", "SOPInstanceUID": ""}, False,
     "instances"),
    ("patient", "IMAGE", {"SOPInstanceUID": ""}, True, "instances"),
]  # fmt: skip


def populate_shapes(archive: Any) -> None:
    """2000 patients of one study, series and instance each, and patient BIG with study
    1.2.3 of 300 series, the first of 300 instances (and a few more studies)."""
    statements = []
    for k in range(2000):
        patient = {"PatientID": f"P{k}"}
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        statements += index_statements(
            IndexRow(
                patient_key_of(patient, study), f"P{k}", json.dumps(patient), "", study, "", "", "{}",
                series, "CT", "{}", sop, CT, "", f"/x/{sop}", 1, 0.0, "{}",
            )
        )  # fmt: skip
    big = {"PatientID": "BIG"}
    for s in range(300):
        series = f"1.2.3.{s}"
        study = "1.2.3" if s >= 5 else f"1.2.4.{s}"
        for n in range(300 if s == 0 else 1):
            sop = f"{series}.{n}"
            statements += index_statements(
                IndexRow(
                    patient_key_of(big, ""), "BIG", json.dumps(big), "", "1.2.3" if s == 0 else study, "", "", "{}",
                    series, "CT", "{}", sop, CT, "", f"/x/{sop}", 1, 0.0, "{}",
                )
            )  # fmt: skip
    db = archive.backend.connect()
    try:
        archive.backend.transaction(db, statements)
    finally:
        db.close()


async def test_pages_read_in_key_order_from_an_index(tmp_path: Path, index: str | None) -> None:
    """EXPLAIN of the next page of a wide query at each level (patient and study root,
    relational too) and of a query within one study or series: the level's rows are
    read from an index in key order after the last key (no scan of the table, no sort of
    every row at every page). A patient's studies may be sorted (the patient's only)."""
    from dimse_async.archive.index import Archive
    from dimse_async.archive.query import _PagedQuery

    archive = Archive(tmp_path / "archive", fsync=False, index=index)
    try:
        await asyncio.to_thread(populate_shapes, archive)

        def plans() -> list[tuple[str, str]]:
            db = archive.connection()
            if index is not None:
                db.execute("ANALYZE")  # as autovacuum does (SQLite's index is never analyzed)
            out = []
            for model, level, keys, relational, table in PLANS:
                query_ds = Dataset()
                query_ds.QueryRetrieveLevel = level
                for k, v in keys.items():
                    setattr(query_ds, k, v)
                query = _PagedQuery(model, query_ds, relational)
                query.last = "1.2"
                sql, args = query.sql(), query.arguments()
                if index is None:
                    text = " | ".join(str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall())
                else:
                    text = " | ".join(str(r[0]) for r in db.execute("EXPLAIN " + sql, args).fetchall())
                out.append((f"{model} {level} {sorted(keys)}: {text}", table))
            return out

        for plan, table in await asyncio.to_thread(plans):
            if index is None:
                alias = {"patients": "p", "studies": "st", "series": "se", "instances": "i"}[table]
                assert f"SCAN {alias} " not in plan + " ", plan  # SEARCH ... (key>?)
                if "PatientID" not in plan:
                    assert "TEMP B-TREE" not in plan, plan
            else:
                assert f"Seq Scan on {table}" not in plan, plan
                if "PatientID" not in plan:
                    assert "Sort" not in plan, plan
    finally:
        archive.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_long_uid_list_is_read_in_pieces_of_the_index(tmp_path: Path, backend: str, request: Any) -> None:
    """A STUDY-level C-FIND listing 2,500 stored Study Instance UIDs and 2,500 others
    (List of UID Matching, over the 1,000 values of one SQL IN): the list is looked up
    in the index a piece at a time, each piece a page at a time in key order, and
    each stored study is returned once (PostgreSQL may sort keys otherwise than Python)."""
    index = request.getfixturevalue("postgresql").new_database() if backend == "postgresql" else None
    async with running_serve(tmp_path / "archive", index=index) as serve:
        await asyncio.to_thread(populate, serve.archive, 3000, 20, 10)
        db = serve.archive.backend.connect()
        try:
            stored = sorted(row[0] for row in db.execute("SELECT study_uid FROM studies").fetchall())
        finally:
            db.close()
        wanted = stored[::6] + stored[1::6] + stored[2::6] + stored[3::6] + stored[4::6]  # 2,500
        ae = da.AE("LISTER", dimse_timeout=WAIT)
        ae.add_requested_context(MODELS["study"]["find"])
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = [f"2.25.{k}" for k in range(2500)] + wanted
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            async with assoc.c_find(q, model="study") as responses:
                found = [str(d.StudyInstanceUID) async for d in responses]
        assert int(responses.status) == 0, responses.status
        assert sorted(found) == sorted(wanted) and len(found) == len(set(found))


def test_the_values_of_a_uid_list_sent_as_un_narrow_exactly() -> None:
    """A Study Instance UID list over 64 KiB is sent as UN in explicit VR (PS3.5 6.2.2):
    its values for SQL are the UIDs without padding, first and last included (they were
    read from the bytes' repr, so a C-FIND or C-MOVE missed those two studies)."""
    from dimse_async.archive.schema import exact_values
    from dimse_async.codec import decode_identifier, encode_dataset

    q = Dataset()
    uids = [f"2.25.{k}" for k in range(9000)] + ["1.2.345"]
    q.StudyInstanceUID = uids
    with pytest.warns(UserWarning):
        data = encode_dataset(q, "1.2.840.10008.1.2.1")
    decoded = decode_identifier(data, "1.2.840.10008.1.2.1")
    assert decoded["StudyInstanceUID"].VR == "UN"
    assert exact_values(decoded.get("StudyInstanceUID")) == uids


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_retrieve_of_a_uid_list_longer_than_a_statement_takes(tmp_path: Path, backend: str, request: Any) -> None:
    """A C-GET at IMAGE level listing 40,000 SOP Instance UIDs, three of them stored
    (List of UID Matching; more arguments than PostgreSQL takes in one statement,
    32,767): the list is looked up 1,000 values at a time, the three are counted and
    sent, and the C-GET succeeds (it failed 0xC000 on PostgreSQL). Over 1,000 values of
    a key above the level, which must be single-valued (PS3.4 C.4.2.2.1), is 0xA900."""
    index = request.getfixturevalue("postgresql").new_database() if backend == "postgresql" else None
    files = make_instances(tmp_path / "in", 3)
    first = pydicom.dcmread(files[0][0])
    async with running_serve(tmp_path / "archive", index=index) as serve:
        await store(serve.port, [p for p, _c, _i in files])
        ae, received = getter(files[0][1])
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = first.StudyInstanceUID
        q.SeriesInstanceUID = first.SeriesInstanceUID
        q.SOPInstanceUID = [f"2.25.{k}" for k in range(20_000)] + [i for _p, _c, i in files] + [f"2.{k}" for k in range(20_000)]
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            progress = [p async for p in assoc.c_get(q, model="study")]
            final = progress[-1]
            assert int(final.status) == 0, final
            assert (final.completed, final.failed, final.warning) == (3, 0, 0), final
            assert sorted(received) == sorted(i for _p, _c, i in files)
            q.QueryRetrieveLevel = "SERIES"
            q.SeriesInstanceUID = [f"2.25.{k}" for k in range(1_001)]
            q.StudyInstanceUID = [first.StudyInstanceUID] + [f"2.{k}" for k in range(1_001)]
            del q.SOPInstanceUID
            refused = [p async for p in assoc.c_get(q, model="study")]
        assert int(refused[-1].status) == 0xA900 and len(received) == 3, refused


@pytest.mark.parametrize("vr", ["US", "SQ", "LO"])
async def test_a_retrieve_key_of_the_wrong_vr_is_refused(tmp_path: Path, vr: str) -> None:
    """A C-GET whose Study Instance UID comes (explicit VR) as US or SQ instead of UI
    names nothing that can be stored: 0xA900, not Success with no sub-operations
    (PS3.4 C.4.2.2.1); as LO (text all the same) it is read as the UID it holds."""
    from pydicom.dataelem import DataElement
    from pydicom.sequence import Sequence

    files = make_instances(tmp_path / "in", 1)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        ae, received = getter(files[0][1])
        ae.requested_contexts.clear()
        ae.add_requested_context(MODELS["study"]["get"], "1.2.840.10008.1.2.1")  # explicit VR: the VR travels
        ae.add_requested_context(files[0][1], scu_role=False, scp_role=True)
        bad = Dataset()
        bad.QueryRetrieveLevel = "STUDY"
        value = {"US": 5, "SQ": Sequence([Dataset()]), "LO": study}[vr]
        bad.add(DataElement(0x0020000D, vr, value))
        async with ae.associate(HOST, serve.port, "ARCHIVE") as assoc:
            refused = [p async for p in assoc.c_get(bad, model="study")]
            good = [p async for p in assoc.c_get(study_key(study), model="study")]
    if vr == "LO":
        assert int(refused[-1].status) == 0 and int(good[-1].status) == 0 and len(received) == 2, (refused, good)
    else:
        assert int(refused[-1].status) == 0xA900, refused
        assert int(good[-1].status) == 0 and len(received) == 1, good
