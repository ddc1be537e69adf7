"""C-FIND matching and C-GET / C-MOVE retrieve of the archive (PS3.4 C.4): the
query level and hierarchy checks, candidates narrowed in SQL, computed keys
(C.3.4), and matches produced in batches within the query budget."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from ..dimse import Status
from ..log import get_logger
from ..services.qr import Matches, QueryRequest, StatusError, StoredFile, Unavailable
from .budget import QueryBudget
from .date_ranges import da_days, parse_range
from .db import (
    QUERY_SLICE,
    IndexDB,
    instance_availability,
    stored_file_problem,
)
from .schema import (
    HIERARCHY_ABOVE,
    INDEXED_UP_TO,
    LEVEL_KEYS,
    LEVEL_ORDER,
    MAX_IN,
    NOT_STORED,
    REQUIRED_KEYS,
    UNIQUE_KEYS,
    add_from_file,
    check_hierarchy,
    check_key_vrs,
    dataset_from,
    exact_values,
    in_clause,
    in_pieces,
    model_name,
    name_prefix,
    no_patient_id,
    query_level,
    tag_of,
    text_of,
    where_in,
    with_default_repertoire,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = get_logger()


class QueryMixin(IndexDB):
    """Querying and retrieving (see the module)."""

    #: C-GET / C-MOVE requests lacking the unique key of a level above their own are
    #: served by the keys they name even where the requestor did not negotiate
    #: relational retrieval (``serve``'s ``relational_retrieve``).
    relational_retrieve: bool = True

    def _query(self, model: str, identifier: Dataset, relational: bool = False) -> list[Dataset]:
        query = _PagedQuery(model, identifier, relational)
        out: list[Dataset] = []
        while not query.ended:
            items, _ended = self._next_matches(query, _ALL, _NO_SLICE)
            out.extend(items)
        return out

    def _next_matches(self, query: _PagedQuery, want: int, seconds: float) -> tuple[list[Dataset], bool]:
        """Up to ``want`` more matches of ``query``, for ``seconds`` at most (run on a
        query thread), and whether the query is over. Candidates are read a page at a
        time after the last key seen (keyset pagination, in the order of the level's
        unique key), on a connection of this call's own, closed before it returns: a
        query whose peer does not read its responses holds no connection, cursor or
        snapshot of the index (a PostgreSQL pool connection; an SQLite read
        transaction, which would stop WAL checkpoints)."""
        out: list[Dataset] = []
        until = time.monotonic() + seconds
        db = self._read_conn(query.deadline)
        try:
            while not query.ended:
                for key, response in self._page(db, query):
                    query.last = key
                    if response is not None:
                        out.append(response)
                    if len(out) >= want or time.monotonic() > until:
                        return out, False
                # A page read through without enough matches: the next pages are larger
                # (fewer statements, fewer sorts of what an index narrowed).
                query.page = min(query.page * 2, _MAX_PAGE)
        finally:
            db.close()
        return out, True

    def _page(self, db: Any, query: _PagedQuery) -> Iterator[tuple[str, Dataset | None]]:
        """The next page of candidates after ``query.last``: each one's key and its
        response identifier, or ``None`` when it does not match. Every row of the page
        is read before the first is yielded (no statement left open)."""
        from .matching import response_identifier  # here: matching loads pydicom

        rows = db.execute(query.sql(), query.arguments()).fetchall()
        # Where the instances are (PS3.4 C.4.1.1.3.2), as keys too: a Retrieve AE Title or
        # Instance Availability key with a value matched nothing (no candidate had them).
        # An instance's availability is its file's (see _candidates); above the IMAGE
        # level it is not looked up file by file.
        located: dict[str, str] = {}
        if self.retrieve_ae_title and "RetrieveAETitle" in query.identifier:
            located["RetrieveAETitle"] = self.retrieve_ae_title
        if "InstanceAvailability" in query.identifier and query.depth < 3:
            located["InstanceAvailability"] = "ONLINE"
        for (attrs, extra, path), key in self._candidates(db, query, rows):
            candidate = dataset_from(*attrs)
            for name, value in (*extra.items(), *located.items()):
                setattr(candidate, name, value)
            if query.from_file and path is not None:
                add_from_file(candidate, path, query.from_file)
            if query.matches(candidate):
                response = response_identifier(query.identifier, candidate)
                if self.retrieve_ae_title:
                    response.RetrieveAETitle = self.retrieve_ae_title
                yield key, response
            else:
                yield key, None
        if len(rows) < query.page:  # the last page (of a list's piece), every row of it taken
            query.next_piece()

    def _candidates(
        self, db: Any, query: _PagedQuery, rows: list[Any]
    ) -> Iterator[tuple[tuple[list[dict[str, str]], dict[str, Any], str | None], str]]:
        """The candidates of ``rows`` (rows at the query level joined with their
        parents): their attributes, computed keys and, when the query needs keys the
        index lacks, the file of one instance of each entity; with each its key. At the
        IMAGE level an Instance Availability key is the instance's file's: UNAVAILABLE
        when it is gone or not the size it was stored at (:func:`.instance_availability`),
        as a retrieve would fail it."""
        depth, level = query.depth, query.level
        if not rows:  # an empty page (no "IN ()": PostgreSQL refuses it)
            return
        keys = sorted({row[1 + 2 * depth] for row in rows}) if depth < 3 else []
        computed = self._computed(db, level, keys, query.identifier)
        paths = self._representatives(db, level, keys) if query.from_file and depth < 3 else {}
        availability = "InstanceAvailability" in query.identifier
        for row in rows:
            attrs, entities, path = _unpack(row, depth)
            key = row[-1]
            if depth >= 3:
                extra = {"InstanceAvailability": instance_availability(row[7], row[8])} if availability else {}
                yield (attrs, extra, path), key
            else:
                yield (attrs, computed[entities[level]], paths.get(entities[level])), key

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
        taken (a peer that does not read its responses stops the query; between
        batches nothing of the index is held, see :meth:`_next_matches`), within
        :attr:`query_max_matches` and :attr:`query_time_budget` (else 0xA700). A batch
        holds a query thread for :data:`~.db.QUERY_SLICE` at most; ``owner`` (the
        association) takes turns with the others at the query threads. ``stop()`` true
        after a batch (a C-CANCEL) ends the query there, matches or not."""
        budget = QueryBudget(self.query_max_matches, self.query_time_budget, "archive C-FIND")
        query = _PagedQuery(model_name(model_uid), identifier, relational, budget.deadline)
        produced = 0
        while True:
            want = min(batch, self.query_max_matches + 1 - produced)  # one more shows the excess
            try:
                items, ended = await self._read(self._next_matches, query, want, QUERY_SLICE, owner=owner)
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

    def _retrieve_count(self, where: _RetrieveWhere, deadline: float) -> Matches:
        """How many instances a retrieve sends, and their (SOP class, transfer syntax) pairs."""
        counts: dict[tuple[str, str], int] = {}
        db = self._read_conn(deadline)
        try:
            for sql, args in where.parts:
                for c, ts, n in db.execute(
                    f"SELECT i.sop_class, i.transfer_syntax, COUNT(*) {_RETRIEVE_FROM} WHERE {sql} "
                    "GROUP BY i.sop_class, i.transfer_syntax",
                    args,
                ).fetchall():
                    kind = (str(c), str(ts) if ts else "")
                    counts[kind] = counts.get(kind, 0) + int(n)
        finally:
            db.close()
        kinds = tuple(counts)
        # A transfer syntax not recorded: the files are read for the C-MOVE's contexts.
        return Matches(sum(counts.values()), kinds if all(ts for _c, ts in kinds) else None)

    def _retrieve_page(
        self, where: _RetrieveWhere, after: tuple[int, str | None]
    ) -> tuple[list[str | Unavailable], tuple[int, str | None] | None]:
        """The next :data:`_RETRIEVE_PAGE` instances of part ``after[0]`` of the
        retrieve after SOP Instance UID ``after[1]`` (keyset pagination, part after
        part), on a connection closed before this returns; and where the next page
        starts (``None``: there are no more)."""
        part, last = after
        sql, args = where.parts[part]
        if last is not None:
            sql, args = f"{sql} AND i.sop_uid > ?", [*args, last]
        db = self._read_conn()
        try:
            rows = db.execute(
                f"SELECT i.path, i.size, i.sop_uid {_RETRIEVE_FROM} WHERE {sql} ORDER BY i.sop_uid "
                f"LIMIT {_RETRIEVE_PAGE}",
                args,
            ).fetchall()
        finally:
            db.close()
        items = [_on_disk(path, size, uid) for path, size, uid in rows]
        if len(rows) == _RETRIEVE_PAGE:
            return items, (part, rows[-1][2])
        return items, ((part + 1, None) if part + 1 < len(where.parts) else None)

    async def retrieve_iter(
        self,
        model_uid: str,
        identifier: Dataset,
        *,
        owner: object | None = None,
        announce: bool = False,
        relational: bool = False,
        lenient: bool = False,
    ) -> AsyncIterator[str | Unavailable | Matches]:
        """What a C-GET / C-MOVE sends: each matching instance's file, or
        :class:`Unavailable` when the file is gone or not the size it was stored at
        (``relational``: relational retrieval was negotiated, C.4.2.2.1: the unique
        keys of the levels above may be left out; ``lenient``: they may be left out
        without it, the keys given keeping their hierarchical meaning);
        read a page at a time, holding nothing of the index between pages. With
        ``announce`` first a :class:`~dimse_async.services.qr.Matches` (their number and
        kinds), so the SCP sends them as they come (nothing collected first).

        The matches are counted first: more than :attr:`retrieve_max_instances` are
        refused with 0xA702, Refused: Out of Resources - Unable to perform
        sub-operations (PS3.4 C.4.2.1.5 for C-MOVE, C.4.3.1.3 for C-GET), before any
        sub-operation; a count not done within :attr:`query_time_budget` with 0xA701,
        Refused: Out of Resources - Unable to calculate number of matches."""
        where = _retrieve_where(model_name(model_uid), identifier, relational, lenient)
        started = time.monotonic()
        deadline = started + self.query_time_budget
        try:
            matches = await self._read(self._retrieve_count, where, deadline, owner=owner)
        except self.resource_errors as exc:
            if time.monotonic() <= deadline:
                raise
            log.warning("archive: retrieve refused: matches not counted in time", seconds=self.query_time_budget)
            raise StatusError(Status(0xA701, "Out of resources: matches not counted in time")) from exc
        count = matches.count
        if count > self.retrieve_max_instances:
            log.warning(
                "archive: retrieve refused: too many instances",
                level=where.level,
                matches=count,
                retrieve_max_instances=self.retrieve_max_instances,
            )
            raise StatusError(
                Status(0xA702, f"Out of resources: {count} instances, over {self.retrieve_max_instances}"[:64])
            )
        if announce:
            yield matches
        after: tuple[int, str | None] | None = (0, None)
        while after is not None:
            items, after = await self._read(self._retrieve_page, where, after, owner=owner)
            for item in items:
                yield item

    async def retrieve_items(
        self, model_uid: str, identifier: Dataset, *, owner: object | None = None, relational: bool = False
    ) -> list[str | Unavailable]:
        """:meth:`retrieve_iter` as a list."""
        return [
            item
            async for item in self.retrieve_iter(model_uid, identifier, owner=owner, relational=relational)
            if not isinstance(item, Matches)
        ]

    async def retrieve_paths(self, model_uid: str, identifier: Dataset, *, relational: bool = False) -> list[str]:
        items = await self.retrieve_items(model_uid, identifier, relational=relational)
        return [i for i in items if isinstance(i, str)]

    # -- handlers -----------------------------------------------------------------

    async def on_c_find(self, request: QueryRequest) -> AsyncIterator[Dataset]:
        relational = _negotiated_relational(request)
        async for ds in self.find_iter(
            request.model,
            request.identifier,
            relational=relational,
            owner=request.assoc,
            stop=lambda: request.cancelled,
        ):
            yield ds

    async def on_retrieve(self, request: QueryRequest) -> AsyncIterator[str | Unavailable | Matches]:
        """C-GET / C-MOVE: the number of instances and their kinds first (counted in
        SQL), then each page of instances as the sub-operations take them."""
        items = self.retrieve_iter(
            request.model,
            request.identifier,
            owner=request.assoc,
            announce=True,
            relational=_negotiated_relational(request),
            lenient=self.relational_retrieve,
        )
        async for item in items:
            yield item


