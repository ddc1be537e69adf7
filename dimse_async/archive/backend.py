"""What the archive needs of an index database, whatever the engine: a small
interface implemented for SQLite (:mod:`.backend_sqlite`) and PostgreSQL
(:mod:`.backend_pg`).

The archive logic (ingest with its duplicate policy and undo, C-FIND matching,
retrieve, commitment lookups) is written once against :class:`Connection`: blocking
DB-API-like calls made on the archive's worker threads, with ``?`` placeholders and
SQL both engines understand (``INSERT ... ON CONFLICT ... DO UPDATE``, joins,
``COUNT``). A back end supplies the connections, its schema migrations (numbered SQL
files under ``migrations/<dialect>/``, recorded in a ``schema_version`` table), the
retry of transient write conflicts, and a per-instance lock that holds across every
process writing the same index.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from importlib import resources
from typing import Any, NamedTuple, Protocol, TypeVar

T = TypeVar("T")

__all__ = [
    "Backend",
    "Connection",
    "Cursor",
    "IndexRow",
    "drop_emptied",
    "index_statements",
    "migrations",
    "split_statements",
    "write_index_rows",
]

Statements = Sequence[tuple[str, Sequence[Any]]]


class IndexRow(NamedTuple):
    """What indexing one stored instance writes: its patient, study, series and
    instance rows (PS3.4 C.6 keys per level, as JSON ``attrs``)."""

    patient_key: str
    patient_id: str
    patient_attrs: str
    name_key: str
    study_uid: str
    study_date: str
    accession: str
    study_attrs: str
    series_uid: str
    modality: str
    series_attrs: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    path: str
    size: int
    mtime: float
    attrs: str


def index_statements(r: IndexRow) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements writing ``r`` (one transaction): upserts of the patient, study
    and series; the row of another instance that had this path dropped; the instance
    upserted (an instance stored again replaces its row)."""
    return [
        (
            "INSERT INTO patients (patient_key, patient_id, attrs, name_key) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(patient_key) DO UPDATE SET attrs=excluded.attrs, name_key=excluded.name_key",
            (r.patient_key, r.patient_id, r.patient_attrs, r.name_key),
        ),
        (
            "INSERT INTO studies VALUES (?, ?, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET "
            "patient_key=excluded.patient_key, study_date=excluded.study_date, accession=excluded.accession, "
            "attrs=excluded.attrs",
            (r.study_uid, r.patient_key, r.study_date, r.accession, r.study_attrs),
        ),
        (
            "INSERT INTO series VALUES (?, ?, ?, ?) ON CONFLICT(series_uid) DO UPDATE SET "
            "study_uid=excluded.study_uid, modality=excluded.modality, attrs=excluded.attrs",
            (r.series_uid, r.study_uid, r.modality, r.series_attrs),
        ),
        ("DELETE FROM instances WHERE path = ? AND sop_uid != ?", (r.path, r.sop_uid)),
        (
            "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sop_uid) DO UPDATE SET "
            "series_uid=excluded.series_uid, sop_class=excluded.sop_class, transfer_syntax=excluded.transfer_syntax, "
            "path=excluded.path, size=excluded.size, mtime=excluded.mtime, attrs=excluded.attrs",
            (r.sop_uid, r.series_uid, r.sop_class, r.transfer_syntax, r.path, r.size, r.mtime, r.attrs),
        ),
    ]


#: Before an index write: the parents an instance, series or study may leave behind
#: (the instance's series, or the series of another instance at its path; the study
#: the series is under; the patient the study is under), as (series, study, patient).
_PARENTS = (
    "SELECT i.series_uid, NULL, NULL FROM instances i WHERE i.sop_uid = ? OR i.path = ? "
    "UNION ALL SELECT NULL, s.study_uid, NULL FROM series s WHERE s.series_uid = ? "
    "UNION ALL SELECT NULL, NULL, t.patient_key FROM studies t WHERE t.study_uid = ?"
)


