"""A small archive: received files on disk plus an SQLite index, served by
C-STORE, C-FIND, C-GET and C-MOVE handlers (PS3.4 Annex B, C) and an optional
modality worklist (Annex K) from a directory of worklist files.

The index holds one row per patient, study, series and instance with the
attributes PS3.4 C.6 lists as keys; a query is narrowed in SQL by its exact UID
/ ID / date keys and then matched in full with :mod:`.matching`. All SQLite work
runs on one worker thread, so the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import warnings
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset

from ..dimse import Status
from ..log import get_logger
from ..part10 import valid_uid
from ..services.qr import MODELS, QueryRequest, StatusError
from ..services.storage import StoreRequest
from .matching import matches, parse_range, response_identifier

if TYPE_CHECKING:
    from ..ae import AE

__all__ = ["LEVEL_KEYS", "Archive", "Worklist"]

log = get_logger()

#: Attributes kept per level (PS3.4 C.6.1.1 / C.6.2.1 keys and common optional ones).
LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "OtherPatientIDs",
        "EthnicGroup",
        "PatientComments",
    ),
    "STUDY": (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "StudyDescription",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
    ),
    "SERIES": (
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "PerformedProcedureStepStartDate",
    ),
    "IMAGE": (
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ContentDate",
        "ContentTime",
        "AcquisitionDate",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "ImageType",
    ),
}
_UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_ORDER = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_ALL_KEYS = [k for level in _ORDER for k in LEVEL_KEYS[level]]
_CHARSET = "SpecificCharacterSet"  # stored with each level's attributes, never matched
_VR = {k: pydicom.datadict.dictionary_VR(pydicom.datadict.tag_for_keyword(k)) for k in _ALL_KEYS}

_SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS patients (
    patient_id TEXT PRIMARY KEY, attrs TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, patient_id TEXT NOT NULL, study_date TEXT,
    accession TEXT, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_id);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, modality TEXT, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, sop_class TEXT NOT NULL,
    transfer_syntax TEXT, path TEXT NOT NULL UNIQUE, size INTEGER, mtime REAL, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
"""

# Which information model allows which levels, and the root of its hierarchy.
_MODEL_LEVELS = {
    "patient": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    "study": ("STUDY", "SERIES", "IMAGE"),
    "patient-study": ("PATIENT", "STUDY"),
}
_MODEL_BY_UID = {uid: name for name, ops in MODELS.items() for uid in ops.values() if name in _MODEL_LEVELS}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _attrs(ds: Dataset, level: str) -> dict[str, str]:
    attrs = {k: _text(ds.get(k)) for k in LEVEL_KEYS[level] if k in ds}
    if _CHARSET in ds:  # the values are kept decoded; remember which repertoire they need
        attrs[_CHARSET] = _text(ds.get(_CHARSET))
    return attrs


def _dataset(*attr_maps: dict[str, str]) -> Dataset:
    """A candidate built from index rows, declaring a Specific Character Set that can
    encode its values: the rows' own when they agree, else UTF-8 (PS3.5 §6.1.2.5.3)."""
    ds = Dataset()
    charsets = {attrs[_CHARSET] for attrs in attr_maps if attrs.get(_CHARSET, "").strip("\\ ")}
    if charsets:
        ds.SpecificCharacterSet = _split(charsets.pop()) if len(charsets) == 1 else "ISO_IR 192"
    for attrs in attr_maps:
        for key, value in attrs.items():
            if key == _CHARSET:
                continue
            vr = _VR[key]
            if vr in ("US", "SS", "UL", "SL"):
                setattr(ds, key, int(value) if value.strip().lstrip("-").isdigit() else None)
            else:
                setattr(ds, key, _split(value))
    return ds


def _split(value: str) -> str | list[str]:
    return value.split("\\") if "\\" in value else value


def _name_key(name: str) -> str:
    """What a PN key without ``=`` is matched against: the alphabetic group, upper case
    (PN matching is case-insensitive here, see :mod:`.matching`)."""
    return name.split("=", 1)[0].rstrip(" ^").upper()