def _negotiated_relational(request: QueryRequest) -> bool:
    """Whether relational queries (a FIND class, PS3.4 C.5.1.1.1) or relational retrieval
    (MOVE, GET: C.5.2.1.1, C.5.3.1.1) were granted for the request's SOP class."""
    negotiated = request.assoc.negotiated
    reply = negotiated.extended.get(request.model, b"") if negotiated is not None else b""
    return reply[:1] == b"\x01"


class _RetrieveWhere(NamedTuple):
    """A retrieve's SQL conditions: one part, or one per :data:`MAX_IN` values of a long
    list of the level's unique key (disjoint: each instance is in one part)."""

    level: str
    parts: list[tuple[str, list[Any]]]


#: The instances of a retrieve with their parents (the keys above the level narrow them).
_RETRIEVE_FROM = (
    "FROM instances i JOIN series se ON i.series_uid = se.series_uid "
    "JOIN studies st ON se.study_uid = st.study_uid JOIN patients p ON st.patient_key = p.patient_key"
)
#: Instances read by one statement of a retrieve.
_RETRIEVE_PAGE = 256
#: The keys that select a retrieve's instances, with their columns.
_RETRIEVE_KEYS = (
    ("p.patient_id", "PatientID"),
    ("st.study_uid", "StudyInstanceUID"),
    ("se.series_uid", "SeriesInstanceUID"),
    ("i.sop_uid", "SOPInstanceUID"),
)
#: Their VRs (PS3.6). An identifier in explicit VR may say otherwise: another text VR
#: is read as text (its value may still name something), a binary one or SQ cannot.
_RETRIEVE_VR = {"PatientID": "LO", "StudyInstanceUID": "UI", "SeriesInstanceUID": "UI", "SOPInstanceUID": "UI"}
_TEXT_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UN", "UR", "UT"]
)


