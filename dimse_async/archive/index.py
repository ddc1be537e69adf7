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
import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import sqlite3
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pydicom
from pydicom.dataset import Dataset

from ..dataset_check import DataSetError, DataSetSummary, check_part10
from ..dimse import Status
from ..inflate import DEFAULT_LIMITS, InflationLimit, InflationLimits, check_deflated
from ..log import get_logger
from ..part10 import read_file_meta, valid_uid
from ..services.qr import MODELS, QueryRequest, StatusError
from ..services.storage import StoreRequest
from .matching import matches, parse_range, response_identifier

T = TypeVar("T")

if TYPE_CHECKING:
    from ..ae import AE

__all__ = ["DUPLICATE_POLICIES", "LEVEL_KEYS", "Archive", "IndexingError", "Worklist", "relational_queries"]

log = get_logger()

#: What a C-STORE of a SOP Instance UID already stored does. ``keep``: the stored
#: instance stays; the same data set again is answered success, a different one
#: failure 0xA900. ``replace``: a complete, valid new instance replaces the stored one.
DUPLICATE_POLICIES = ("keep", "replace")


class IndexingError(ValueError):
    """A stored file that cannot be indexed (its data set lacks the hierarchy's UIDs)."""


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
#: Index keys available for a query at each level (that level and those above it).
_INDEXED_UP_TO = {
    level: frozenset(k for upper in _ORDER[: i + 1] for k in LEVEL_KEYS[upper])
    for i, level in enumerate(("PATIENT", "STUDY", "SERIES", "IMAGE"))
}
#: Keys that are not attributes of the stored instances (PS3.4 C.3, C.4.1.1.3).
_NOT_STORED = frozenset(
    {
        "QueryRetrieveLevel",
        "SpecificCharacterSet",
        "RetrieveAETitle",
        "InstanceAvailability",
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "NumberOfSeriesRelatedInstances",
        "TimezoneOffsetFromUTC",
    }
)
#: Required (R) keys per model and level (PS3.4 C.6.1.1, C.6.2.1): a zero-length
#: stored value is unknown and matches any key value (C.2.2.1.2).
_STUDY_R = frozenset({"StudyDate", "StudyTime", "AccessionNumber", "StudyID"})
_SERIES_R = frozenset({"Modality", "SeriesNumber"})
_IMAGE_R = frozenset({"InstanceNumber"})
_REQUIRED: dict[str, dict[str, frozenset[str]]] = {
    "patient": {"PATIENT": frozenset({"PatientName"}), "STUDY": _STUDY_R, "SERIES": _SERIES_R, "IMAGE": _IMAGE_R},
    "study": {"STUDY": _STUDY_R | {"PatientName", "PatientID"}, "SERIES": _SERIES_R, "IMAGE": _IMAGE_R},
    "patient-study": {
        "PATIENT": frozenset({"PatientName"}),
        "STUDY": _STUDY_R,
    },
}
#: Unique keys that a hierarchical query must carry for every level
#: above its own (PS3.4 C.4.1.2.2; relational queries are not negotiated).
_ABOVE = {
    "patient": {"PATIENT": (), "STUDY": ("PatientID",), "SERIES": ("PatientID", "StudyInstanceUID"),
                "IMAGE": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")},
    "study": {"STUDY": (), "SERIES": ("StudyInstanceUID",), "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID")},
    "patient-study": {"PATIENT": (), "STUDY": ("PatientID",)},
}  # fmt: skip
_ALL_KEYS = [k for level in _ORDER for k in LEVEL_KEYS[level]]
_CHARSET = "SpecificCharacterSet"  # stored with each level's attributes, never matched
_VR = {k: pydicom.datadict.dictionary_VR(pydicom.datadict.tag_for_keyword(k) or 0) for k in _ALL_KEYS}

_SCHEMA_VERSION = 2  # 2: patients keyed by ID + issuer, or name + birth date when the ID is empty
_SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS patients (
    patient_key TEXT PRIMARY KEY, patient_id TEXT NOT NULL, name_key TEXT, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS patients_id ON patients(patient_id);
CREATE INDEX IF NOT EXISTS patients_name ON patients(name_key);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, patient_key TEXT NOT NULL, study_date TEXT,
    accession TEXT, attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_key);
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


