"""``serve`` as Modality Performed Procedure Step SCP (PS3.4 Annex F.7).

N-CREATE makes a step, which must start "IN PROGRESS" (F.7.2.1) and carry its Type 1
attributes (status, step ID, station AE title, start date and time, modality, the
Scheduled Step Attributes Sequence with an item naming its study: 0x0120 when absent,
0x0121 when empty, PS3.4 §5.4.2.1; a Performed Series item's Series Instance UID and an
image reference's UIDs likewise, in N-CREATE and N-SET); N-SET updates it
while it is in progress and may end it "COMPLETED" or "DISCONTINUED" (F.7.2.2). A
step that has ended may no longer be updated: 0x0110 with the standard's comment
and Error ID (0000,0903) 0xA710 (F.7.2.2.4). An N-SET for an instance never created: 0x0112. An
N-SET of an attribute Table F.7.2-1 marks "Not allowed" for N-SET (the patient, the
scheduled step, the station, the start, the step's ID, the modality) with another
value than the step has: 0x0105 No Such Attribute, nothing applied (the same value
sent again is tolerated). An N-SET that ends the step without the Final State
attributes (End Date, End Time, a Performed Series Sequence with an item; Table
F.7.2-1 and its Note 2): 0x0120 Missing Attribute or 0x0121 Missing Attribute Value
(PS3.4 §5.4.2.1), the step stays IN PROGRESS. Text is kept in UTF-8: each request is
decoded with its own Specific Character Set, so an N-SET in another character set
does not garble what the N-CREATE sent; a character set pydicom does not know is
0x0106, nothing kept (F.7.2.2.3). Steps are kept in
``mpps.sqlite`` beside the archive index; :meth:`MPPSStore.find` lists them (by
status, patient, study) - the small query API. Over the network, the Modality
Performed Procedure Step Retrieve SOP Class (F.8) reads one: N-GET by the step's SOP
Instance UID returns the attributes its Attribute Identifier List names (all of them
when it names none), a sequence whole; a step never created is 0x0112 (F.8.1); a
listed attribute the step does not have is left out, with Warning 0x0001 (F.8.2.1.4),
or 0x0107 naming it when it is no attribute at all (a command element, a group
length, a tag of no dictionary; PS3.7 §10.1.2.1.9).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..codec import decode_identifier, encode_dataset
from ..services.normalized import NCode, NRequest
from ..status import Status
from ..uids import ExplicitVRLittleEndian

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["MPPS", "MPPS_RETRIEVE", "MPPSStore", "mpps_create_dataset", "mpps_final_dataset"]

#: Modality Performed Procedure Step SOP Class (PS3.4 F.7.1).
MPPS = "1.2.840.10008.3.1.2.3.3"
#: Modality Performed Procedure Step Retrieve SOP Class (PS3.4 F.8): N-GET of a step.
MPPS_RETRIEVE = "1.2.840.10008.3.1.2.3.4"
#: Warning of an N-GET naming attributes the step does not have (PS3.4 Table F.8.2-2).
_OPTIONAL_NOT_SUPPORTED = 0x0001
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
_STATES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
#: Error Comment and Error ID (0000,0903) of an N-SET of a step that ended (F.7.2.2.4, Table F.7.2-2).
_ENDED_COMMENT = "Performed Procedure Step Object may no longer be updated"
_ENDED_ERROR_ID = 0xA710

#: Attributes Table F.7.2-1 marks "Not allowed" in N-SET: set at N-CREATE, fixed after
#: (the SCU creates a new step instead, F.7.2.2.3 Note).
_NOT_SETTABLE = (
    "SOPClassUID",
    "SOPInstanceUID",
    "ScheduledStepAttributesSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "ReferencedPatientSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "PerformedStationAETitle",
    "PerformedStationName",
    "PerformedLocation",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepID",
    "Modality",
    "StudyID",
)


@functools.cache
def _not_settable() -> frozenset[int]:
    """The tags of :data:`_NOT_SETTABLE` (pydicom's dictionary, loaded at the first N-SET)."""
    from pydicom.tag import Tag

    return frozenset(Tag(keyword) for keyword in _NOT_SETTABLE)


#: Type 1 for the N-CREATE (1/1 in Table F.7.2-1): the step's identity and start, and
#: the Scheduled Step Attributes Sequence (with an item: the study it belongs to).
_CREATE_REQUIRED = (
    "ScheduledStepAttributesSequence",
    "PerformedProcedureStepStatus",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "Modality",
)
#: Type 1 in the Final State (Table F.7.2-1): present, with a value, once the step is
#: COMPLETED or DISCONTINUED; the series sequence with an item (Note 2).
_FINAL_REQUIRED = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime", "PerformedSeriesSequence")
#: Type 1 in the items of these sequences, N-CREATE and N-SET alike (1/1 in Table
#: F.7.2-1): (sequence, item attributes); the image and non-image references of a
#: Performed Series item too. Protocol Name (1/1 in a Performed Series item) is not
#: enforced: nothing here depends on it, and a step is not refused for it.
_ITEM_REQUIRED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ScheduledStepAttributesSequence", ("StudyInstanceUID",)),
    ("PerformedSeriesSequence", ("SeriesInstanceUID",)),
)
_REFERENCE_SEQUENCES = ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence")
_REFERENCE_REQUIRED = ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mpps (
    sop_uid TEXT PRIMARY KEY, status TEXT NOT NULL, patient_id TEXT, study_uid TEXT, modality TEXT,
    station_ae TEXT, created REAL NOT NULL, updated REAL NOT NULL, attrs BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS mpps_status ON mpps(status);
CREATE INDEX IF NOT EXISTS mpps_patient ON mpps(patient_id);
CREATE TABLE IF NOT EXISTS mpps_studies (
    sop_uid TEXT NOT NULL REFERENCES mpps(sop_uid), study_uid TEXT NOT NULL, PRIMARY KEY (study_uid, sop_uid));
"""
#: ``PRAGMA user_version`` of ``mpps.sqlite``: 1 since ``mpps_studies`` lists every study of a step.
_SCHEMA_VERSION = 1


#: Attributes the SCP reads as one text value (its state and its listing's columns).
_TEXT_KEYWORDS = (
    "PerformedProcedureStepStatus",
    "PatientID",
    "Modality",
    "PerformedStationAETitle",
    "StudyInstanceUID",
)


def _malformed(ds: Dataset) -> tuple[int, str] | None:
    """The attribute (tag) for which an attribute list cannot be taken as it is, and
    why (the comment of 0x0106 Invalid Attribute Value, PS3.7 §10.1.5.1.6 /
    §10.1.3.1.9), or ``None``: a standard
    attribute that is a sequence where the dictionary says it is not, or the reverse,
    at any depth; or several values, a number or a sequence where the SCP reads one
    text value (:data:`_TEXT_KEYWORDS`). Such a list used to fail in the handler
    (0x0110 with a Python message) or be stored with a sequence's repr as its
    Patient ID."""
    from pydicom.datadict import dictionary_VR

    stack = [ds]
    while stack:
        current = stack.pop()
        for elem in current:
            if elem.tag.is_private:
                continue
            try:
                vr = dictionary_VR(elem.tag)
            except KeyError:
                continue
            if (vr == "SQ") != (elem.VR == "SQ"):
                return int(elem.tag), f"{elem.tag} must {'' if vr == 'SQ' else 'not '}be a sequence"
            if elem.VR == "SQ":
                stack.extend(item for item in elem.value)
        for keyword in _TEXT_KEYWORDS:
            value = current.get(keyword)
            if value is not None and not isinstance(value, str):
                return _tag(keyword), f"{keyword} is not one text value"
    return None


def _unknown_charset(ds: Dataset) -> str | None:
    """A term of ``ds``'s Specific Character Set pydicom cannot decode (it would fall
    back to Latin-1 and keep the names garbled), or ``None``. F.7.2.2.3: an SCP that
    cannot convert the text may return 0x0106 Invalid Attribute Value."""
    from pydicom.charset import python_encoding

    value = ds.get("SpecificCharacterSet")
    terms = [value] if isinstance(value, str) else list(value or [])
    for term in terms:
        text = str(term).strip()
        if text and text not in python_encoding and text.replace("-", "_").upper() not in python_encoding:
            return text
    return None


def _in_utf8(ds: Dataset) -> Dataset:
    """``ds`` with every text value decoded with its own Specific Character Set (at any
    depth) and the set made ISO_IR 192: steps are kept in one character set."""
    ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


#: SOP Class UID and SOP Instance UID: the step's identity, from the N-CREATE command.
_IDENTITY = (0x00080016, 0x00080018)


def _changes(ds: Dataset, elem: Any, uid: str) -> bool:
    """Whether N-SET element ``elem`` gives step ``uid`` (attributes ``ds``) another value
    (empty equals absent). Its SOP Class / Instance UID are MPPS and ``uid`` (the
    N-CREATE command's), also when its attribute list did not repeat them."""
    if int(elem.tag) in _IDENTITY:
        old: Any = MPPS if int(elem.tag) == _IDENTITY[0] else uid
    else:
        old = ds[elem.tag].value if elem.tag in ds else None
    return (old or None) != (elem.value or None)


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


def _missing(ds: Dataset, keywords: tuple[str, ...], what: str) -> Status | None:
    """0x0120 (absent) / 0x0121 (empty) naming the first of ``keywords`` ``ds`` lacks a
    value of (comment and Attribute Identifier List), or ``None`` (PS3.4 §5.4.2.1)."""
    for keyword in keywords:
        if keyword not in ds:
            return Status(NCode.MISSING_ATTRIBUTE, f"{keyword} is required {what}"[:64], [_tag(keyword)])
        if not ds[keyword].value:
            return Status(NCode.MISSING_ATTRIBUTE_VALUE, f"{keyword} needs a value {what}"[:64], [_tag(keyword)])
    return None


def _missing_in_items(ds: Dataset) -> Status | None:
    """0x0120 / 0x0121 naming the first Type 1 attribute of a sequence item (Table
    F.7.2-1: a scheduled step's Study Instance UID, a performed series' Series Instance
    UID, an image reference's SOP Class and Instance UIDs) that ``ds`` lacks a value of,
    or ``None``. A step without them could not be tied to its study or its series."""
    for sequence, keywords in _ITEM_REQUIRED:
        for number, item in enumerate(ds.get(sequence) or [], 1):
            missing = _missing(item, keywords, f"in item {number} of {_tags([_tag(sequence)])}")
            if missing is None and sequence == "PerformedSeriesSequence":
                for references in _REFERENCE_SEQUENCES:
                    where = f"in an item of {_tags([_tag(references)])}"
                    for ref in item.get(references) or []:
                        missing = missing or _missing(ref, _REFERENCE_REQUIRED, where)
            if missing is not None:
                return missing
    return None


def _invalid(ds: Dataset) -> Status | None:
    """0x0106 Invalid Attribute Value for a list :func:`_malformed` refuses or whose
    Specific Character Set is not known (F.7.2.2.3), naming the attribute; or ``None``."""
    bad = _malformed(ds)
    if bad is None:
        charset = _unknown_charset(ds)
        if charset is None:
            return None
        bad = _tag("SpecificCharacterSet"), f"Specific Character Set {charset!r} is not known"
    tag, why = bad
    return Status(NCode.INVALID_ATTRIBUTE_VALUE, why[:64], [tag])


def _study_uids(ds: Dataset) -> list[str]:
    """Every study a step belongs to, in order, once each: the Study Instance UID of each
    item of its Scheduled Step Attributes Sequence (PS3.4 Table F.7.2-1; a step performed
    for several requested procedures has an item for each, possibly of several studies)."""
    uids = [str(item.StudyInstanceUID) for item in ds.get("ScheduledStepAttributesSequence") or []
            if item.get("StudyInstanceUID")]  # fmt: skip
    return list(dict.fromkeys(uids)) or ([str(ds.StudyInstanceUID)] if ds.get("StudyInstanceUID") else [])


def _study_uid(ds: Dataset) -> str:
    uids = _study_uids(ds)
    return uids[0] if uids else ""


def mpps_create_dataset(
    patient_id: str, patient_name: str, study_uid: str, modality: str, procedure_step_id: str, station_ae: str
) -> Dataset:
    """An N-CREATE attribute list for an SCU (F.7.2.1.1, Table F.7.2-1): IN PROGRESS now,
    the Type 2 attributes present and empty. ``station_ae`` (Performed Station AE Title)
    is Type 1 and so required here (an SCP refuses an empty one, 0x0121)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = None
    ds.PatientSex = None
    ds.ReferencedPatientSequence = []
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.ReferencedStudySequence = []
    step.AccessionNumber = ""
    step.RequestedProcedureID = ""
    step.RequestedProcedureDescription = ""
    step.ScheduledProcedureStepID = ""
    step.ScheduledProcedureStepDescription = ""
    step.ScheduledProtocolCodeSequence = []
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedProcedureStepID = procedure_step_id
    ds.PerformedStationAETitle = station_ae
    ds.PerformedStationName = ""
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepDescription = ""
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.StudyID = ""
    ds.PerformedProtocolCodeSequence = []
    now = time.localtime()
    ds.PerformedProcedureStepStartDate = time.strftime("%Y%m%d", now)
    ds.PerformedProcedureStepStartTime = time.strftime("%H%M%S", now)
    ds.PerformedProcedureStepEndDate = None
    ds.PerformedProcedureStepEndTime = None
    ds.PerformedProcedureStepStatus = IN_PROGRESS
    ds.Modality = modality
    ds.PerformedSeriesSequence = []
    return ds


def mpps_final_dataset(
    status: str = COMPLETED,
    series_uids: list[str] | None = None,
    retrieve_ae: str = "",
    *,
    protocol_name: str = "UNSPECIFIED",
) -> Dataset:
    """An N-SET that ends a step (F.7.2.2.1) with the Final State attributes of Table
    F.7.2-1: End Date and Time now, a Performed Series Sequence item per series (one
    new series UID when none is given; Note 2: never empty), each with its Type 1
    Series Instance UID and Protocol Name (pass the protocol the series was acquired
    with) and its Type 2 attributes empty (add the image references)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    now = time.localtime()
    ds.PerformedProcedureStepEndDate = time.strftime("%Y%m%d", now)
    ds.PerformedProcedureStepEndTime = time.strftime("%H%M%S", now)
    items = []
    for uid in series_uids or [generate_uid()]:
        item = Dataset()
        item.SeriesInstanceUID = uid
        item.ProtocolName = protocol_name
        item.PerformingPhysicianName = ""
        item.OperatorsName = ""
        item.SeriesDescription = ""
        item.RetrieveAETitle = retrieve_ae
        item.ReferencedImageSequence = []
        item.ReferencedNonImageCompositeSOPInstanceSequence = []
        items.append(item)
    ds.PerformedSeriesSequence = items
    return ds


def _tags(tags: list[int]) -> str:
    """The first few ``tags`` as ``(gggg,eeee)``, for an error comment."""
    named = ", ".join(f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in tags[:3])
    return named + (f" and {len(tags) - 3} more" if len(tags) > 3 else "")


def _recognized(tag: int) -> bool:
    """Whether an N-GET may name ``tag``: a data set attribute of the dictionary (not a
    command or file meta element, nor a group length) or a private one."""
    from pydicom.datadict import dictionary_has_tag

    group, element = tag >> 16, tag & 0xFFFF
    if group <= 0x0002 or element == 0x0000:
        return False
    return bool(group & 1) or dictionary_has_tag(tag)


class MPPSStore:
    """Performed procedure steps in ``root/mpps.sqlite``, and the MPPS SCP handlers."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / "mpps.sqlite"
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        if self._db.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
            self._list_studies()
        self._lock = threading.Lock()  # sqlite calls run in worker threads
        self._steps = asyncio.Lock()  # one N-CREATE / N-SET at a time: the state rules hold

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def install(self, ae: Any) -> None:
        ae.on_n_create(self.on_n_create, sop_class=MPPS)
        ae.on_n_set(self.on_n_set, sop_class=MPPS)
        ae.on_n_get(self.on_n_get, sop_class=MPPS_RETRIEVE)

    # -- storage

    def _list_studies(self) -> None:
        """Fill ``mpps_studies`` for the steps kept before it existed (each step's first
        study only was kept, in ``mpps.study_uid``): once, when the file is opened."""
        with self._db:
            for uid, attrs in self._db.execute("SELECT sop_uid, attrs FROM mpps").fetchall():
                studies = _study_uids(decode_identifier(attrs, ExplicitVRLittleEndian))
                self._db.executemany(
                    "INSERT OR IGNORE INTO mpps_studies VALUES (?, ?)", [(uid, study) for study in studies]
                )
            self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _get(self, uid: str) -> tuple[str, Dataset] | None:
        with self._lock:
            row = self._db.execute("SELECT status, attrs FROM mpps WHERE sop_uid = ?", (uid,)).fetchone()
        return None if row is None else (row[0], decode_identifier(row[1], ExplicitVRLittleEndian))

    def _put(self, uid: str, ds: Dataset, *, new: bool) -> None:
        now = time.time()
        values = (
            str(ds.get("PerformedProcedureStepStatus") or ""),
            str(ds.get("PatientID") or ""),
            _study_uid(ds),
            str(ds.get("Modality") or ""),
            str(ds.get("PerformedStationAETitle") or ""),
            now,
            encode_dataset(ds, ExplicitVRLittleEndian),
        )
        with self._lock, self._db:
            if new:
                self._db.execute(
                    "INSERT INTO mpps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (uid, *values[:5], now, *values[5:])
                )
                # (The studies are fixed at creation: the scheduled steps are not N-SET, F.7.2-1.)
                self._db.executemany(
                    "INSERT OR IGNORE INTO mpps_studies VALUES (?, ?)", [(uid, study) for study in _study_uids(ds)]
                )
            else:
                self._db.execute(
                    "UPDATE mpps SET status=?, patient_id=?, study_uid=?, modality=?, station_ae=?, updated=?, attrs=? "
                    "WHERE sop_uid=?",
                    (*values, uid),
                )

    async def get(self, uid: str) -> Dataset | None:
        """The step's attributes, with its SOP Instance UID, or ``None``."""
        got = await asyncio.to_thread(self._get, uid)
        if got is None:
            return None
        got[1].SOPInstanceUID = uid
        got[1].SOPClassUID = MPPS
        return got[1]

    def _find(self, status: str | None, patient_id: str | None, study_uid: str | None) -> list[tuple[str, bytes]]:
        sql, args = "SELECT sop_uid, attrs FROM mpps WHERE 1=1", []
        for column, value in (("status", status), ("patient_id", patient_id)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        if study_uid is not None:  # any of the step's studies (mpps_studies), not only its first
            sql += " AND sop_uid IN (SELECT sop_uid FROM mpps_studies WHERE study_uid = ?)"
            args.append(study_uid)
        with self._lock:
            return self._db.execute(sql + " ORDER BY created", args).fetchall()

    async def find(
        self, *, status: str | None = None, patient_id: str | None = None, study_uid: str | None = None
    ) -> list[Dataset]:
        """Steps matching every criterion given, oldest first (each with its SOP Instance
        UID); ``study_uid`` finds a step by any study it names."""
        rows = await asyncio.to_thread(self._find, status, patient_id, study_uid)
        out = []
        for uid, attrs in rows:
            ds = decode_identifier(attrs, ExplicitVRLittleEndian)
            ds.SOPInstanceUID = uid
            ds.SOPClassUID = MPPS
            out.append(ds)
        return out

    # -- SCP

    async def on_n_create(self, request: NRequest) -> Any:
        """N-CREATE (F.7.2.1): a new step, IN PROGRESS."""
        ds = request.dataset
        uid = request.sop_instance_uid or ""
        if ds is None:
            return Status(NCode.MISSING_ATTRIBUTE, "N-CREATE without an attribute list")
        invalid = _invalid(ds)
        if invalid is not None:
            request.assoc.log.warning("MPPS N-CREATE refused", sop_instance=uid, error=invalid.error_comment)
            return invalid
        if "PerformedProcedureStepStatus" in ds and str(ds.PerformedProcedureStepStatus or "") != IN_PROGRESS:
            # F.7.2.1.3: a step is created "IN PROGRESS"; another value is an invalid value.
            return Status(
                NCode.INVALID_ATTRIBUTE_VALUE,
                f"Performed Procedure Step Status must be {IN_PROGRESS}",
                [_tag("PerformedProcedureStepStatus")],
            )
        missing = _missing(ds, _CREATE_REQUIRED, "in N-CREATE") or _missing_in_items(ds)
        if missing is not None:
            request.assoc.log.warning("MPPS N-CREATE refused", sop_instance=uid, error=missing.error_comment)
            return missing
        async with self._steps:
            if await asyncio.to_thread(self._get, uid) is not None:
                return Status(NCode.DUPLICATE_SOP_INSTANCE, "performed procedure step already exists")
            await asyncio.to_thread(self._put, uid, _in_utf8(ds), new=True)
        request.assoc.log.info("MPPS created", sop_instance=uid, patient_id=str(ds.get("PatientID") or ""))
        return None

    async def on_n_set(self, request: NRequest) -> Any:
        """N-SET (F.7.2.2): update a step in progress; COMPLETED / DISCONTINUED end it."""
        uid = request.sop_instance_uid or ""
        mods = request.dataset
        assert mods is not None  # the N-service layer answered 0x0120 otherwise
        invalid = _invalid(mods)
        if invalid is not None:
            request.assoc.log.warning("MPPS N-SET refused", sop_instance=uid, error=invalid.error_comment)
            return invalid
        async with self._steps:
            got = await asyncio.to_thread(self._get, uid)
            if got is None:
                return Status(NCode.NO_SUCH_SOP_INSTANCE, "no such performed procedure step")
            state, ds = got
            if state != IN_PROGRESS:
                # F.7.2.2.3: once COMPLETED or DISCONTINUED the step is final; the
                # comment and Error ID exactly as Table F.7.2-2 gives them.
                request.assoc.log.warning("MPPS N-SET refused: the step has ended", sop_instance=uid, status=state)
                return Status(NCode.PROCESSING_FAILURE, _ENDED_COMMENT, error_id=_ENDED_ERROR_ID)
            ds, mods = _in_utf8(ds), _in_utf8(mods)
            # A modality that sends such an attribute again with its value unchanged is
            # tolerated; a different value would change the step's identity.
            fixed = next((elem for elem in mods if elem.tag in _not_settable() and _changes(ds, elem, uid)), None)
            if fixed is not None:
                # Table F.7.2-1: "Not allowed" in N-SET; PS3.7 §10.1.3.1.9 0x0105.
                request.assoc.log.warning("MPPS N-SET refused", sop_instance=uid, attribute=str(fixed.tag))
                comment = f"{fixed.keyword or fixed.tag} may not be set by N-SET"[:64]
                return Status(NCode.NO_SUCH_ATTRIBUTE, comment, [int(fixed.tag)])
            # Present, it must be one of the three (3/1 in Table F.7.2-1: never empty).
            new_state = (
                str(mods.PerformedProcedureStepStatus or "") if "PerformedProcedureStepStatus" in mods else state
            )
            if new_state not in _STATES:
                comment = f"Performed Procedure Step Status {new_state!r}"[:64]
                return Status(NCode.INVALID_ATTRIBUTE_VALUE, comment, [_tag("PerformedProcedureStepStatus")])
            for elem in mods:
                if int(elem.tag) not in _IDENTITY:  # (the same as the step's, checked above)
                    ds[elem.tag] = elem  # (Specific Character Set too: both are ISO_IR 192 now)
            missing = _missing_in_items(mods)
            if missing is None and new_state != IN_PROGRESS:
                missing = _missing(ds, _FINAL_REQUIRED, "to end the step")
            if missing is not None:
                request.assoc.log.warning("MPPS N-SET refused", sop_instance=uid, error=missing.error_comment)
                return missing
            await asyncio.to_thread(self._put, uid, ds, new=False)
        request.assoc.log.info("MPPS updated", sop_instance=uid, status=new_state)
        return None

    async def on_n_get(self, request: NRequest) -> Any:
        """N-GET of the Retrieve SOP Class (F.8.2.1): the step's attributes the Attribute
        Identifier List names (every one when it names none), in UTF-8."""
        from pydicom.dataset import Dataset

        uid = request.sop_instance_uid or ""
        step = await self.get(uid)
        if step is None:
            return Status(NCode.NO_SUCH_SOP_INSTANCE, "no such performed procedure step")  # F.8.1
        wanted = request.attribute_identifier_list
        if not wanted:
            reply = step
            missing: list[int] = []
        else:
            reply = Dataset()
            missing = []
            for tag in dict.fromkeys(wanted):
                if tag in step:
                    reply.add(step[tag])
                elif tag != _tag("SpecificCharacterSet"):
                    missing.append(tag)
        reply.SpecificCharacterSet = "ISO_IR 192"  # 1C: the step is kept in UTF-8
        unknown = [tag for tag in missing if not _recognized(tag)]
        if unknown:
            # PS3.7 §10.1.2.1.9: 0x0107 Attribute List Error, "the specified Attribute was
            # not recognized"; the values that could be read are returned.
            return Status(NCode.ATTRIBUTE_LIST_ERROR, f"not recognized: {_tags(unknown)}"[:64], unknown), reply
        if missing:
            # F.8.2.1.2: the SCU may ask for attributes not maintained; Table F.8.2-2.
            return Status(_OPTIONAL_NOT_SUPPORTED, f"not maintained: {_tags(missing)}"[:64]), reply
        return reply