def _retrieve_where(model: str, identifier: Dataset, relational: bool = False, lenient: bool = False) -> _RetrieveWhere:
    """The SQL condition selecting a C-GET / C-MOVE's instances: 0xA900 without the
    unique key of the retrieve level (C.4.2.2.1), without the unique key of each level
    above it unless relational retrieval was negotiated (``relational``; C.4.2.2.1,
    C.4.3.2.1 hierarchical retrieve: :func:`.check_hierarchy`) or ``lenient`` (served by
    the keys given, a Patient ID without a value still naming the patients without
    one), or with a unique key of
    a level below it (a STUDY retrieve sends the whole study: C.4.2.1.4.1, C.4.3.1.3.1
    allow the keys of the retrieve level and above; it was taken to narrow the study),
    the key as Offending Element (0000,0901, PS3.4 C.4.2.1.5, C.4.3.1.4)."""
    level = query_level(model, identifier, "Retrieve")
    unique = UNIQUE_KEYS[level]
    values = exact_values(identifier.get(unique))
    if not values:
        raise StatusError(Status(0xA900, f"{unique} is required at {level} level", attributes=[tag_of(unique)]))
    where: list[str] = []
    args: list[Any] = []
    if not relational:
        if not lenient:
            check_hierarchy(model, level, identifier, "retrieve")
        if "PatientID" in HIERARCHY_ABOVE[model][level] and no_patient_id(identifier):
            where.append("p.patient_id = ''")  # the patients without an ID (see no_patient_id)
    pieces: list[list[str]] = []
    unique_column = ""
    depth = LEVEL_ORDER.index(level)
    for at, (column, key) in enumerate(_RETRIEVE_KEYS):
        if key not in identifier:
            continue
        vr = identifier[key].VR
        if vr not in _TEXT_VRS:  # e.g. an SQ or US: its "value" names nothing stored (PS3.4 C.4.2.2.1)
            raise StatusError(Status(0xA900, f"{key} sent as {vr}, not {_RETRIEVE_VR[key]}", attributes=[tag_of(key)]))
        keyed = values if key == unique else exact_values(identifier.get(key))
        if not keyed:
            continue
        if at > depth:  # a unique key below the level: the level says what is sent (C.4.2.2.1)
            comment = f"{key} is of the {LEVEL_ORDER[at]} level, below {level}"[:64]
            raise StatusError(Status(0xA900, comment, attributes=[tag_of(key)]))
        if len(keyed) <= MAX_IN:
            where.append(in_clause(column, keyed))
            args.extend(keyed)
        elif key == unique:
            # A long List of UID Matching: in pieces, each one IN of the index
            # (PostgreSQL takes at most 32,767 arguments per statement).
            pieces, unique_column = in_pieces(keyed), column
        else:  # above the level: a single value (C.4.2.2.1)
            comment = f"{key}: {len(keyed)} values; only {unique} may list many"[:64]
            raise StatusError(Status(0xA900, comment, attributes=[tag_of(key)]))
    if not pieces:
        return _RetrieveWhere(level, [(" AND ".join(where), args)])
    return _RetrieveWhere(
        level, [(" AND ".join([*where, in_clause(unique_column, piece)]), [*args, *piece]) for piece in pieces]
    )