def _name_prefix(value: Any) -> str:
    """The literal prefix of a single-valued PN key, upper case; "" when none can be used."""
    text = _text(value).strip()
    if not text or "\\" in text or "=" in text:
        return ""
    for i, ch in enumerate(text):
        if ch in "*?":
            return text[:i].upper()
    return text.rstrip(" ^").upper()


def _level(model: str, identifier: Dataset, what: str) -> str:
    """The identifier's level, refused (0xA900) when the model has no such level."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in _MODEL_LEVELS[model]:
        raise StatusError(Status(0xA900, f"{what} level {level!r} not valid for this model"))
    return level


def _model(model_uid: str) -> str:
    model = _MODEL_BY_UID.get(model_uid)
    if model is None:
        raise StatusError(Status(0x0122, "Information model not supported"))
    return model


def _where_in(identifier: Dataset, key: str, column: str, where: list[str], args: list[Any]) -> None:
    """Add ``column IN (...)`` for a key with exact values (no wildcard, no range)."""
    values = _exact(identifier.get(key)) if key in identifier else None
    if values:
        where.append(f"{column} IN ({','.join('?' * len(values))})")
        args.extend(values)


def _exact(value: Any) -> list[str] | None:
    """Values of a key usable for an SQL equality prefilter (no wildcard, no range)."""
    text = _text(value).strip()
    if not text or "*" in text or "?" in text:
        return None
    return [v.strip() for v in text.split("\\") if v.strip()]


class Archive:
    """Files under ``root`` and their index in ``root/index.sqlite``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-index")
        self._db: sqlite3.Connection | None = None

    # -- database thread ----------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False)
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(patients)")}
            if "name_key" not in columns:  # an index from an earlier version: add and fill
                with self._db:
                    self._db.execute("ALTER TABLE patients ADD COLUMN name_key TEXT")
                    rows = self._db.execute("SELECT patient_id, attrs FROM patients").fetchall()
                    self._db.executemany(
                        "UPDATE patients SET name_key = ? WHERE patient_id = ?",
                        [(_name_key(json.loads(a).get("PatientName", "")), pid) for pid, a in rows],
                    )
            self._db.execute("CREATE INDEX IF NOT EXISTS patients_name ON patients(name_key)")
        return self._db

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)

    # -- indexing -----------------------------------------------------------------

    def _index_file(self, path: str) -> str:
        st = os.stat(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's value warnings: the file is stored as received
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        sop_uid = _text(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID"))
        study_uid, series_uid = _text(ds.get("StudyInstanceUID")), _text(ds.get("SeriesInstanceUID"))
        if not (sop_uid and study_uid and series_uid):
            raise ValueError("missing Study, Series or SOP Instance UID")
        patient_id = _text(ds.get("PatientID"))
        db = self._conn()
        with db:
            patient = _attrs(ds, "PATIENT")
            db.execute(
                "INSERT INTO patients (patient_id, attrs, name_key) VALUES (?, ?, ?) ON CONFLICT(patient_id) "
                "DO UPDATE SET attrs=excluded.attrs, name_key=excluded.name_key",
                (patient_id, json.dumps(patient), _name_key(patient.get("PatientName", ""))),
            )
            study = _attrs(ds, "STUDY")
            db.execute(
                "INSERT INTO studies VALUES (?, ?, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET "
                "patient_id=excluded.patient_id, study_date=excluded.study_date, accession=excluded.accession, attrs=excluded.attrs",
                (
                    study_uid,
                    patient_id,
                    study.get("StudyDate", ""),
                    study.get("AccessionNumber", ""),
                    json.dumps(study),
                ),
            )
            series = _attrs(ds, "SERIES")
            db.execute(
                "INSERT INTO series VALUES (?, ?, ?, ?) ON CONFLICT(series_uid) DO UPDATE SET "
                "study_uid=excluded.study_uid, modality=excluded.modality, attrs=excluded.attrs",
                (series_uid, study_uid, series.get("Modality", ""), json.dumps(series)),
            )
            image = _attrs(ds, "IMAGE")
            image.setdefault("SOPClassUID", _text(meta.get("MediaStorageSOPClassUID")))
            db.execute("DELETE FROM instances WHERE path = ? AND sop_uid != ?", (path, sop_uid))
            db.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sop_uid) DO UPDATE SET "
                "series_uid=excluded.series_uid, sop_class=excluded.sop_class, transfer_syntax=excluded.transfer_syntax, "
                "path=excluded.path, size=excluded.size, mtime=excluded.mtime, attrs=excluded.attrs",
                (
                    sop_uid,
                    series_uid,
                    image["SOPClassUID"],
                    _text(meta.get("TransferSyntaxUID")),
                    path,
                    st.st_size,
                    st.st_mtime,
                    json.dumps(image),
                ),
            )
        return sop_uid

    async def index_file(self, path: str | os.PathLike[str]) -> str:
        """Index one Part 10 file (after it was stored); returns its SOP Instance UID."""
        return await self._call(self._index_file, os.fspath(path))

    def _reindex(self) -> tuple[int, int, int]:
        db = self._conn()
        known = {row[0]: (row[1], row[2]) for row in db.execute("SELECT path, size, mtime FROM instances")}
        added = skipped = 0
        seen = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.endswith(".dcm"):
                    continue
                path = os.path.join(dirpath, name)
                seen.add(path)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if known.get(path) == (st.st_size, st.st_mtime):
                    continue
                try:
                    self._index_file(path)
                    added += 1
                except Exception as exc:
                    skipped += 1
                    log.warning("archive: skipping unreadable file", path=path, error=str(exc)[:200])
        gone = [p for p in known if p not in seen]
        with db:
            db.executemany("DELETE FROM instances WHERE path = ?", [(p,) for p in gone])
            db.execute("DELETE FROM series WHERE series_uid NOT IN (SELECT series_uid FROM instances)")
            db.execute("DELETE FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM series)")
            db.execute("DELETE FROM patients WHERE patient_id NOT IN (SELECT patient_id FROM studies)")
        return added, skipped, len(gone)

    async def reindex(self) -> tuple[int, int, int]:
        """Incremental re-index: (files added or changed, files skipped as unreadable, files gone)."""
        return await self._call(self._reindex)

    def _count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    async def count(self) -> int:
        return await self._call(self._count)

    # -- storing ------------------------------------------------------------------

    def path_for(self, sop_instance_uid: str) -> Path:
        if not valid_uid(sop_instance_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_instance_uid[:70]!r}")
        # Two levels of fan-out keep directories small with 10^5..10^7 files.
        digest = sop_instance_uid[-4:].replace(".", "0")
        return self.root / digest[:2] / digest[2:] / f"{sop_instance_uid}.dcm"

    async def on_c_store(self, request: StoreRequest) -> Status:
        """C-STORE handler: save, then index (PS3.4 B.2.3)."""
        try:
            path = self.path_for(request.sop_instance_uid)
        except ValueError as exc:
            return Status(0xC000, str(exc)[:64])
        await request.save(path)
        try:
            await self.index_file(path)
        except Exception as exc:
            request.assoc.log.warning("stored instance could not be indexed", path=str(path), error=str(exc)[:200])
            return Status(0xB007, "Stored, but not indexed: data set does not match SOP class")
        return Status(0)

    # -- querying -----------------------------------------------------------------

    def _query(self, model: str, identifier: Dataset) -> list[Dataset]:
        level = _level(model, identifier, "Query")
        rows = self._candidates(model, level, identifier)
        out = []
        for attrs, extra in rows:
            candidate = _dataset(*attrs)
            for key, value in extra.items():
                setattr(candidate, key, value)
            if matches(identifier, candidate):
                out.append(response_identifier(identifier, candidate))
        return out

    def _candidates(self, model: str, level: str, q: Dataset) -> Iterable[tuple[list[dict[str, str]], dict[str, Any]]]:
        """Rows at ``level`` joined with their parents, narrowed by exact keys in SQL."""
        db = self._conn()
        where: list[str] = []
        args: list[Any] = []

        def exact(column: str, key: str) -> None:
            _where_in(q, key, column, where, args)

        depth = _ORDER.index(level)
        exact("p.patient_id", "PatientID")
        prefix = _name_prefix(q.get("PatientName")) if "PatientName" in q else ""
        if prefix:
            # The literal start of a name key narrows by index; the matcher decides the rest.
            where.append("p.name_key >= ? AND p.name_key < ?")
            args.extend([prefix, prefix + "\U0010ffff"])
        if depth >= 1:
            exact("st.study_uid", "StudyInstanceUID")
            exact("st.accession", "AccessionNumber")
            date = _text(q.get("StudyDate")) if "StudyDate" in q else ""
            rng = parse_range(date, "DA") if date else None
            if rng is not None:
                lo, hi = rng
                # Only full YYYYMMDD bounds compare correctly as strings; shorter ones
                # (a whole month or year) are left to the matcher.
                if lo and len(lo) == 8 and lo.isdigit():
                    where.append("st.study_date >= ?")
                    args.append(lo)
                if hi and len(hi) == 8 and hi.isdigit():
                    where.append("st.study_date <= ?")
                    args.append(hi)
            elif _exact(date):
                exact("st.study_date", "StudyDate")
        if depth >= 2:
            exact("se.series_uid", "SeriesInstanceUID")
            exact("se.modality", "Modality")
        if depth >= 3:
            exact("i.sop_uid", "SOPInstanceUID")
        joins = ["patients p"]
        select = ["p.attrs"]
        if depth >= 1:
            joins.append("JOIN studies st ON st.patient_id = p.patient_id")
            select.append("st.attrs")
            select.append("st.study_uid")
        if depth >= 2:
            joins.append("JOIN series se ON se.study_uid = st.study_uid")
            select.append("se.attrs")
            select.append("se.series_uid")
        if depth >= 3:
            joins.append("JOIN instances i ON i.series_uid = se.series_uid")
            select.append("i.attrs")
        sql = f"SELECT {', '.join(select)} FROM {' '.join(joins)}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        for row in db.execute(sql, args):
            attrs = [json.loads(row[0])]
            extra: dict[str, Any] = {}
            if depth >= 1:
                attrs.append(json.loads(row[1]))
                attrs[-1].setdefault("StudyInstanceUID", row[2])
            if depth >= 2:
                attrs.append(json.loads(row[3]))
                attrs[-1].setdefault("SeriesInstanceUID", row[4])
            if depth >= 3:
                attrs.append(json.loads(row[5]))
            extra.update(self._computed(db, level, attrs, q))
            yield attrs, extra

    def _computed(self, db: sqlite3.Connection, level: str, attrs: list[dict[str, str]], q: Dataset) -> dict[str, Any]:
        """Counts and ModalitiesInStudy when the query asks for them (PS3.4 C.3.4)."""
        out: dict[str, Any] = {}
        if level == "PATIENT":
            pid = attrs[0].get("PatientID", "")
            if "NumberOfPatientRelatedStudies" in q:
                out["NumberOfPatientRelatedStudies"] = db.execute(
                    "SELECT COUNT(*) FROM studies WHERE patient_id=?", (pid,)
                ).fetchone()[0]
            if "NumberOfPatientRelatedInstances" in q:
                out["NumberOfPatientRelatedInstances"] = db.execute(
                    "SELECT COUNT(*) FROM instances i JOIN series se ON i.series_uid=se.series_uid "
                    "JOIN studies st ON se.study_uid=st.study_uid WHERE st.patient_id=?",
                    (pid,),
                ).fetchone()[0]
        elif level == "STUDY":
            uid = attrs[1]["StudyInstanceUID"]
            if "ModalitiesInStudy" in q:
                mods = sorted(
                    {r[0] for r in db.execute("SELECT modality FROM series WHERE study_uid=?", (uid,)) if r[0]}
                )
                out["ModalitiesInStudy"] = mods
            if "NumberOfStudyRelatedSeries" in q:
                out["NumberOfStudyRelatedSeries"] = db.execute(
                    "SELECT COUNT(*) FROM series WHERE study_uid=?", (uid,)
                ).fetchone()[0]
            if "NumberOfStudyRelatedInstances" in q:
                out["NumberOfStudyRelatedInstances"] = db.execute(
                    "SELECT COUNT(*) FROM instances i JOIN series se ON i.series_uid=se.series_uid WHERE se.study_uid=?",
                    (uid,),
                ).fetchone()[0]
        elif level == "SERIES" and "NumberOfSeriesRelatedInstances" in q:
            uid = attrs[2]["SeriesInstanceUID"]
            out["NumberOfSeriesRelatedInstances"] = db.execute(
                "SELECT COUNT(*) FROM instances WHERE series_uid=?", (uid,)
            ).fetchone()[0]
        return out

    async def find(self, model_uid: str, identifier: Dataset) -> list[Dataset]:
        return await self._call(self._query, _model(model_uid), identifier)

    def _paths(self, model: str, identifier: Dataset) -> list[str]:
        level = _level(model, identifier, "Retrieve")
        # Unique keys at the retrieve level (and above, for the hierarchy) are required (C.4.2.2.1).
        if not _exact(identifier.get(_UNIQUE[level])):
            raise StatusError(Status(0xA900, f"{_UNIQUE[level]} is required at {level} level"))
        where: list[str] = []
        args: list[Any] = []
        for column, key in (
            ("st.patient_id", "PatientID"),
            ("st.study_uid", "StudyInstanceUID"),
            ("se.series_uid", "SeriesInstanceUID"),
            ("i.sop_uid", "SOPInstanceUID"),
        ):
            _where_in(identifier, key, column, where, args)
        sql = (
            "SELECT i.path FROM instances i JOIN series se ON i.series_uid = se.series_uid "
            "JOIN studies st ON se.study_uid = st.study_uid WHERE " + " AND ".join(where) + " ORDER BY i.path"
        )
        return [r[0] for r in self._conn().execute(sql, args) if os.path.exists(r[0])]

    async def retrieve_paths(self, model_uid: str, identifier: Dataset) -> list[str]:
        return await self._call(self._paths, _model(model_uid), identifier)

    # -- handlers -----------------------------------------------------------------

    async def on_c_find(self, request: QueryRequest) -> AsyncIterator[Dataset]:
        for ds in await self.find(request.model, request.identifier):
            yield ds

    async def on_retrieve(self, request: QueryRequest) -> AsyncIterator[str]:
        for path in await self.retrieve_paths(request.model, request.identifier):
            yield path

    def install(self, ae: AE, worklist: Worklist | None = None) -> None:
        """Register this archive's handlers (and a worklist's, if given) on ``ae``."""
        worklist_uid = MODELS["worklist"]["find"]

        async def on_c_find(request: QueryRequest) -> AsyncIterator[Dataset]:
            if request.model == worklist_uid:
                if worklist is None:
                    raise StatusError(Status(0x0122, "Modality worklist not configured"))
                source = worklist.on_c_find(request)
            else:
                source = self.on_c_find(request)
            async for ds in source:
                yield ds

        ae.on_c_store(self.on_c_store)
        ae.on_c_find(on_c_find)
        ae.on_c_get(self.on_retrieve)
        ae.on_c_move(self.on_retrieve)


