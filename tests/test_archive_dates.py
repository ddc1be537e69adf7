"""A stored instance is found by a C-FIND on its Study Date whatever legal form the
date was stored in: the ACR-NEMA ``YYYY.MM.DD`` (PS3.5 §6.2, still sent by old
modalities), padding, a year or a month. The SQL prefilter compared the stored text
with ``YYYYMMDD`` bounds, so ``1993.02.15`` was outside ``19930101-19931231`` and the
study was never offered to the matcher (which reads it right). The index now keeps the
date as the matcher compares it (``date_ranges.index_date``), a migration rewrites the
rows indexed before, and key values are read as the matcher reads them. SQLite and a
real PostgreSQL (the ``index`` fixture)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pydicom
from normalized_helpers import HOST, make_instances, running_serve, store
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dimse_async as da
from dimse_async.archive.backend import IndexRow, index_statements, migrations, split_statements
from dimse_async.archive.date_ranges import index_date
from dimse_async.archive.index import Archive
from dimse_async.archive.schema import name_key, patient_key_of, text_of
from dimse_async.services.qr import MODELS

STUDY_FIND = MODELS["study"]["find"]

#: Stored Study Date -> the day the matcher takes it for.
STORED = {
    "1993.02.15": "19930215",  # ACR-NEMA
    "19930316": "19930316",
    "1993": "19930101",  # a year (reduced precision; the matcher takes its first day)
    "199304": "19930401",
}


def test_index_date_is_what_the_matcher_compares() -> None:
    for stored, day in STORED.items():
        assert index_date(stored) == day
    assert index_date(" 19930215 ") == "19930215"
    assert index_date("") == ""
    assert index_date("19930215\\19940101") == ""  # several values: always a candidate
    assert index_date("UNKNOWN") == ""
    assert index_date("19931350") == ""  # the shape of a date, none


def _query(date: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.StudyDate = date
    return q


async def _found(port: int, date: str) -> set[str]:
    ae = da.AE("FINDER")
    ae.add_requested_context(STUDY_FIND)
    async with ae.associate(HOST, port, "ARCHIVE") as assoc:
        async with assoc.c_find(_query(date), model="study") as responses:
            found = {str(ds.StudyDate) async for ds in responses}
        assert int(responses.status) == 0
    return found


#: A key -> the stored dates it finds (those of the four studies above).
KEYS = {
    "19930101-19931231": set(STORED),
    "19930215-19930331": {"1993.02.15", "19930316"},
    "-19930215": {"1993.02.15", "1993"},
    "19930301-": {"19930316", "199304"},
    "19930215": {"1993.02.15"},
    "1993.02.15": {"1993.02.15"},  # an ACR-NEMA key reads as that day
    "199302": {"1993.02.15"},  # a month: its days
    "1993-1993": set(STORED),
    "19930101\\19930316": {"1993", "19930316"},
    "19940101-": set(),
}


async def test_odd_stored_dates_are_found_by_date_keys(tmp_path: Path, index: str | None) -> None:
    paths = []
    for n, date in enumerate(STORED):
        ((path, _c, _i),) = make_instances(tmp_path / f"in{n}", 1, patient_id=f"P{n}")
        ds = pydicom.dcmread(path)
        ds.StudyDate = date
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    async with running_serve(tmp_path / "archive", index=index) as serve:
        await store(serve.port, paths)
        for key, expected in KEYS.items():
            assert await _found(serve.port, key) == expected, key


def _row(date: str) -> IndexRow:
    patient = {"PatientID": f"P{date}", "PatientName": "Old^Row"}
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    study_attrs = {"StudyInstanceUID": study, "StudyDate": date}
    return IndexRow(
        patient_key_of(patient, study), patient["PatientID"], json.dumps(patient), name_key(patient["PatientName"]),
        study, date, "", json.dumps(study_attrs),
        series, "CT", json.dumps({"SeriesInstanceUID": series, "Modality": "CT"}),
        sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"/nonexistent/{sop}", 100, 0.0,
        json.dumps({"SOPInstanceUID": sop}),
    )  # fmt: skip


def _old_sqlite_index(root: Path, dates: list[str]) -> None:
    """An index.sqlite at the migration before the normalised Study Date, its rows as
    the index wrote them then (the stored text)."""
    root.mkdir()
    earlier = [m for m in migrations("sqlite") if not m[1].endswith("_study_date_normalised.sql")]
    with contextlib.closing(sqlite3.connect(root / "index.sqlite")) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)")
        for version, name, sql in earlier:
            for statement in split_statements(sql):
                db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (?, ?, 0)", (version, name))
        for date in dates:
            for sql, parameters in index_statements(_row(date)):
                db.execute(sql, parameters)
        db.commit()


def _old_postgresql_index(server: Any, dsn: str, dates: list[str]) -> None:
    earlier = [m for m in migrations("postgresql") if not m[1].endswith("_study_date_normalised.sql")]
    script = [
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        "applied TIMESTAMPTZ NOT NULL DEFAULT now());"
    ]
    for version, name, sql in earlier:
        script += [sql, f"INSERT INTO schema_version (version, name) VALUES ({version}, '{name}');"]
    for date in dates:
        for sql, parameters in index_statements(_row(date)):
            for value in parameters:
                literal = str(value).replace("'", "''")
                sql = sql.replace("?", f"'{literal}'" if not isinstance(value, int | float) else str(value), 1)
            script.append(sql + ";")
    server.psql("\n".join(script), dsn=dsn)


async def test_rows_indexed_before_are_rewritten_by_the_migration(tmp_path: Path, index: str | None, request) -> None:
    dates = [*STORED, " 19930520", "19930215\\19940101", "junk", ""]
    root = tmp_path / "archive"
    if index is None:
        _old_sqlite_index(root, dates)
    else:
        root.mkdir()
        _old_postgresql_index(request.getfixturevalue("postgresql"), index, dates)
    archive = Archive(root, index=index)
    try:
        assert await archive.count() == len(dates)  # migrated
        found = await archive.find(STUDY_FIND, _query("19930101-19931231"))
        days = sorted(text_of(ds.StudyDate) for ds in found)
    finally:
        archive.close()
    # the four of STORED, the padded one, several values (one in the range), the unknown
    # one (a Required Key: an unknown value matches, PS3.4 C.2.2.1.2); not "junk"
    assert days == sorted([*STORED, " 19930520", "19930215\\19940101", ""]), days