#: Attributes of each level below PATIENT that the index does not keep (PS3.4 C.6.1.1,
#: C.6.2.1 and the modules of each IE, PS3.3): with :data:`LEVEL_KEYS` and the
#: computed keys (C.3.4), the keys :func:`keys_below` knows the level of. The
#: Equipment IE's (Institution Name, Station Name, Manufacturer), which archives place
#: at the study or the series level, are not among them: matched on a stored instance.
_MORE_KEYS = {
    "STUDY": (
        "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
        "StudyComments", "OtherStudyNumbers", "AdmittingDiagnosesDescription", "NameOfPhysiciansReadingStudy",
        "ProcedureCodeSequence", "IssuerOfAccessionNumberSequence",
    ),
    "SERIES": (
        "NumberOfSeriesRelatedInstances", "ProtocolName", "Laterality", "PerformedProcedureStepStartTime",
        "PerformedProcedureStepID", "PerformedProcedureStepDescription", "RequestAttributesSequence",
        "OperatorsName", "PerformingPhysicianName", "FrameOfReferenceUID",
    ),
    "IMAGE": (
        "AcquisitionNumber", "AcquisitionTime", "AcquisitionDateTime", "ImagePositionPatient",
        "ImageOrientationPatient", "SliceLocation", "SliceThickness", "ImageComments", "SamplesPerPixel",
        "PhotometricInterpretation", "BitsAllocated", "BitsStored", "AvailableTransferSyntaxUID", "ContentLabel",
    ),
}  # fmt: skip
#: The level (its place in LEVEL_ORDER) of each attribute whose level is known.
_KEY_LEVEL = {
    keyword: LEVEL_ORDER.index(level)
    for level in LEVEL_ORDER
    for keyword in (*LEVEL_KEYS[level], *_MORE_KEYS.get(level, ()))
}