class Worklist:
    """Modality worklist items from ``*.wl`` / ``*.dcm`` files in a directory (PS3.4 K).

    Files are re-read when they change; matching follows PS3.4 C.2.2.2 (with
    sequence matching on the Scheduled Procedure Step Sequence).
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self._cache: dict[str, tuple[float, Dataset]] = {}

    def _items(self) -> list[Dataset]:
        items = []
        present = set()
        for path in sorted(self.directory.glob("*")):
            if path.suffix.lower() not in (".wl", ".dcm") or not path.is_file():
                continue
            key = str(path)
            present.add(key)
            mtime = path.stat().st_mtime
            cached = self._cache.get(key)
            if cached is None or cached[0] != mtime:
                try:
                    cached = (mtime, pydicom.dcmread(path, force=True))
                except Exception as exc:
                    log.warning("worklist: skipping unreadable file", path=key, error=str(exc)[:200])
                    continue
                self._cache[key] = cached
            items.append(cached[1])
        for key in list(self._cache):
            if key not in present:
                del self._cache[key]
        return items

    async def on_c_find(self, request: QueryRequest) -> AsyncIterator[Dataset]:
        items = await asyncio.to_thread(self._items)
        for item in items:
            if matches(request.identifier, item):
                yield response_identifier(request.identifier, item)