#: Whether a series, or a study, holds an instance other than the one being indexed.
_OTHERS_IN_SERIES = "SELECT 1 FROM instances WHERE series_uid = ? AND sop_uid != ? LIMIT 1"
_OTHERS_IN_STUDY = (
    "SELECT 1 FROM series s JOIN instances i ON i.series_uid = s.series_uid "
    "WHERE s.study_uid = ? AND i.sop_uid != ? LIMIT 1"
)
#: Offending Elements (0000,0901) of an instance the hierarchy refuses (PS3.4 Table B.2-1).
_SERIES_INSTANCE_UID, _PATIENT_ID = 0x0020000E, 0x00100020
SERIES_CONFLICT = "Series Instance UID is in another study"
STUDY_CONFLICT = "Study Instance UID is another patient's"


class HierarchyConflict(ValueError):
    """An instance whose series the index holds under another study, or its study for
    another patient (:data:`SERIES_CONFLICT`, :data:`STUDY_CONFLICT`); ``tags``: the
    element at fault (a refused C-STORE's Offending Element), as for :class:`.IndexingError`."""

    def __init__(self, message: str, tags: tuple[int, ...]):
        super().__init__(message)
        self.tags = tags


def hierarchy_conflict(message: str) -> HierarchyConflict:
    """The :class:`HierarchyConflict` of :data:`SERIES_CONFLICT` or :data:`STUDY_CONFLICT`."""
    return HierarchyConflict(message, (_SERIES_INSTANCE_UID,) if message == SERIES_CONFLICT else (_PATIENT_ID,))


#: Whether a patient holds an instance other than the one being indexed.
_OTHERS_OF_PATIENT = (
    "SELECT 1 FROM studies t JOIN series s ON s.study_uid = t.study_uid JOIN instances i ON i.series_uid = s.series_uid "
    "WHERE t.patient_key = ? AND i.sop_uid != ? LIMIT 1"
)
_CHARSET = "SpecificCharacterSet"
#: The patient, study and series rows an index write finds (NULLs where there are none).
_HELD = (
    "SELECT p.attrs, p.name_key, st.attrs, st.study_date, st.accession, se.attrs, se.modality FROM (SELECT 1) AS one "
    "LEFT JOIN patients p ON p.patient_key = ? LEFT JOIN studies st ON st.study_uid = ? "
    "LEFT JOIN series se ON se.series_uid = ?"
)


def supplement_attrs(held: str, received: str) -> str:
    """A patient's, study's or series' attributes (JSON) as held, supplemented by those
    of another instance received for it: each attribute held with a value keeps it; one
    held without a value (absent or empty) takes the received one. The Specific
    Character Set is the held one unless a received value was taken and the two differ
    (then ISO_IR 192, which holds both; the values are kept decoded). The same rule as
    ``supplement_attrs`` of PostgreSQL's index (migration 0008)."""
    old, new = json.loads(held), json.loads(received)
    merged = {k: v for k, v in old.items() if k != _CHARSET}
    taken = {k: v for k, v in new.items() if k != _CHARSET and v != "" and old.get(k, "") == ""}
    merged.update(taken)
    old_charset, new_charset = old.get(_CHARSET, ""), new.get(_CHARSET, "")
    charset = old_charset
    if taken and new_charset and new_charset != old_charset:
        charset = new_charset if not old_charset else "ISO_IR 192"
    if charset:
        merged[_CHARSET] = charset
    return json.dumps(merged)