def keys_below(level: str, identifier: Dataset) -> frozenset[str]:
    """The keys of ``identifier`` whose attributes belong to a level below ``level``
    (an IMAGE attribute in a STUDY query): an entity at ``level`` has as many values
    of them as it has entities below, none of them its own. Only keys of the query's
    level and of the levels above are allowed (PS3.4 C.4.1.1.3.1, "the Key Attributes
    and values allowable for the level of the query"; C.4.1.2.1), with or without
    relational queries: one with a value is refused 0xA900 naming it (it was matched
    against one instance of the entity, taken at random); a zero-length one (or
    ``*``, equivalent to Universal Matching, C.2.2.2.4) is returned zero-length."""
    depth = LEVEL_ORDER.index(level)
    below: set[str] = set()
    for elem in identifier:
        at = _KEY_LEVEL.get(elem.keyword, 0)
        if at <= depth:
            continue
        if elem.VR != "SQ" and text_of(elem.value).strip(" \x00*\\"):
            comment = f"{elem.keyword} is of the {LEVEL_ORDER[at]} level, below {level}"[:64]
            raise StatusError(Status(0xA900, comment, attributes=[int(elem.tag)]))
        if elem.VR == "SQ" and any(len(item) for item in elem.value or ()):
            comment = f"{elem.keyword} is of the {LEVEL_ORDER[at]} level, below {level}"[:64]
            raise StatusError(Status(0xA900, comment, attributes=[int(elem.tag)]))
        below.add(elem.keyword)
    return frozenset(below)


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
        where_in(q, key, column, where, args, or_empty=key in required)

    exact("p.patient_id", "PatientID")
    prefix = name_prefix(q.get("PatientName")) if "PatientName" in q else ""
    if prefix:
        # The literal start of a name key narrows by index; the matcher decides the rest.
        where.append("(p.name_key >= ? AND p.name_key < ? OR p.name_key = '')")
        args.extend([prefix, prefix + "\U0010ffff"])
    # A parent's UID is compared in the child's own column (the same value by the join):
    # the child rows of one parent are then read in key order from its index.
    if depth >= 1:
        exact("se.study_uid" if depth >= 2 else "st.study_uid", "StudyInstanceUID")
        exact("st.accession", "AccessionNumber")
        if "StudyDate" in q:
            _study_dates(text_of(q.get("StudyDate")), where, args)
    if depth >= 2:
        exact("i.series_uid" if depth >= 3 else "se.series_uid", "SeriesInstanceUID")
        exact("se.modality", "Modality")
    if depth >= 3:
        exact("i.sop_uid", "SOPInstanceUID")
    return where, args