def relational_queries(sop_class_uid: str, info: bytes) -> bytes | None:
    """SOP class extended negotiation reply (PS3.4 C.5.1.1.1): relational queries are
    granted for the Q/R FIND classes when asked for; the other options are declined."""
    if sop_class_uid not in _MODEL_BY_UID or sop_class_uid != MODELS[_MODEL_BY_UID[sop_class_uid]]["find"]:
        return None
    return b"\x01" if info[:1] == b"\x01" else b"\x00"


def _check_hierarchy(model: str, level: str, identifier: Dataset) -> None:
    """Refuse (0xA900) a query lacking the unique key of a level above its own (a
    UID list is taken as List of UID Matching; wild cards and empty values are refused)."""
    for key in _ABOVE[model][level]:
        values = _exact(identifier.get(key)) if key in identifier else None
        if not values or (len(values) != 1 and key == "PatientID"):
            raise StatusError(Status(0xA900, f"{level} query needs one {key} (no relational queries)"[:64]))


def _add_from_file(candidate: Dataset, path: str, tags: list[Any]) -> None:
    """Copy the keys the index lacks from the stored instance into ``candidate``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags))
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        log.warning("archive: cannot read stored instance for matching", path=path, error=str(exc)[:200])
        return
    for tag in tags:
        if tag in stored and tag not in candidate:
            candidate.add(stored[tag])


def _model(model_uid: str) -> str:
    model = _MODEL_BY_UID.get(model_uid)
    if model is None:
        raise StatusError(Status(0x0122, "Information model not supported"))
    return model


def _where_in(
    identifier: Dataset, key: str, column: str, where: list[str], args: list[Any], *, or_empty: bool = False
) -> None:
    """Add ``column IN (...)`` for a key with exact values (no wildcard, no range);
    ``or_empty`` also lets rows whose value is unknown (zero length) through."""
    values = _exact(identifier.get(key)) if key in identifier else None
    if values:
        clause = f"{column} IN ({','.join('?' * len(values))})"
        where.append(f"({clause} OR {column} = '')" if or_empty else clause)
        args.extend(values)


def _exact(value: Any) -> list[str] | None:
    """Values of a key usable for an SQL equality prefilter (no wildcard, no range)."""
    text = _text(value).strip()
    if not text or "*" in text or "?" in text:
        return None
    return [v.strip() for v in text.split("\\") if v.strip()]


def _patient_key(patient: dict[str, str], study_uid: str) -> str:
    """Patient identity (PS3.4 C.6.1.1.2: Patient ID is Type 2 and may be empty).

    Patient ID with its issuer when there is an ID; otherwise name and birth date, and
    when those are empty too the study alone, so instances without an ID are never
    merged into one patient."""
    pid = patient.get("PatientID", "").strip()
    if pid:
        return json.dumps(["id", pid, patient.get("IssuerOfPatientID", "").strip()])
    name, birth = patient.get("PatientName", "").strip(), patient.get("PatientBirthDate", "").strip()
    if name or birth:
        return json.dumps(["name", name, birth])
    return json.dumps(["study", study_uid])


def _check_inflation(fp: Any, limits: InflationLimits) -> None:
    """Refuse a deflated data set that would inflate past ``limits`` (a deflate bomb),
    measured by streaming it, before anything decodes it whole (PS3.5 A.5)."""
    meta = read_file_meta(fp)
    if meta is not None and meta.transfer_syntax == _DEFLATED_LE:
        check_deflated(fp, meta.dataset_offset, limits)
    fp.seek(0)


_DEFLATED_LE = "1.2.840.10008.1.2.1.99"


async def _check_request(request: StoreRequest, limits: InflationLimits = DEFAULT_LIMITS) -> DataSetSummary:
    """Parse the received data set to its end (off the loop when it is large)."""

    def check() -> DataSetSummary:
        with request.open() as fp:
            _check_inflation(fp, limits)
            return check_part10(fp)

    if request.spool.path is None and request.size < (1 << 20):
        return check()
    return await asyncio.to_thread(check)


def _dataset_part(fp: Any) -> tuple[str, int] | None:
    meta = read_file_meta(fp)
    if meta is None:
        return None
    fp.seek(meta.dataset_offset)
    return meta.transfer_syntax, meta.dataset_offset


def _same_instance(stored: str, request: StoreRequest) -> bool:
    """Whether the stored file holds the received data set, byte for byte, in the same syntax."""
    with open(stored, "rb") as a, request.open() as b:
        pa, pb = _dataset_part(a), _dataset_part(b)
        if pa is None or pb is None or pa[0] != pb[0]:
            return False
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _keep_previous(dest: str) -> str | None:
    """Hard-link a file about to be replaced to ``<dest>.old`` (restored if indexing fails)."""
    if not os.path.exists(dest):
        return None
    old = f"{dest}.old"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(old)
    try:
        os.link(dest, old)
    except OSError:  # a file system without hard links
        shutil.copyfile(dest, old)
    return old


def _fsync_file_and_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Several processes share one index (``--workers N``): SQLite waits this long for a
#: lock held by another process, and a write still finding the database busy is
#: retried (:func:`_retry_busy`) before the store is answered 0xA700.
BUSY_TIMEOUT = 5.0
BUSY_RETRIES = 2
_LOCK_BUCKETS = 4096  # lock files for per-instance cross-process locks


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def _retry_busy(fn: Callable[[], T]) -> T:
    """Run a write transaction, retrying a few times while another process holds the
    database (SQLITE_BUSY beyond the busy timeout, or a busy WAL snapshot upgrade)."""
    for attempt in range(BUSY_RETRIES):
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or attempt == BUSY_RETRIES - 1:
                raise
            log.warning("archive: index busy; retrying", attempt=attempt + 1, error=str(exc)[:100])
            time.sleep(0.05 * (2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover


class _InstanceFileLock:
    """A cross-process exclusive lock for one SOP Instance UID: ``flock`` on one of
    :data:`_LOCK_BUCKETS` files under ``root/.locks`` chosen by the UID's hash (two
    UIDs sharing a bucket merely wait for each other). Polled, so the event loop
    never blocks."""

    def __init__(self, root: Path, uid: str):
        bucket = int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=4).digest(), "big") % _LOCK_BUCKETS
        self.path = root / ".locks" / f"{bucket:04d}.lock"
        self.fd: int | None = None

    async def __aenter__(self) -> None:
        self.path.parent.mkdir(exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        delay = 0.002
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    async def __aexit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def _out_of_resources(request: StoreRequest, exc: BaseException) -> Status:
    """0xA700 with the true reason: disk full, read-only, too many open files, a locked index."""
    if isinstance(exc, OSError):
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
    else:
        reason = f"index: {exc}"
    request.assoc.log.error("C-STORE out of resources", sop_instance=request.sop_instance_uid, error=str(exc)[:200])
    return Status(0xA700, f"Out of resources: {reason}"[:64])


class Archive:
    """Files under ``root`` and their index in ``root/index.sqlite``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        duplicates: str = "keep",
        fsync: bool = True,
        retrieve_ae_title: str | None = None,
        inflation_limits: InflationLimits = DEFAULT_LIMITS,
        query_max_matches: int = 50_000,
        query_time_budget: float = 60.0,
        shared: bool = False,
    ):
        if duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        #: What a C-STORE of an instance already stored does (see :data:`DUPLICATE_POLICIES`).
        self.duplicates = duplicates
        #: Flush each stored file and the index to the disk before answering success.
        self.fsync = fsync
        #: Retrieve AE Title (0008,0054) put in C-FIND responses; the serving AE's title.
        self.retrieve_ae_title = retrieve_ae_title
        #: How far a deflated instance may inflate; larger ones are refused on C-STORE
        #: (0xC000) and skipped by the re-index.
        self.inflation_limits = inflation_limits
        #: A C-FIND stops with 0xA700 (out of resources) past this many matches or
        #: seconds (the index keeps serving everyone else meanwhile).
        self.query_max_matches = query_max_matches
        self.query_time_budget = query_time_budget
        #: Other processes store into the same root and index (``--workers N``): stores
        #: of one SOP Instance UID are serialised across processes too.
        self.shared = shared
        # Writes (store, re-index) on one thread and one connection; queries on their
        # own threads, each with its own read-only connection (SQLite WAL: readers never
        # wait for the writer), so a query never delays a store and the reverse.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-index")
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="archive-query")
        self._db: sqlite3.Connection | None = None
        self._schema_ready = False
        self._locks: dict[str, list[Any]] = {}

    # -- database thread ----------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, timeout=BUSY_TIMEOUT)
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")

            def upgrade() -> None:
                # Under the write lock, so two processes starting at once upgrade once.
                db.execute("BEGIN IMMEDIATE")
                try:
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    if version != _SCHEMA_VERSION:
                        # An index from an earlier layout: start afresh; the re-index refills it from the files.
                        for table in ("instances", "series", "studies", "patients"):
                            db.execute(f"DROP TABLE IF EXISTS {table}")
                        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise

            _retry_busy(upgrade)
            _retry_busy(lambda: db.executescript(_SCHEMA))
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            self._db = db
        return self._db

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)
        self._readers.shutdown(wait=True)

    def _read_conn(self, deadline: float | None = None) -> sqlite3.Connection:
        """A read-only connection of its own for one query; interrupted past ``deadline``."""
        db = sqlite3.connect(f"file:{self.root / 'index.sqlite'}?mode=ro", uri=True, check_same_thread=False)
        if deadline is not None:
            db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
        return db

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._schema_ready:
            await self._call(self._conn)  # the writer creates (or migrates) the schema first
            self._schema_ready = True
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    # -- indexing -----------------------------------------------------------------

    def _index_file(self, path: str) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's value warnings: the file is stored as received
            return self._index_file_quietly(path)

    def _index_file_quietly(self, path: str) -> str:
        return _retry_busy(lambda: self._index_file_once(path))

    def _index_file_once(self, path: str) -> str:
        st = os.stat(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        sop_uid = _text(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID"))
        study_uid, series_uid = _text(ds.get("StudyInstanceUID")), _text(ds.get("SeriesInstanceUID"))
        if not (sop_uid and study_uid and series_uid):
            raise IndexingError("missing Study, Series or SOP Instance UID")
        patient = _attrs(ds, "PATIENT")
        patient_key = _patient_key(patient, study_uid)
        db = self._conn()
        with db:
            db.execute(
                "INSERT INTO patients (patient_key, patient_id, attrs, name_key) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(patient_key) DO UPDATE SET attrs=excluded.attrs, name_key=excluded.name_key",
                (
                    patient_key,
                    patient.get("PatientID", ""),
                    json.dumps(patient),
                    _name_key(patient.get("PatientName", "")),
                ),
            )
            study = _attrs(ds, "STUDY")
            db.execute(
                "INSERT INTO studies VALUES (?, ?, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET "
                "patient_key=excluded.patient_key, study_date=excluded.study_date, accession=excluded.accession, attrs=excluded.attrs",
                (
                    study_uid,
                    patient_key,
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

    def _clean_leftovers(self) -> int:
        """Remove what an interrupted store leaves behind: spools (``.partial``) and the
        previous version kept while a replacement was indexed (``.dcm.old``)."""
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if name.endswith((".partial", ".dcm.old")):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed

    def _reindex(self) -> tuple[int, int, int]:
        self._clean_leftovers()
        db = self._conn()
        # The files are the truth and a re-index interrupted is simply redone: no flush
        # per file while catching up.
        db.execute("PRAGMA synchronous=OFF")
        try:
            return self._reindex_files(db)
        finally:
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")

    def _reindex_files(self, db: sqlite3.Connection) -> tuple[int, int, int]:
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
                    with open(path, "rb") as fp:
                        _check_inflation(fp, self.inflation_limits)
                        check_part10(fp)
                    self._index_file(path)
                    added += 1
                except (OSError, sqlite3.Error):
                    raise
                except Exception as exc:
                    skipped += 1
                    log.warning("archive: skipping unreadable file", path=path, error=str(exc)[:200])
        gone = [p for p in known if p not in seen]
        with db:
            db.executemany("DELETE FROM instances WHERE path = ?", [(p,) for p in gone])
            self._drop_orphans(db)
        return added, skipped, len(gone)

    @staticmethod
    def _drop_orphans(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM series WHERE series_uid NOT IN (SELECT series_uid FROM instances)")
        db.execute("DELETE FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM series)")
        db.execute("DELETE FROM patients WHERE patient_key NOT IN (SELECT patient_key FROM studies)")

    async def reindex(self) -> tuple[int, int, int]:
        """Incremental re-index: (files added or changed, files skipped as unreadable, files gone).

        Leftovers of interrupted stores are removed first; a file is indexed only
        when its data set parses to its end."""
        return await self._call(self._reindex)

    def _count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    async def count(self) -> int:
        return await self._call(self._count)

    def _stored(self, sop_uid: str) -> tuple[str, int] | None:
        """The stored file of ``sop_uid`` and its size, if indexed and present."""
        row = self._conn().execute("SELECT path, size FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return (row[0], row[1]) if row and os.path.exists(row[0]) else None

    # -- storing ------------------------------------------------------------------

    def path_for(self, sop_instance_uid: str) -> Path:
        if not valid_uid(sop_instance_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_instance_uid[:70]!r}")
        # Two levels of fan-out keep directories small with 10^5..10^7 files.
        digest = sop_instance_uid[-4:].replace(".", "0")
        return self.root / digest[:2] / digest[2:] / f"{sop_instance_uid}.dcm"

    async def on_c_store(self, request: StoreRequest) -> Status:
        """C-STORE handler (PS3.4 B.2.3): check, then store and index together.

        The data set must parse to its end (else 0xC000) and carry the command's SOP
        Class and Instance UIDs (else 0xA900). An instance already stored is kept or
        replaced according to :attr:`duplicates`. The file is moved into place and then
        indexed; if indexing fails the previous state is restored and the answer is
        0xA700 (out of resources, with the reason) or 0xA900. A success is answered
        only when the file and its index row are both committed.
        """
        uid = request.sop_instance_uid
        try:
            path = self.path_for(uid)
        except ValueError as exc:
            return Status(0xC000, str(exc)[:64])
        if not valid_uid(request.sop_class_uid):
            return Status(0xC000, "invalid SOP Class UID")
        try:
            summary = await _check_request(request, self.inflation_limits)
        except (DataSetError, InflationLimit) as exc:
            request.assoc.log.warning("C-STORE data set refused", sop_instance=uid, error=str(exc))
            return Status(0xC000, f"Cannot understand: {exc}"[:64])
        if summary.sop_instance_uid != uid or summary.sop_class_uid != request.sop_class_uid:
            request.assoc.log.warning(
                "C-STORE UIDs differ from the data set's",
                sop_instance=uid,
                dataset_instance=summary.sop_instance_uid,
                sop_class=request.sop_class_uid,
                dataset_class=summary.sop_class_uid,
            )
            what = "Instance" if summary.sop_instance_uid != uid else "Class"
            return Status(0xA900, f"Data set SOP {what} UID differs from the command's"[:64])
        # One store at a time per SOP Instance UID; the entry lives while someone uses it.
        entry = self._locks.setdefault(uid, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                if not self.shared:
                    return await self._store_locked(request, path)
                async with _InstanceFileLock(self.root, uid):  # and across processes
                    return await self._store_locked(request, path)
        finally:
            entry[1] -= 1
            if not entry[1]:
                self._locks.pop(uid, None)

    async def _store_locked(self, request: StoreRequest, path: Path) -> Status:
        uid = request.sop_instance_uid
        try:
            existing = await self._call(self._stored, uid)
        except sqlite3.Error as exc:
            return _out_of_resources(request, exc)
        dest = os.fspath(path)
        if existing is not None and self.duplicates == "keep":
            same = await asyncio.to_thread(_same_instance, existing[0], request)
            if same:
                return Status(0)
            request.assoc.log.warning("duplicate SOP Instance UID: stored instance kept", sop_instance=uid)
            return Status(0xA900, "Duplicate SOP Instance UID; stored instance kept"[:64])
        old: str | None = None
        try:
            old = await asyncio.to_thread(_keep_previous, dest)
            await request.save(dest)
            if self.fsync:
                await asyncio.to_thread(_fsync_file_and_dir, dest)
        except OSError as exc:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.replace(old, dest)
            return _out_of_resources(request, exc)
        try:
            await self.index_file(dest)
        except Exception as exc:
            await asyncio.to_thread(self._undo_store, dest, old, request)
            request.assoc.note_error("index")
            if isinstance(exc, OSError | sqlite3.Error):
                return _out_of_resources(request, exc)
            request.assoc.log.warning("C-STORE data set cannot be indexed", sop_instance=uid, error=str(exc)[:200])
            return Status(0xA900, f"Cannot index: {exc}"[:64])
        if old is not None:
            with contextlib.suppress(OSError):
                os.unlink(old)
        return Status(0)

    @staticmethod
    def _undo_store(dest: str, old: str | None, request: StoreRequest) -> None:
        """Put back the file that was there before a store whose indexing failed. The
        index needs nothing: its transaction rolled back, so its row (if any) still
        describes the previous file, whose size and time come back with it."""
        try:
            if old is not None:
                os.replace(old, dest)
            else:
                os.unlink(dest)
        except OSError as exc:  # the re-index at the next start repairs what is left
            request.assoc.log.error("cannot undo a failed store", path=dest, error=str(exc)[:200])

    # -- querying -----------------------------------------------------------------

    def _query(self, model: str, identifier: Dataset, relational: bool = False) -> list[Dataset]:
        db = self._read_conn()
        try:
            return list(self._matches(db, model, identifier, relational))
        finally:
            db.close()

    def _matches(self, db: sqlite3.Connection, model: str, identifier: Dataset, relational: bool) -> Iterator[Dataset]:
        level = _level(model, identifier, "Query")
        if not relational:
            _check_hierarchy(model, level, identifier)
        required = _REQUIRED[model][level]
        indexed = set(_INDEXED_UP_TO[level])
        from_file = [
            elem.tag
            for elem in identifier
            if elem.tag.group not in (0x0000, 0x0002)
            and elem.keyword not in indexed
            and elem.keyword not in _NOT_STORED
        ]
        for attrs, extra, path in self._candidates(db, model, level, identifier, required, bool(from_file)):
            candidate = _dataset(*attrs)
            for key, value in extra.items():
                setattr(candidate, key, value)
            if from_file and path is not None:
                _add_from_file(candidate, path, from_file)
            if matches(identifier, candidate, unknown=required):
                response = response_identifier(identifier, candidate)
                if self.retrieve_ae_title:
                    response.RetrieveAETitle = self.retrieve_ae_title
                yield response

    def _candidates(
        self, db: sqlite3.Connection, model: str, level: str, q: Dataset, required: frozenset[str], want_path: bool
    ) -> Iterable[tuple[list[dict[str, str]], dict[str, Any], str | None]]:
        """Rows at ``level`` joined with their parents, narrowed by exact keys in SQL
        (a Required key also lets a zero-length stored value through, C.2.2.1.2), and
        with ``want_path`` the file of one instance of each entity."""
        where: list[str] = []
        args: list[Any] = []

        def exact(column: str, key: str) -> None:
            _where_in(q, key, column, where, args, or_empty=key in required)

        depth = _ORDER.index(level)
        exact("p.patient_id", "PatientID")
        prefix = _name_prefix(q.get("PatientName")) if "PatientName" in q else ""
        if prefix:
            # The literal start of a name key narrows by index; the matcher decides the rest.
            where.append("(p.name_key >= ? AND p.name_key < ? OR p.name_key = '')")
            args.extend([prefix, prefix + "\U0010ffff"])
        if depth >= 1:
            exact("st.study_uid", "StudyInstanceUID")
            exact("st.accession", "AccessionNumber")
            date = _text(q.get("StudyDate")) if "StudyDate" in q else ""
            rng = parse_range(date, "DA") if date else None
            if rng is not None:
                lo, hi = rng
                # Only full YYYYMMDD bounds compare correctly as strings; shorter ones
                # (a whole month or year) are left to the matcher. An unknown (empty)
                # study date matches (Required key, C.2.2.1.2).
                bounds = []
                if lo and len(lo) == 8 and lo.isdigit():
                    bounds.append("st.study_date >= ?")
                    args.append(lo)
                if hi and len(hi) == 8 and hi.isdigit():
                    bounds.append("st.study_date <= ?")
                    args.append(hi)
                if bounds:
                    where.append(f"({' AND '.join(bounds)} OR st.study_date = '')")
            elif _exact(date):
                exact("st.study_date", "StudyDate")
        if depth >= 2:
            exact("se.series_uid", "SeriesInstanceUID")
            exact("se.modality", "Modality")
        if depth >= 3:
            exact("i.sop_uid", "SOPInstanceUID")
        joins = ["patients p"]
        select = ["p.attrs", "p.patient_key"]
        if depth >= 1:
            joins.append("JOIN studies st ON st.patient_key = p.patient_key")
            select.append("st.attrs")
            select.append("st.study_uid")
        if depth >= 2:
            joins.append("JOIN series se ON se.study_uid = st.study_uid")
            select.append("se.attrs")
            select.append("se.series_uid")
        if depth >= 3:
            joins.append("JOIN instances i ON i.series_uid = se.series_uid")
            select.append("i.attrs")
            select.append("i.path")
        sql = f"SELECT {', '.join(select)} FROM {' '.join(joins)}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        for row in db.execute(sql, args):
            attrs = [json.loads(row[0])]
            keys = {"PATIENT": row[1]}
            if depth >= 1:
                attrs.append(json.loads(row[2]))
                attrs[-1].setdefault("StudyInstanceUID", row[3])
                keys["STUDY"] = row[3]
            if depth >= 2:
                attrs.append(json.loads(row[4]))
                attrs[-1].setdefault("SeriesInstanceUID", row[5])
                keys["SERIES"] = row[5]
            path = None
            if depth >= 3:
                attrs.append(json.loads(row[6]))
                path = row[7]
            elif want_path:
                path = self._representative(db, level, keys[level])
            yield attrs, self._computed(db, level, keys, q), path

    @staticmethod
    def _representative(db: sqlite3.Connection, level: str, key: str) -> str | None:
        """The file of one instance of a patient, study or series."""
        sql = {
            "PATIENT": "SELECT i.path FROM instances i JOIN series se ON i.series_uid = se.series_uid "
            "JOIN studies st ON se.study_uid = st.study_uid WHERE st.patient_key = ? LIMIT 1",
            "STUDY": "SELECT i.path FROM instances i JOIN series se ON i.series_uid = se.series_uid "
            "WHERE se.study_uid = ? LIMIT 1",
            "SERIES": "SELECT path FROM instances WHERE series_uid = ? LIMIT 1",
        }[level]
        row = db.execute(sql, (key,)).fetchone()
        return row[0] if row else None

    def _computed(self, db: sqlite3.Connection, level: str, keys: dict[str, str], q: Dataset) -> dict[str, Any]:
        """Counts and ModalitiesInStudy when the query asks for them (PS3.4 C.3.4)."""
        out: dict[str, Any] = {}
        if level == "PATIENT":
            pid = keys["PATIENT"]
            if "NumberOfPatientRelatedStudies" in q:
                out["NumberOfPatientRelatedStudies"] = db.execute(
                    "SELECT COUNT(*) FROM studies WHERE patient_key=?", (pid,)
                ).fetchone()[0]
            if "NumberOfPatientRelatedInstances" in q:
                out["NumberOfPatientRelatedInstances"] = db.execute(
                    "SELECT COUNT(*) FROM instances i JOIN series se ON i.series_uid=se.series_uid "
                    "JOIN studies st ON se.study_uid=st.study_uid WHERE st.patient_key=?",
                    (pid,),
                ).fetchone()[0]
        elif level == "STUDY":
            uid = keys["STUDY"]
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
            uid = keys["SERIES"]
            out["NumberOfSeriesRelatedInstances"] = db.execute(
                "SELECT COUNT(*) FROM instances WHERE series_uid=?", (uid,)
            ).fetchone()[0]
        return out

    async def find(self, model_uid: str, identifier: Dataset, *, relational: bool = False) -> list[Dataset]:
        """C-FIND matches; ``relational`` when relational queries were negotiated (C.4.1.2.2.2)."""
        return await self._read(self._query, _model(model_uid), identifier, relational)

    async def find_iter(
        self, model_uid: str, identifier: Dataset, *, relational: bool = False, batch: int = 64
    ) -> AsyncIterator[Dataset]:
        """C-FIND matches produced in batches, each only when the previous one was
        taken (a peer that does not read its responses stops the query), within
        :attr:`query_max_matches` and :attr:`query_time_budget` (else 0xA700)."""
        model = _model(model_uid)
        deadline = time.monotonic() + self.query_time_budget
        db = await self._read(self._read_conn, deadline)
        matches = self._matches(db, model, identifier, relational)
        produced = 0
        try:
            while True:
                try:
                    items = await self._read(_take, matches, batch)
                except sqlite3.OperationalError as exc:
                    if time.monotonic() > deadline:
                        raise StatusError(
                            Status(0xA700, f"Out of resources: query over {self.query_time_budget:g} s")
                        ) from exc
                    raise
                for item in items:
                    yield item
                produced += len(items)
                if len(items) < batch:
                    return
                if produced >= self.query_max_matches:
                    raise StatusError(Status(0xA700, f"Out of resources: more than {self.query_max_matches} matches"))
                if time.monotonic() > deadline:
                    raise StatusError(Status(0xA700, f"Out of resources: query over {self.query_time_budget:g} s"))
        finally:
            await self._read(_close_query, matches, db)

    def _paths(self, model: str, identifier: Dataset) -> list[str]:
        level = _level(model, identifier, "Retrieve")
        # Unique keys at the retrieve level (and above, for the hierarchy) are required (C.4.2.2.1).
        if not _exact(identifier.get(_UNIQUE[level])):
            raise StatusError(Status(0xA900, f"{_UNIQUE[level]} is required at {level} level"))
        where: list[str] = []
        args: list[Any] = []
        for column, key in (
            ("p.patient_id", "PatientID"),
            ("st.study_uid", "StudyInstanceUID"),
            ("se.series_uid", "SeriesInstanceUID"),
            ("i.sop_uid", "SOPInstanceUID"),
        ):
            _where_in(identifier, key, column, where, args)
        sql = (
            "SELECT i.path FROM instances i JOIN series se ON i.series_uid = se.series_uid "
            "JOIN studies st ON se.study_uid = st.study_uid JOIN patients p ON st.patient_key = p.patient_key "
            "WHERE " + " AND ".join(where) + " ORDER BY i.path"
        )
        db = self._read_conn()
        try:
            return [r[0] for r in db.execute(sql, args) if os.path.exists(r[0])]
        finally:
            db.close()

    async def retrieve_paths(self, model_uid: str, identifier: Dataset) -> list[str]:
        return await self._read(self._paths, _model(model_uid), identifier)

    # -- handlers -----------------------------------------------------------------

    async def on_c_find(self, request: QueryRequest) -> AsyncIterator[Dataset]:
        negotiated = request.assoc.negotiated
        reply = negotiated.extended.get(request.model, b"") if negotiated is not None else b""
        async for ds in self.find_iter(request.model, request.identifier, relational=reply[:1] == b"\x01"):
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


def _take(items: Iterator[Dataset], n: int) -> list[Dataset]:
    """Up to ``n`` more matches (run on a query thread)."""
    return list(itertools.islice(items, n))


def _close_query(items: Iterator[Any], db: sqlite3.Connection) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        close()
    db.close()


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