def _supplemented(db: Connection, r: IndexRow) -> IndexRow:
    """``r`` with its patient's, study's and series' attributes supplemented, not
    replaced, where the index holds that entity with other instances (see
    :func:`supplement_attrs`): the first instance stored names the study (its
    description, date, accession number...), a later one that disagrees changes
    nothing, one that knows more adds it. An entity whose only instance is this one
    (stored again, ``duplicates = "replace"``, or its file re-indexed) takes the
    received values. The columns a query narrows by follow the attributes kept."""
    changes: dict[str, Any] = {}
    # One look-up of the three rows; attributes as held (the usual case: every instance
    # of a study carries the same) need nothing more.
    p_attrs, p_name, st_attrs, st_date, st_accession, se_attrs, se_modality = db.execute(
        _HELD, (r.patient_key, r.study_uid, r.series_uid)
    ).fetchone()
    if (
        p_attrs is not None
        and p_attrs != r.patient_attrs
        and db.execute(_OTHERS_OF_PATIENT, (r.patient_key, r.sop_uid)).fetchone() is not None
    ):
        changes["patient_attrs"] = supplement_attrs(p_attrs, r.patient_attrs)
        if json.loads(p_attrs).get("PatientName", ""):
            changes["name_key"] = p_name
    if (
        st_attrs is not None
        and st_attrs != r.study_attrs
        and db.execute(_OTHERS_IN_STUDY, (r.study_uid, r.sop_uid)).fetchone() is not None
    ):
        changes["study_attrs"] = supplement_attrs(st_attrs, r.study_attrs)
        held = json.loads(st_attrs)
        if held.get("StudyDate", ""):
            changes["study_date"] = st_date
        if held.get("AccessionNumber", ""):
            changes["accession"] = st_accession
    if (
        se_attrs is not None
        and se_attrs != r.series_attrs
        and db.execute(_OTHERS_IN_SERIES, (r.series_uid, r.sop_uid)).fetchone() is not None
    ):
        changes["series_attrs"] = supplement_attrs(se_attrs, r.series_attrs)
        if json.loads(se_attrs).get("Modality", ""):
            changes["modality"] = se_modality
    return r._replace(**changes) if changes else r


def write_index_rows(db: Connection, r: IndexRow) -> None:
    """Write ``r`` inside the open transaction of ``db`` (:func:`index_statements`),
    then drop the series, study and patient it left empty: an instance stored again
    under another series, study or patient (``duplicates = "replace"``, a changed
    file re-indexed) moves, and what it leaves behind without instances must not be
    found by a C-FIND (PS3.4 C.4.1.3.2: Number of ... Related Instances).

    A series or study holding other instances does not move: a UID names one entity
    (PS3.3 A.1.2), so an instance naming the series under another study, or the study
    for another patient, conflicts with what is held, and :class:`HierarchyConflict`
    (naming Series Instance UID or Patient ID) is raised before anything is written.
    Moved, the instances held would be answered under a study or patient their data
    sets do not name, and not found under their own.

    The patient's, study's and series' attributes are supplemented, not replaced,
    where the entity holds other instances (:func:`_supplemented`)."""
    series: list[str] = []
    studies: list[str] = []
    patients: list[str] = []
    parents = db.execute(_PARENTS, (r.sop_uid, r.path, r.series_uid, r.study_uid)).fetchall()
    for old_series, old_study, old_patient in parents:
        if old_series is not None and old_series != r.series_uid:
            series.append(old_series)
        if old_study is not None and old_study != r.study_uid:
            if db.execute(_OTHERS_IN_SERIES, (r.series_uid, r.sop_uid)).fetchone() is not None:
                raise hierarchy_conflict(SERIES_CONFLICT)
            studies.append(old_study)
        if old_patient is not None and old_patient != r.patient_key:
            if db.execute(_OTHERS_IN_STUDY, (r.study_uid, r.sop_uid)).fetchone() is not None:
                raise hierarchy_conflict(STUDY_CONFLICT)
            patients.append(old_patient)
    for sql, parameters in index_statements(_supplemented(db, r)):
        db.execute(sql, parameters)
    if series or studies or patients:
        drop_emptied(db, series, studies, patients)


def drop_emptied(
    db: Connection, series: Iterable[str], studies: Iterable[str] = (), patients: Iterable[str] = ()
) -> None:
    """In the open transaction of ``db``: delete each of ``series`` that has no
    instance, then each of ``studies`` (and the studies of the series deleted) that has
    no series, then each of ``patients`` (and those of the studies deleted) that has no
    study. Each delete is conditional, so a parent a concurrent write put something
    into stays (one writer at a time here; PostgreSQL's ``drop_emptied`` locks the row
    first)."""
    study_set = dict.fromkeys(studies)
    patient_set = dict.fromkeys(patients)
    for key in dict.fromkeys(series):
        row = db.execute(
            "DELETE FROM series WHERE series_uid = ? AND NOT EXISTS (SELECT 1 FROM instances WHERE series_uid = ?) "
            "RETURNING study_uid",
            (key, key),
        ).fetchall()
        if row:
            study_set[row[0][0]] = None
    for key in study_set:
        row = db.execute(
            "DELETE FROM studies WHERE study_uid = ? AND NOT EXISTS (SELECT 1 FROM series WHERE study_uid = ?) "
            "RETURNING patient_key",
            (key, key),
        ).fetchall()
        if row:
            patient_set[row[0][0]] = None
    for key in patient_set:
        db.execute(
            "DELETE FROM patients WHERE patient_key = ? AND NOT EXISTS (SELECT 1 FROM studies WHERE patient_key = ?)",
            (key, key),
        )