def _study_dates(key: str, where: list[str], args: list[Any]) -> None:
    """Narrow by a Study Date key on the indexed column, which holds each study's date
    as the matcher compares it: ``YYYYMMDD``, the first day of the stored value's
    period (:func:`~.date_ranges.index_date`; ``""`` for an unknown value, several
    values or one that is no date, always a candidate). Each key value, single or a
    range (PS3.4 C.2.2.2.1, C.2.2.2.5), is read as the matcher reads it - a year or a
    month as its days, ``YYYY.MM.DD`` as that day - so the SQL lets through exactly
    the studies the matcher may match. A key the matcher would not read adds nothing."""
    values = [v for v in (v.strip(" \x00") for v in key.split("\\")) if v]
    if not values or len(values) > MAX_IN:
        return
    clauses: list[str] = []
    mine: list[str] = []
    for value in values:
        bounds = parse_range(value, "DA")
        lo, hi = (value, value) if bounds is None else bounds
        lo_days = da_days(lo) if lo is not None else None
        hi_days = da_days(hi) if hi is not None else None
        if (lo is not None and lo_days is None) or (hi is not None and hi_days is None):
            return  # no date (refused 0xA900 before this; a caller of the index's own)
        first, last = lo_days[0] if lo_days else None, hi_days[1] if hi_days else None
        if first is None and last is None:
            return  # "-": any date
        if first == last:
            clauses.append("st.study_date = ?")
        else:
            clauses.append(" AND ".join(f"st.study_date {op} ?" for b, op in ((first, ">="), (last, "<=")) if b))
        mine.extend(b for b in dict.fromkeys((first, last)) if b is not None)
    where.append(f"({' OR '.join(f'({c})' for c in clauses)} OR st.study_date = '')")
    args.extend(mine)


#: Per level below PATIENT: the join and the columns it adds (attributes, then key or path).
_LEVEL_JOINS = (
    ("JOIN studies st ON st.patient_key = p.patient_key", "st.attrs", "st.study_uid"),
    ("JOIN series se ON se.study_uid = st.study_uid", "se.attrs", "se.series_uid"),
    ("JOIN instances i ON i.series_uid = se.series_uid", "i.attrs", "i.path"),
)


#: The unique key of the rows at each depth: the order of a paged query (its index).
_KEY_COLUMNS = ("p.patient_key", "st.study_uid", "se.series_uid", "i.sop_uid")


def _select(depth: int) -> str:
    """The SELECT of rows at ``depth`` joined with their parents (without WHERE); the
    last column is the row's key (:data:`_KEY_COLUMNS`)."""
    joins = ["patients p"]
    select = ["p.attrs", "p.patient_key"]
    for join, attrs, key in _LEVEL_JOINS[:depth]:
        joins.append(join)
        select += [attrs, key]
    if depth >= 3:
        select.append("i.size")  # (Instance Availability: the file at the size it was stored at)
    select.append(_KEY_COLUMNS[depth])
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


