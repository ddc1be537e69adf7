"""The mapping between data sets and index rows (the tables are in ``migrations/``):
the attributes kept per level (PS3.4 C.6.1.1, C.6.2.1), the keys each model
requires, patient identity, and the SQL prefilters of a query."""

from __future__ import annotations

import functools
import json
import re
import warnings
from typing import TYPE_CHECKING, Any

from ..dimse import Status
from ..log import get_logger
from ..services.qr import MODELS, StatusError
from .date_ranges import key_problem

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.tag import BaseTag

log = get_logger()


class IndexingError(ValueError):
    """A stored file that cannot be indexed (its data set lacks the hierarchy's UIDs);
    ``tags``: the attributes at fault (a refused C-STORE's Offending Element)."""

    def __init__(self, message: str, tags: tuple[int, ...] = ()):
        super().__init__(message)
        self.tags = tags


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
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
LEVEL_ORDER = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: Index keys available for a query at each level (that level and those above it).
INDEXED_UP_TO = {
    level: frozenset(k for upper in LEVEL_ORDER[: i + 1] for k in LEVEL_KEYS[upper])
    for i, level in enumerate(("PATIENT", "STUDY", "SERIES", "IMAGE"))
}
#: Keys that are not attributes of the stored instances (PS3.4 C.3, C.4.1.1.3).
NOT_STORED = frozenset(
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
REQUIRED_KEYS: dict[str, dict[str, frozenset[str]]] = {
    "patient": {"PATIENT": frozenset({"PatientName"}), "STUDY": _STUDY_R, "SERIES": _SERIES_R, "IMAGE": _IMAGE_R},
    "study": {"STUDY": _STUDY_R | {"PatientName", "PatientID"}, "SERIES": _SERIES_R, "IMAGE": _IMAGE_R},
    "patient-study": {
        "PATIENT": frozenset({"PatientName"}),
        "STUDY": _STUDY_R,
    },
}
#: Unique keys that a hierarchical query must carry for every level
#: above its own (PS3.4 C.4.1.2.2; relational queries are not negotiated).
HIERARCHY_ABOVE = {
    "patient": {"PATIENT": (), "STUDY": ("PatientID",), "SERIES": ("PatientID", "StudyInstanceUID"),
                "IMAGE": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")},
    "study": {"STUDY": (), "SERIES": ("StudyInstanceUID",), "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID")},
    "patient-study": {"PATIENT": (), "STUDY": ("PatientID",)},
}  # fmt: skip
_ALL_KEYS = [k for level in LEVEL_ORDER for k in LEVEL_KEYS[level]]
_CHARSET = "SpecificCharacterSet"  # stored with each level's attributes, never matched
#: Tag and VR (PS3.6 Table 6-1) of each attribute kept, so that the index's tables need
#: no pydicom at import (a server listens before it loads pydicom); checked against
#: pydicom's dictionary by ``tests/test_serve_imports.py``.
KEPT_TAG_VR: dict[str, tuple[int, str]] = {
    "PatientName": (0x00100010, "PN"),
    "PatientID": (0x00100020, "LO"),
    "IssuerOfPatientID": (0x00100021, "LO"),
    "PatientBirthDate": (0x00100030, "DA"),
    "PatientBirthTime": (0x00100032, "TM"),
    "PatientSex": (0x00100040, "CS"),
    "OtherPatientIDs": (0x00101000, "LO"),
    "EthnicGroup": (0x00102160, "SH"),
    "PatientComments": (0x00104000, "LT"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "StudyDate": (0x00080020, "DA"),
    "StudyTime": (0x00080030, "TM"),
    "AccessionNumber": (0x00080050, "SH"),
    "StudyID": (0x00200010, "SH"),
    "ReferringPhysicianName": (0x00080090, "PN"),
    "StudyDescription": (0x00081030, "LO"),
    "PatientAge": (0x00101010, "AS"),
    "PatientSize": (0x00101020, "DS"),
    "PatientWeight": (0x00101030, "DS"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "Modality": (0x00080060, "CS"),
    "SeriesNumber": (0x00200011, "IS"),
    "SeriesDescription": (0x0008103E, "LO"),
    "SeriesDate": (0x00080021, "DA"),
    "SeriesTime": (0x00080031, "TM"),
    "BodyPartExamined": (0x00180015, "CS"),
    "PerformedProcedureStepStartDate": (0x00400244, "DA"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "SOPClassUID": (0x00080016, "UI"),
    "InstanceNumber": (0x00200013, "IS"),
    "ContentDate": (0x00080023, "DA"),
    "ContentTime": (0x00080033, "TM"),
    "AcquisitionDate": (0x00080022, "DA"),
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "NumberOfFrames": (0x00280008, "IS"),
    "ImageType": (0x00080008, "CS"),
}
_VR = {k: KEPT_TAG_VR[k][1] for k in _ALL_KEYS}

# Which information model allows which levels, and the root of its hierarchy.
_MODEL_LEVELS = {
    "patient": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    "study": ("STUDY", "SERIES", "IMAGE"),
    "patient-study": ("PATIENT", "STUDY"),
}
_MODEL_BY_UID = {uid: name for name, ops in MODELS.items() for uid in ops.values() if name in _MODEL_LEVELS}


def text_of(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):  # a key sent as UN (e.g. over 64 KiB in explicit VR)
        return bytes(value).decode("latin-1")
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


_CHARSET_TAG = 0x00080005


@functools.cache
def _level_tags() -> tuple[dict[str, tuple[tuple[str, BaseTag], ...]], BaseTag]:
    """(keyword, tag) of the attributes kept per level, looked up by tag (no keyword
    look-up per store), and Specific Character Set's tag: pydicom's tags, made at the
    first data set indexed."""
    from pydicom.tag import BaseTag

    tags = {level: tuple((k, BaseTag(KEPT_TAG_VR[k][0])) for k in keys) for level, keys in LEVEL_KEYS.items()}
    return tags, BaseTag(_CHARSET_TAG)


#: Every top-level element the index reads from a data set: the kept attributes, the
#: hierarchy's UIDs and the Specific Character Set their text needs (PS3.5 §6.1.2.5).
INDEX_TAGS = frozenset(
    {KEPT_TAG_VR[k][0] for keys in LEVEL_KEYS.values() for k in keys}
    | {_CHARSET_TAG, 0x00080016, 0x00080018, 0x0020000D, 0x0020000E}
)


def level_attrs(ds: Dataset, level: str) -> dict[str, str]:
    level_tags, charset_tag = _level_tags()
    attrs = {k: text_of(ds[tag].value) for k, tag in level_tags[level] if tag in ds}
    if charset_tag in ds:  # the values are kept decoded; remember which repertoire they need
        attrs[_CHARSET] = text_of(ds[charset_tag].value)
    return attrs


#: Multi-byte character sets used with code extensions only (PS3.3 Table C.12-4): never
#: the default repertoire, which value 1 of Specific Character Set names.
_EXTENSION_ONLY = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"})


def with_default_repertoire(ds: Dataset) -> Dataset:
    """``ds`` with a Specific Character Set whose first value is a multi-byte set used
    with code extensions only (``ISO 2022 IR 87`` alone, as some Japanese devices and
    queries send it) read as ``\\ISO 2022 IR 87``: the default repertoire first, the
    escape sequences switching to the set (PS3.3 C.12.1.1.2, PS3.5 6.1.2.5.3). pydicom
    cannot decode a Person Name otherwise whose alphabetic group is empty
    (``=山田^太郎``: an IndexError), so such an instance could not be indexed, nor such a
    key matched. Call before any value of ``ds`` is read."""
    elem = ds.get(_CHARSET_TAG)
    if elem is None:
        return ds
    values = [v.strip() for v in text_of(elem.value).split("\\")]
    if values[0] in _EXTENSION_ONLY:
        from pydicom.charset import convert_encodings

        ds.SpecificCharacterSet = ["", *values]
        if ds.original_character_set:  # read from bytes: pydicom decodes with what it read first
            implicit, little = ds.original_encoding
            ds.set_original_encoding(implicit, little, convert_encodings(["", *values]))
    return ds


def dataset_of_kept(kept: dict[int, tuple[bytes, bytes]], transfer_syntax: str) -> Dataset:
    """A data set of the raw top-level elements a structural check kept
    (:attr:`~dimse_async.dataset_check.DataSetSummary.kept`), decoded by pydicom on
    access exactly as a full read of the file would decode them (PS3.5 §7, §6.1.2.5)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import BaseTag

    implicit = transfer_syntax == "1.2.840.10008.1.2"
    little = transfer_syntax != "1.2.840.10008.1.2.2"
    ds = Dataset()
    for tag, (vr, value) in sorted(kept.items()):
        t = BaseTag(tag)
        ds[t] = RawDataElement(t, vr.decode("ascii") if vr else None, len(value), value, 0, implicit, little)  # type: ignore[assignment, unused-ignore]
    return with_default_repertoire(ds)


def dataset_from(*attr_maps: dict[str, str]) -> Dataset:
    """A candidate built from index rows, declaring a Specific Character Set that can
    encode its values: the rows' own when they agree, else UTF-8 (PS3.5 §6.1.2.5.3)."""
    from pydicom.dataset import Dataset

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
                try:
                    setattr(ds, key, _split(value))
                except ValueError:
                    _set_as_stored(ds, key, vr, value)
    return ds


def _set_as_stored(ds: Dataset, key: str, vr: str, value: str) -> None:
    """A value its VR does not allow (an IS of "1A", PS3.5 Table 6.2-1) that pydicom will
    not take as a value: set as the bytes of the text stored, which pydicom reads as text
    (as it read the file), so the instance is still matched and answered as it is held."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import BaseTag

    raw = value.encode("utf-8", "replace")
    raw += b" " * (len(raw) % 2)
    tag = BaseTag(KEPT_TAG_VR[key][0])
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)  # type: ignore[assignment, unused-ignore]


def _split(value: str) -> str | list[str]:
    return value.split("\\") if "\\" in value else value


def name_key(name: str) -> str:
    """What a PN key without ``=`` is matched against: the alphabetic group, upper case
    (PN matching is case-insensitive here, see :mod:`.matching`)."""
    return name.split("=", 1)[0].rstrip(" ^").upper()


def name_prefix(value: Any) -> str:
    """The literal prefix of a single-valued PN key, upper case; "" when none can be used."""
    from .value_matching import ideographic_or_phonetic  # (called by queries: pydicom is loaded)

    text = text_of(value).strip()
    if not text or "\\" in text or "=" in text or (not text.isascii() and ideographic_or_phonetic(text)):
        return ""  # (a key of ideographic or phonetic characters is matched against every group)
    for i, ch in enumerate(text):
        if ch in "*?":
            return text[:i].upper()
    return text.rstrip(" ^").upper()


def tag_of(keyword: str) -> int:
    """The tag of a standard attribute's keyword (``0xGGGGEEEE``)."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - the keywords used here are standard
        raise KeyError(keyword)
    return int(tag)


QUERY_RETRIEVE_LEVEL = 0x00080052


def query_level(model: str, identifier: Dataset, what: str) -> str:
    """The identifier's level, refused (0xA900, Offending Element (0008,0052): PS3.4
    C.4.1.1.4, C.4.2.1.5, C.4.3.1.4) when missing or not a level of the model."""
    elem = identifier.get(QUERY_RETRIEVE_LEVEL)
    if elem is not None and elem.VR not in ("CS", "UN"):
        comment = f"Query/Retrieve Level sent as {elem.VR}, not CS"
        raise StatusError(Status(0xA900, comment, attributes=[QUERY_RETRIEVE_LEVEL]))
    level = text_of(elem.value if elem is not None else None).strip().upper()
    if level not in _MODEL_LEVELS[model]:
        comment = f"{what} level {level[:20]!r} not valid for this model" if level else "Query/Retrieve Level missing"
        raise StatusError(Status(0xA900, comment[:64], attributes=[QUERY_RETRIEVE_LEVEL]))
    return level


#: Value representations by kind (PS3.5 Table 6.2-1): a key of one kind sent as the
#: other, or a sequence as a value or the reverse, names nothing that is stored.
_TEXT_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"]
)


def _vr_kind(vr: str) -> str:
    return "SQ" if vr == "SQ" else "text" if vr in _TEXT_VRS else "binary"


def check_key_vrs(identifier: Dataset, depth: int = 0, return_only: frozenset[str] = frozenset()) -> None:
    """Refuse (0xA900, the key as Offending Element: PS3.4 C.4.1.1.4, K.4.1.1.4) a key
    of a standard attribute sent with a VR of another kind than its own (PS3.6): a
    sequence for a value or a value for a sequence, binary for text or text for
    binary; and a DA, TM or DT key that is neither a value of its VR nor a range of
    them, the lower end not after the upper (C.2.2.2.1, C.2.2.2.5; a TM range crossing
    midnight is not supported). Such a key matches nothing stored, and answering
    Success with no matches would say that nothing is there. UN, another text VR than
    the dictionary's (LO for SH) and private or unknown attributes are taken as they
    are; sequence items are checked as the identifier is.

    Also refused: a sequence key of more than one item (C.2.2.2.6: "shall contain
    only a single Item"; no items, or one empty item, is Universal Matching; at any
    depth, :func:`_check_one_item`), and an
    IS, DS or AS key value that is not a value of its VR (PS3.5 Table 6.2-1; C.2.2.2.1:
    no wild cards in them), which would match nothing or, for a Required Key whose
    stored value is unknown, anything; and a UI key holding ``*`` or ``?`` (no wild
    cards in UI, C.2.2.2.4: it matched nothing). Keys in ``return_only`` (top level)
    are not matched and not checked for their values."""
    from pydicom.datadict import dictionary_VR

    if depth == 0:
        _check_one_item(identifier)
    for elem in identifier:
        tag = elem.tag
        if tag.group in (0x0000, 0x0002):
            continue
        if tag.is_private or elem.VR == "UN":
            continue
        try:
            own = dictionary_VR(tag)
        except KeyError:
            continue
        name = elem.keyword or f"({tag.group:04X},{tag.element:04X})"
        kinds = {_vr_kind(vr.strip()) for vr in own.split(" or ")}
        if own != "UN" and _vr_kind(elem.VR) not in kinds:
            raise StatusError(Status(0xA900, f"{name} sent as {elem.VR}, not {own}"[:64], attributes=[int(tag)]))
        if elem.keyword in return_only:
            continue
        if elem.VR in ("DA", "TM", "DT"):
            for value in text_of(elem.value).split("\\"):
                if (problem := key_problem(value, elem.VR)) is not None:
                    comment = f"{name} {value[:20]!r}: {problem}"[:64]
                    raise StatusError(Status(0xA900, comment, attributes=[int(tag)]))
        if elem.VR == "UI" and ("*" in (uids := text_of(elem.value)) or "?" in uids):
            bad = next(v for v in uids.split("\\") if "*" in v or "?" in v)
            comment = f"{name} {bad[:20]!r}: no wild cards in UI"[:64]
            raise StatusError(Status(0xA900, comment, attributes=[int(tag)]))
        if elem.VR in _NUMBER_STRINGS:
            for value in text_of(elem.value).split("\\"):
                if value.strip(" ") and _NUMBER_STRINGS[elem.VR].fullmatch(value.strip(" ")) is None:
                    comment = f"{name} {value[:20]!r}: not a value of VR {elem.VR}"[:64]
                    raise StatusError(Status(0xA900, comment, attributes=[int(tag)]))
        if elem.VR == "SQ" and depth < 8:
            for item in elem.value or ():
                check_key_vrs(item, depth + 1)


def _check_one_item(identifier: Dataset, depth: int = 0) -> None:
    """Refuse (0xA900) a sequence key of more than one item at any depth, private ones
    and return keys too (C.2.2.2.6): the matcher and the response look into every depth
    (one below those :func:`check_key_vrs` checks values to, or inside a private
    sequence, was a SequenceKeyError: 0xC000 and an error line). Received identifiers
    nest 64 deep at most (:mod:`~dimse_async.dataset_check`)."""
    for elem in identifier:
        if elem.VR != "SQ" or elem.value is None:
            continue
        if len(elem.value) > 1:
            tag = elem.tag
            name = elem.keyword or f"({tag.group:04X},{tag.element:04X})"
            comment = f"{name}: {len(elem.value)} items, a sequence key has one"[:64]
            raise StatusError(Status(0xA900, comment, attributes=[int(tag)]))
        if depth < 64:
            for item in elem.value:
                _check_one_item(item, depth + 1)


#: The numeric and age strings (PS3.5 Table 6.2-1): a key value of their VR that is none.
_NUMBER_STRINGS = {
    "IS": re.compile(r"[+-]?[0-9]+"),
    "DS": re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"),
    "AS": re.compile(r"[0-9]{3}[DWMY]"),
}


def relational_queries(sop_class_uid: str, info: bytes) -> bytes | None:
    """SOP class extended negotiation reply: relational queries are granted for the Q/R
    FIND classes (PS3.4 C.5.1.1.1), relational retrieval for the MOVE and GET classes
    (C.5.2.1.1, C.5.3.1.1), when asked for; the other options are declined."""
    model = _MODEL_BY_UID.get(sop_class_uid)
    if model is None or sop_class_uid not in (MODELS[model]["find"], MODELS[model]["move"], MODELS[model]["get"]):
        return None
    return b"\x01" if info[:1] == b"\x01" else b"\x00"


def check_hierarchy(model: str, level: str, identifier: Dataset, what: str = "query") -> None:
    """Refuse (0xA900, that key as Offending Element) a query (C.4.1.2.2.1) or retrieve
    (C.4.2.2.1, C.4.3.2.1) lacking the unique key of a level above its own, where no
    relational query or retrieval was negotiated. For a query a UID list is taken as List
    of UID Matching; wild cards are refused, and so is a UID without a value. A Patient
    ID present without a value names the patients whose Patient ID is empty (it is Type
    2, PS3.3 C.7.1.1: such a patient has no other unique key): see :func:`no_patient_id`."""
    for key in HIERARCHY_ABOVE[model][level]:
        values = exact_values(identifier.get(key)) if key in identifier else None
        if key == "PatientID" and no_patient_id(identifier):
            continue
        if not values or (len(values) != 1 and (key == "PatientID" or what == "retrieve")):
            comment = f"{level} {what} needs one {key} (no relational {_RELATIONAL[what]})"[:64]
            raise StatusError(Status(0xA900, comment, attributes=[tag_of(key)]))


_RELATIONAL = {"query": "queries", "retrieve": "retrieval"}


def no_patient_id(identifier: Dataset) -> bool:
    """Whether ``identifier`` holds a Patient ID key without a value (zero length, or
    only spaces). In a hierarchical query or retrieve below the PATIENT level of the
    Patient Root model it stands as the unique key of a patient without an ID (what a
    PATIENT level C-FIND answers for them), matching the entities whose Patient ID is
    empty or absent, so that they are found and retrieved like any other."""
    return "PatientID" in identifier and not text_of(identifier.get("PatientID")).strip(" \x00")


def add_from_file(candidate: Dataset, path: str, tags: list[Any]) -> None:
    """Copy the keys the index lacks from the stored instance into ``candidate``."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = with_default_repertoire(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags)))
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        log.warning("archive: cannot read stored instance for matching", path=path, error=str(exc)[:200])
        return
    for tag in tags:
        if tag in stored and tag not in candidate:
            candidate.add(stored[tag])


def model_name(model_uid: str) -> str:
    model = _MODEL_BY_UID.get(model_uid)
    if model is None:
        raise StatusError(Status(0x0122, "Information model not supported"))
    return model


#: Longer value lists are left to the matcher (a bound on SQL parameters, in every engine).
#: Values of a key narrowing a query in SQL with one ``IN`` list (more: see where_in).
MAX_IN = 1000


def where_in(
    identifier: Dataset,
    key: str,
    column: str,
    where: list[str],
    args: list[Any],
    *,
    or_empty: bool = False,
) -> None:
    """Add ``column IN (...)`` narrowing a C-FIND for a key with exact values (no
    wildcard, no range); ``or_empty`` also lets rows whose value is unknown (zero
    length) through. A list of more than :data:`MAX_IN` adds nothing: the matcher
    decides anyway."""
    values = exact_values(identifier.get(key)) if key in identifier else None
    if values and len(values) <= MAX_IN:
        clause = in_clause(column, values)
        where.append(f"({clause} OR {column} = '')" if or_empty else clause)
        args.extend(values)


def in_clause(column: str, values: list[str]) -> str:
    """``column = ?`` for one value (an index read in order stays in order; an IN list
    may not), else ``column IN (?, ...)``."""
    return f"{column} = ?" if len(values) == 1 else f"{column} IN ({','.join('?' * len(values))})"


def in_pieces(values: list[str]) -> list[list[str]]:
    """A list too long for one ``IN`` (List of UID Matching, PS3.4 C.2.2.2.2): its
    distinct values in order, in pieces of :data:`MAX_IN` (disjoint, each one look-up)."""
    listed = sorted(set(values))
    return [listed[i : i + MAX_IN] for i in range(0, len(listed), MAX_IN)]


def exact_values(value: Any) -> list[str] | None:
    """Values of a key usable for an SQL equality prefilter (no wildcard, no range)."""
    text = text_of(value).strip(" \x00")
    if not text or "*" in text or "?" in text:
        return None
    # Padding is not significant: spaces, and the NUL of a UID (PS3.5 9.1), e.g. of a
    # list over 64 KiB that came as UN and so kept it.
    return [v for v in (v.strip(" \x00") for v in text.split("\\")) if v]


def patient_key_of(patient: dict[str, str], study_uid: str) -> str:
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
