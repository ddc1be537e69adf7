"""C-FIND matching and C-GET / C-MOVE retrieve of the archive (PS3.4 C.4): the
query level and hierarchy checks, candidates narrowed in SQL, computed keys
(C.3.4), and matches produced in batches within the query budget."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset

from ..dimse import Status
from ..services.qr import QueryRequest, StatusError, StoredFile, Unavailable
from .budget import QueryBudget
from .db import (
    QUERY_SLICE,
    IndexDB,
    stored_file_problem,
)
from .matching import matches, parse_range, response_identifier
from .schema import (
    INDEXED_UP_TO,
    LEVEL_ORDER,
    NOT_STORED,
    REQUIRED_KEYS,
    UNIQUE_KEYS,
    add_from_file,
    check_hierarchy,
    dataset_from,
    exact_values,
    model_name,
    name_prefix,
    query_level,
    text_of,
    where_in,
)


class QueryMixin(IndexDB):
    """Querying and retrieving (see the module)."""

    def _query(self, model: str, identifier: Dataset, relational: bool = False) -> list[Dataset]:
        db = self._read_conn()
        try:
            return [m for m in self._matches(db, model, identifier, relational) if m is not None]
        finally:
            db.close()

    def _matches(self, db: Any, model: str, identifier: Dataset, relational: bool) -> Iterator[Dataset | None]:
        """Each candidate's response identifier, or ``None`` when it does not match (so a
        long run of candidates without a match can be cut into slices, :func:`_take`)."""
        level = query_level(model, identifier, "Query")
        if not relational:
            check_hierarchy(model, level, identifier)
        required = REQUIRED_KEYS[model][level]
        indexed = set(INDEXED_UP_TO[level])
        from_file = [
            elem.tag
            for elem in identifier
            if elem.tag.group not in (0x0000, 0x0002) and elem.keyword not in indexed and elem.keyword not in NOT_STORED
        ]
        for attrs, extra, path in self._candidates(db, model, level, identifier, required, bool(from_file)):
            candidate = dataset_from(*attrs)
            for key, value in extra.items():
                setattr(candidate, key, value)
            if from_file and path is not None:
                add_from_file(candidate, path, from_file)
            if matches(identifier, candidate, unknown=required):
                response = response_identifier(identifier, candidate)
                if self.retrieve_ae_title:
                    response.RetrieveAETitle = self.retrieve_ae_title
                yield response
            else:
                yield None

    def _candidates(
        self, db: Any, model: str, level: str, q: Dataset, required: frozenset[str], want_path: bool
    ) -> Iterable[tuple[list[dict[str, str]], dict[str, Any], str | None]]:
        """Rows at ``level`` joined with their parents, narrowed by exact keys in SQL
        (a Required key also lets a zero-length stored value through, C.2.2.1.2), and
        with ``want_path`` the file of one instance of each entity."""
        depth = LEVEL_ORDER.index(level)
        where, args = _prefilter(q, depth, required)
        sql = _select(depth)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.backend.iterate(db, sql, args)
        while chunk := list(itertools.islice(rows, _BATCH)):
            # Computed keys and files for the whole batch, one statement each; the rows
            # are decoded one at a time (a query held by a slow peer keeps little).
            keys = sorted({row[1 + 2 * depth] for row in chunk}) if depth < 3 else []
            computed = self._computed(db, level, keys, q)
            paths = self._representatives(db, level, keys) if want_path and depth < 3 else {}
            for row in chunk:
                attrs, entities, path = _unpack(row, depth)
                if depth >= 3:
                    yield attrs, {}, path
                else:
                    yield attrs, computed[entities[level]], paths.get(entities[level])

    @staticmethod
    def _representatives(db: Any, level: str, keys: list[str]) -> dict[str, str]:
        """The file of one instance of each patient, study or series in ``keys``."""
        column, sql = {
            "PATIENT": ("st.patient_key", "FROM instances i JOIN series se ON i.series_uid = se.series_uid "
                        "JOIN studies st ON se.study_uid = st.study_uid"),
            "STUDY": ("se.study_uid", "FROM instances i JOIN series se ON i.series_uid = se.series_uid"),
            "SERIES": ("i.series_uid", "FROM instances i"),
        }[level]  # fmt: skip
        rows = db.execute(
            f"SELECT {column}, MIN(i.path) {sql} WHERE {column} IN ({_marks(keys)}) GROUP BY {column}", keys
        )
        return {row[0]: row[1] for row in rows}

    @staticmethod
    def _counts(db: Any, column: str, joins: str, keys: list[str]) -> dict[str, int]:
        rows = db.execute(
            f"SELECT {column}, COUNT(*) {joins} WHERE {column} IN ({_marks(keys)}) GROUP BY {column}", keys
        )
        return {row[0]: int(row[1]) for row in rows}

    def _computed(self, db: Any, level: str, keys: list[str], q: Dataset) -> dict[str, dict[str, Any]]:
        """Counts and ModalitiesInStudy of each entity in ``keys`` when the query asks
        for them (PS3.4 C.3.4): one statement per key for the whole batch."""
        out: dict[str, dict[str, Any]] = {key: {} for key in keys}
        if not keys:
            return out
        wanted: list[tuple[str, str, str]] = []  # (attribute, key column, FROM ... JOIN ...)
        if level == "PATIENT":
            wanted = [
                ("NumberOfPatientRelatedStudies", "patient_key", "FROM studies"),
                ("NumberOfPatientRelatedInstances", "st.patient_key",
                 "FROM instances i JOIN series se ON i.series_uid = se.series_uid "
                 "JOIN studies st ON se.study_uid = st.study_uid"),
            ]  # fmt: skip
        elif level == "STUDY":
            wanted = [
                ("NumberOfStudyRelatedSeries", "study_uid", "FROM series"),
                ("NumberOfStudyRelatedInstances", "se.study_uid",
                 "FROM instances i JOIN series se ON i.series_uid = se.series_uid"),
            ]  # fmt: skip
            if "ModalitiesInStudy" in q:
                modalities: dict[str, set[str]] = {key: set() for key in keys}
                for uid, modality in db.execute(
                    f"SELECT study_uid, modality FROM series WHERE study_uid IN ({_marks(keys)})", keys
                ):
                    if modality:
                        modalities[uid].add(modality)
                for key in keys:
                    out[key]["ModalitiesInStudy"] = sorted(modalities[key])
        elif level == "SERIES":
            wanted = [("NumberOfSeriesRelatedInstances", "series_uid", "FROM instances")]
        for attribute, column, joins in wanted:
            if attribute in q:
                counts = self._counts(db, column, joins, keys)
                for key in keys:
                    out[key][attribute] = counts.get(key, 0)
        return out

    async def find(self, model_uid: str, identifier: Dataset, *, relational: bool = False) -> list[Dataset]:
        """C-FIND matches; ``relational`` when relational queries were negotiated (C.4.1.2.2.2)."""
        return await self._read(self._query, model_name(model_uid), identifier, relational)

    async def find_iter(
        self,
        model_uid: str,
        identifier: Dataset,
        *,
        relational: bool = False,
        batch: int = 64,
        owner: object | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> AsyncIterator[Dataset]:
        """C-FIND matches produced in batches, each only when the previous one was
        taken (a peer that does not read its responses stops the query), within
        :attr:`query_max_matches` and :attr:`query_time_budget` (else 0xA700). A batch
        holds a query thread for :data:`~.db.QUERY_SLICE` at most; ``owner`` (the
        association) takes turns with the others at the query threads. ``stop()`` true
        after a batch (a C-CANCEL) ends the query there, matches or not."""
        model = model_name(model_uid)
        budget = QueryBudget(self.query_max_matches, self.query_time_budget, "archive C-FIND")
        db = await self._read(self._read_conn, budget.deadline, owner=owner)
        matches = self._matches(db, model, identifier, relational)
        produced = 0
        try:
            while True:
                want = min(batch, self.query_max_matches + 1 - produced)  # one more shows the excess
                try:
                    items, ended = await self._read(_take, matches, want, QUERY_SLICE, owner=owner)
                except self.resource_errors:
                    if budget.expired():  # interrupted at the deadline
                        budget.timed_out()
                    raise
                for item in items[: self.query_max_matches - produced]:
                    yield item
                produced += len(items)
                budget.check(produced)
                if ended or (stop is not None and stop()):
                    return
        finally:
            # Shielded: cancelled again while it waits its turn, the query is still closed.
            await asyncio.shield(self._read(_close_query, matches, db, owner=owner))

    def _paths(self, model: str, identifier: Dataset) -> list[str | Unavailable]:
        level = query_level(model, identifier, "Retrieve")
        # Unique keys at the retrieve level (and above, for the hierarchy) are required (C.4.2.2.1).
        if not exact_values(identifier.get(UNIQUE_KEYS[level])):
            raise StatusError(Status(0xA900, f"{UNIQUE_KEYS[level]} is required at {level} level"))
        where: list[str] = []
        args: list[Any] = []
        for column, key in (
            ("p.patient_id", "PatientID"),
            ("st.study_uid", "StudyInstanceUID"),
            ("se.series_uid", "SeriesInstanceUID"),
            ("i.sop_uid", "SOPInstanceUID"),
        ):
            where_in(identifier, key, column, where, args)
        sql = (
            "SELECT i.path, i.size, i.sop_uid FROM instances i JOIN series se ON i.series_uid = se.series_uid "
            "JOIN studies st ON se.study_uid = st.study_uid JOIN patients p ON st.patient_key = p.patient_key "
            "WHERE " + " AND ".join(where) + " ORDER BY i.path"
        )
        db = self._read_conn()
        try:
            return [_on_disk(path, size, uid) for path, size, uid in db.execute(sql, args)]
        finally:
            db.close()

    async def retrieve_items(
        self, model_uid: str, identifier: Dataset, *, owner: object | None = None
    ) -> list[str | Unavailable]:
        """What a C-GET / C-MOVE sends: each matching instance's file, or
        :class:`Unavailable` when the file is gone or not the size it was stored at."""
        return await self._read(self._paths, model_name(model_uid), identifier, owner=owner)

    async def retrieve_paths(self, model_uid: str, identifier: Dataset) -> list[str]:
        return [i for i in await self.retrieve_items(model_uid, identifier) if isinstance(i, str)]

    # -- handlers -----------------------------------------------------------------

    async def on_c_find(self, request: QueryRequest) -> AsyncIterator[Dataset]:
        negotiated = request.assoc.negotiated
        reply = negotiated.extended.get(request.model, b"") if negotiated is not None else b""
        relational = reply[:1] == b"\x01"
        async for ds in self.find_iter(
            request.model,
            request.identifier,
            relational=relational,
            owner=request.assoc,
            stop=lambda: request.cancelled,
        ):
            yield ds

    async def on_retrieve(self, request: QueryRequest) -> AsyncIterator[str | Unavailable]:
        for item in await self.retrieve_items(request.model, request.identifier, owner=request.assoc):
            yield item


def _on_disk(path: str, size: int | None, uid: str) -> str | Unavailable:
    """``path`` (with its UID, should it go away before it is sent), or
    :class:`Unavailable` when :func:`stored_file_problem` finds one."""
    problem = stored_file_problem(path, size)
    return StoredFile(path, uid) if problem is None else Unavailable(uid, problem)


def _prefilter(q: Dataset, depth: int, required: frozenset[str]) -> tuple[list[str], list[Any]]:
    """SQL conditions (and their arguments) from the keys of ``q`` that narrow by index
    down to the query level at ``depth``; the matcher decides everything else."""
    where: list[str] = []
    args: list[Any] = []

    def exact(column: str, key: str) -> None:
        where_in(q, key, column, where, args, or_empty=key in required, prefilter=True)

    exact("p.patient_id", "PatientID")
    prefix = name_prefix(q.get("PatientName")) if "PatientName" in q else ""
    if prefix:
        # The literal start of a name key narrows by index; the matcher decides the rest.
        where.append("(p.name_key >= ? AND p.name_key < ? OR p.name_key = '')")
        args.extend([prefix, prefix + "\U0010ffff"])
    if depth >= 1:
        exact("st.study_uid", "StudyInstanceUID")
        exact("st.accession", "AccessionNumber")
        date = text_of(q.get("StudyDate")) if "StudyDate" in q else ""
        if not _study_date_range(date, where, args) and exact_values(date):
            exact("st.study_date", "StudyDate")
    if depth >= 2:
        exact("se.series_uid", "SeriesInstanceUID")
        exact("se.modality", "Modality")
    if depth >= 3:
        exact("i.sop_uid", "SOPInstanceUID")
    return where, args


def _study_date_range(date: str, where: list[str], args: list[Any]) -> bool:
    """Narrow by a Study Date range key; ``False`` when ``date`` is not a range.

    Only full YYYYMMDD bounds compare correctly as strings; shorter ones (a whole
    month or year) are left to the matcher. An unknown (empty) study date matches
    (Required key, C.2.2.1.2)."""
    rng = parse_range(date, "DA") if date else None
    if rng is None:
        return False
    bounds = []
    for bound, op in zip(rng, (">=", "<="), strict=True):
        if bound and len(bound) == 8 and bound.isdigit():
            bounds.append(f"st.study_date {op} ?")
            args.append(bound)
    if bounds:
        where.append(f"({' AND '.join(bounds)} OR st.study_date = '')")
    return True


#: Per level below PATIENT: the join and the columns it adds (attributes, then key or path).
_LEVEL_JOINS = (
    ("JOIN studies st ON st.patient_key = p.patient_key", "st.attrs", "st.study_uid"),
    ("JOIN series se ON se.study_uid = st.study_uid", "se.attrs", "se.series_uid"),
    ("JOIN instances i ON i.series_uid = se.series_uid", "i.attrs", "i.path"),
)


def _select(depth: int) -> str:
    """The SELECT of rows at ``depth`` joined with their parents (without WHERE)."""
    joins = ["patients p"]
    select = ["p.attrs", "p.patient_key"]
    for join, attrs, key in _LEVEL_JOINS[:depth]:
        joins.append(join)
        select += [attrs, key]
    return f"SELECT {', '.join(select)} FROM {' '.join(joins)}"


def _unpack(row: Any, depth: int) -> tuple[list[dict[str, str]], dict[str, str], str | None]:
    """One row of :func:`_select`: each level's attributes, the entity keys by level,
    and at IMAGE level the instance's file."""
    attrs = [json.loads(row[0])]
    keys = {"PATIENT": row[1]}
    for i, (level, uid_key) in enumerate((("STUDY", "StudyInstanceUID"), ("SERIES", "SeriesInstanceUID"))):
        if depth > i:
            attrs.append(json.loads(row[2 + 2 * i]))
            attrs[-1].setdefault(uid_key, row[3 + 2 * i])
            keys[level] = row[3 + 2 * i]
    if depth >= 3:
        attrs.append(json.loads(row[6]))
        return attrs, keys, row[7]
    return attrs, keys, None


#: Candidate rows handled together: their computed keys and files in one statement each.
_BATCH = 16


def _marks(values: list[str]) -> str:
    return ",".join("?" * len(values))


def _take(items: Iterator[Dataset | None], n: int, seconds: float) -> tuple[list[Dataset], bool]:
    """Up to ``n`` more matches, for ``seconds`` at most (run on a query thread), and
    whether the query is over."""
    out: list[Dataset] = []
    until = time.monotonic() + seconds
    for item in items:
        if item is not None:
            out.append(item)
            if len(out) >= n:
                return out, False
        if time.monotonic() > until:
            return out, False
    return out, True


def _close_query(items: Iterator[Any], db: Any) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        close()
    db.close()