#: Candidate rows read by one statement of a paged query (their computed keys and
#: files in one statement each), at first and at most: the rows held at once.
_PAGE = 32
_MAX_PAGE = 512
#: ``want`` and ``seconds`` of a query run to its end at once (:meth:`QueryMixin.find`).
_ALL = 1 << 62
_NO_SLICE = float("inf")


def _marks(values: list[str]) -> str:
    return ",".join("?" * len(values))


class _PagedQuery:
    """One C-FIND read a page at a time (keyset pagination): the SQL of its candidates
    narrowed by :func:`_prefilter`, in the order of the query level's unique key
    (``ORDER BY key``, the key's index), and the last key taken; the next page is
    ``WHERE ... AND key > last ... LIMIT``. Each entity is seen once however the
    index changes meanwhile; one stored after its place was passed is not."""

    __slots__ = (
        "_args", "_piece", "_pieces", "_sql", "deadline", "depth", "ended", "from_file", "identifier", "last", "level", "matches", "page",
        "required",
    )  # fmt: skip

    def __init__(self, model: str, identifier: Dataset, relational: bool, deadline: float | None = None):
        with_default_repertoire(identifier)
        level = query_level(model, identifier, "Query")
        if not relational:
            check_hierarchy(model, level, identifier)
        below = keys_below(level, identifier)
        check_key_vrs(identifier, return_only=below)
        self.identifier = identifier
        self.level = level
        self.depth = LEVEL_ORDER.index(level)
        self.required = REQUIRED_KEYS[model][level]
        from .matching import DEFAULT_IGNORE, Matcher  # here: matching loads pydicom

        #: The identifier's keys parsed once for all the candidates (a long UID list a set);
        #: those of a lower level are return keys only (see keys_below).
        self.matches = Matcher(identifier, ignore=DEFAULT_IGNORE | below, unknown=self.required)
        indexed = set(INDEXED_UP_TO[level])
        #: Keys the index lacks, read from a file of each candidate.
        self.from_file = [
            elem.tag
            for elem in identifier
            if elem.tag.group not in (0x0000, 0x0002)
            and elem.keyword not in indexed
            and elem.keyword not in NOT_STORED
            and elem.keyword not in below
        ]
        self.deadline = deadline
        self.last: str | None = None
        self.ended = False
        self.page = _PAGE
        where, self._args = _prefilter(identifier, self.depth, self.required)
        if not relational and "PatientID" in HIERARCHY_ABOVE[model][level] and no_patient_id(identifier):
            where.append("p.patient_id = ''")  # the patients without an ID (see no_patient_id)
        self._sql = (_select(self.depth), where, _KEY_COLUMNS[self.depth])
        #: A list of more than MAX_IN values of the level's unique key (List of UID
        #: Matching, too long for one IN): its values in pieces of MAX_IN, read one
        #: piece after the other, each a page at a time in key order.
        self._pieces: list[list[str]] = []
        self._piece = 0
        values = exact_values(identifier.get(UNIQUE_KEYS[level])) if self.depth else None
        if values and len(values) > MAX_IN:
            self._pieces = in_pieces(values)

    def next_piece(self) -> None:
        """The rows of a piece (or of the query) were all read: on to the next piece, or the end."""
        if self._piece + 1 < len(self._pieces):
            self._piece += 1
            self.last = None  # pieces are disjoint: the next one is read from its start
        else:
            self.ended = True

    def sql(self) -> str:
        select, where, key = self._sql
        conditions = list(where)
        if self._pieces:
            conditions.append(in_clause(key, self._pieces[self._piece]))
        if self.last is not None:
            conditions.append(f"{key} > ?")
        clause = " WHERE " + " AND ".join(conditions) if conditions else ""
        return f"{select}{clause} ORDER BY {key} LIMIT {self.page}"

    def arguments(self) -> list[Any]:
        piece = self._pieces[self._piece] if self._pieces else []
        return [*self._args, *piece, *([self.last] if self.last is not None else [])]
