"""C-FIND matching and C-GET / C-MOVE retrieve of the archive (PS3.4 C.4): the
query level and hierarchy checks, candidates narrowed in SQL, computed keys
(C.3.4), and matches produced in batches within the query budget."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset

from ..dimse import Status
from ..services.qr import QueryRequest, StatusError
from .db import (
    IndexDB,
)
from .matching import matches, parse_range, response_identifier
from .schema import (
    _INDEXED_UP_TO,
    _NOT_STORED,
    _ORDER,
    _REQUIRED,
    _UNIQUE,
    _add_from_file,
    _check_hierarchy,
    _dataset,
    _exact,
    _level,
    _model,
    _name_prefix,
    _text,
    _where_in,
)


class QueryMixin(IndexDB):
    """Querying and retrieving (see the module)."""

    def _query(self, model: str, identifier: Dataset, relational: bool = False) -> list[Dataset]:
        db = self._read_conn()
        try:
            return list(self._matches(db, model, identifier, relational))
        finally:
            db.close()

    def _matches(self, db: Any, model: str, identifier: Dataset, relational: bool) -> Iterator[Dataset]:
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
        self, db: Any, model: str, level: str, q: Dataset, required: frozenset[str], want_path: bool
    ) -> Iterable[tuple[list[dict[str, str]], dict[str, Any], str | None]]:
        """Rows at ``level`` joined with their parents, narrowed by exact keys in SQL
        (a Required key also lets a zero-length stored value through, C.2.2.1.2), and
        with ``want_path`` the file of one instance of each entity."""
        where: list[str] = []
        args: list[Any] = []

        def exact(column: str, key: str) -> None:
            _where_in(q, key, column, where, args, or_empty=key in required, prefilter=True)

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
        for row in self.backend.iterate(db, sql, args):
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
    def _representative(db: Any, level: str, key: str) -> str | None:
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

    def _computed(self, db: Any, level: str, keys: dict[str, str], q: Dataset) -> dict[str, Any]:
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
                except self.resource_errors as exc:
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


def _take(items: Iterator[Dataset], n: int) -> list[Dataset]:
    """Up to ``n`` more matches (run on a query thread)."""
    return list(itertools.islice(items, n))


def _close_query(items: Iterator[Any], db: Any) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        close()
    db.close()