class Cursor(Protocol):
    """The rows of one statement."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """One connection, used by one thread at a time; ``with conn:`` is one transaction
    (committed on success, rolled back on an exception), as for :mod:`sqlite3`."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...


class Backend(ABC):
    """An index database engine (see the module)."""

    #: ``"sqlite"`` or ``"postgresql"``: the directory of its migrations.
    dialect: str
    #: Exceptions meaning "the index could not do it now" (locked, unreachable, out
    #: of space): a store is answered 0xA700 with the reason, never success.
    errors: tuple[type[BaseException], ...]
    #: Threads writing at once (SQLite: one writer; PostgreSQL: several).
    writers: int = 1
    #: Other processes, perhaps on other machines, may write this index at any time.
    multi_node: bool = False
    #: Concurrent stores' writes are grouped in one transaction (:meth:`transaction_group`).
    group_commit: bool = False

    @abstractmethod
    def connect(self) -> Connection:
        """A read-write connection with the schema up to date (blocking; a worker thread)."""

    @abstractmethod
    def read_connection(self, deadline: float | None = None) -> Connection:
        """A connection for one query; its statements fail past ``deadline`` (monotonic)."""

    def transaction(self, db: Connection, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run ``statements`` as one transaction (their rows are not needed)."""
        with db:
            for sql, parameters in statements:
                db.execute(sql, parameters)

    def write_index(self, db: Connection, row: IndexRow) -> None:
        """Index one stored instance, in one transaction (:func:`write_index_rows`)."""
        with db:
            write_index_rows(db, row)

    def drop_emptied(self, db: Connection, series: Sequence[str]) -> None:
        """In the open transaction of ``db``: drop those of ``series`` left without
        instances and the studies and patients they leave empty (:func:`drop_emptied`)."""
        drop_emptied(db, series)

    def transaction_group(self, db: Connection, writes: Sequence[Callable[[], IndexRow]]) -> list[BaseException | None]:
        """Index several instances in one transaction, each in a savepoint: a write
        that fails (making its row or writing it) is rolled back alone and its
        exception returned in its place; the commit's failure is raised (none stored)."""
        raise NotImplementedError

    def retry(self, fn: Callable[[], T]) -> T:
        """Run one write transaction, again when it meets a transient conflict."""
        return fn()

    @abstractmethod
    def bulk(self, db: Connection) -> AbstractContextManager[None]:
        """Relaxed durability for a re-index (the files are the truth; it is redone if cut short)."""

    @abstractmethod
    def instance_lock(self, uid: str, find: bool = False) -> AbstractAsyncContextManager[Any]:
        """Exclusive use of one SOP Instance UID by this store, across every writer
        of the index (other processes, other nodes). A back end that can do the store's
        look-up (``find``) and index write itself, on the lock's connection, yields an
        object with ``existing`` and ``write_index(make, unlock=...)`` (PostgreSQL);
        else ``None``, and the archive uses its writer threads."""

    @abstractmethod
    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """Exclusive use of a named task (the re-index) across processes (blocking)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the back end holds (after every connection was closed)."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the index is, for messages (no password)."""

    def unusable(self) -> str | None:
        """Why writes through the connections open now must fail whatever a fresh read
        says (``None``: no such reason)."""
        return None


_NUMBERED = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations(dialect: str) -> list[tuple[int, str, str]]:
    """The schema migrations of ``dialect`` in order: (version, file name, SQL)."""
    folder = resources.files(__package__).joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        match = _NUMBERED.match(entry.name)
        if match:
            found.append((int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _n, _s in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"{dialect} migrations are not numbered 1..n: {versions}")
    return found


def split_statements(sql: str) -> list[str]:
    """The statements of a migration file (``;`` ends a statement at the end of a line;
    ``--`` comments dropped)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.M) if s.strip()]
