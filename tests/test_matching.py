"""C-FIND attribute matching (PS3.4 §C.2.2.2) and worklist matching (PS3.4 Annex K).

Examples follow the standard where it gives them: the combined date-time note of
§C.2.2.2.5 (Study Date "20060705-20060707", Study Time "1000-1800"), the Modalities
in Study "CT\\PT" note of §C.2.2.2.8, the wild card rules of §C.2.2.2.4 and the
unknown-value rule of §K.2.2.1.1.1.
"""

from __future__ import annotations

import datetime
import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from dimse_async.archive.matching import (
    WILDCARD_VRS,
    Matcher,
    SequenceKeyError,
    is_universal,
    match_value,
    matches,
    parse_range,
    response_identifier,
)

# ---------------------------------------------------------------------------
# Universal Matching (§C.2.2.2.3)


@pytest.mark.parametrize(
    "value", [None, "", "   ", "\x00", [], MultiValue(str, []), b"", Sequence(), Sequence([Dataset()])]
)
def test_is_universal_zero_length(value: object) -> None:
    assert is_universal(value)


@pytest.mark.parametrize("value", ["*", "CT", 0, ["CT"], b"\x00\x01"])
def test_is_universal_non_empty(value: object) -> None:
    assert not is_universal(value)


def test_is_universal_sequence_with_keys() -> None:
    item = Dataset()
    item.Modality = ""
    assert not is_universal(Sequence([item]))  # has an Item Key Attribute, even if universal itself
    assert is_universal(DataElement(0x00100010, "PN", ""))


@pytest.mark.parametrize("vr", ["PN", "LO", "CS", "DA", "TM", "DT", "UI", "IS", "DS", "US", "SQ"])
@pytest.mark.parametrize("stored", [None, "", "anything"])
def test_universal_key_matches_everything(vr: str, stored: str | None) -> None:
    assert match_value("", stored, vr)
    assert match_value(None, stored, vr)


# ---------------------------------------------------------------------------
# Single Value Matching (§C.2.2.2.1)


def test_single_value_exact_and_case_sensitive() -> None:
    assert match_value("CT", "CT", "CS")
    assert not match_value("CT", "MR", "CS")
    assert match_value("ABC123", "ABC123", "LO")
    assert not match_value("abc123", "ABC123", "LO")  # case-sensitive except PN
    assert not match_value("ABC", "ABC123", "LO")  # not a prefix match


def test_padding_not_significant() -> None:
    assert match_value("CT ", "CT", "CS")
    assert match_value(" CT", "CT  ", "CS")  # CS: leading and trailing spaces are padding
    assert match_value("1.2.3", "1.2.3\x00", "UI")  # UI is padded with NUL
    assert match_value("Smith^John ", "Smith^John", "PN")
    assert not match_value(" text", "text", "ST")  # leading spaces are significant in ST


def test_pn_case_insensitive_by_default() -> None:
    assert match_value("smith^john", "SMITH^JOHN", "PN")
    assert match_value(PersonName("Smith^John"), PersonName("SMITH^JOHN"), "PN")
    assert not match_value("smith^john", "SMITH^JOHN", "PN", pn_case_insensitive=False)
    assert match_value("Smith^John", "Smith^John", "PN", pn_case_insensitive=False)


def test_pn_components_and_groups() -> None:
    assert match_value("Smith^John", "Smith^John^^^", "PN")  # empty trailing components
    assert not match_value("Smith^John", "Smith^Jane", "PN")
    stored = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert match_value("Yamada^Tarou", stored, "PN")  # alphabetic group only
    assert match_value("=山田^太郎", stored, "PN")  # empty key group is universal
    assert match_value("Yamada^Tarou=山田^太郎", stored, "PN")
    assert not match_value("=山田^花子", stored, "PN")


def test_numeric_single_value() -> None:
    assert match_value("5", 5, "IS")
    assert match_value("+5", "5", "IS")
    assert match_value("1.5", "1.50", "DS")
    assert match_value(512, 512, "US")
    assert not match_value(512, 256, "US")
    assert match_value(0x00100010, "(0010,0010)", "AT")
    assert match_value("1*", "1*", "IS")  # no wild cards for IS: compared literally
    assert not match_value("1*", "12", "IS")


def test_single_value_date_and_time() -> None:
    assert match_value("20060705", "20060705", "DA")
    assert not match_value("20060705", "20060706", "DA")
    assert match_value("2006.07.05", "20060705", "DA")  # ACR-NEMA form
    assert match_value("1015", "101530.25", "TM")  # a minute-precision key denotes the whole minute
    assert match_value("10:15:30", "101530", "TM")
    assert not match_value("1016", "101530", "TM")


# ---------------------------------------------------------------------------
# List of UID Matching (§C.2.2.2.2)


def test_list_of_uid_matching() -> None:
    assert match_value("1.2.3\\1.2.4", "1.2.4", "UI")
    assert match_value(MultiValue(str, ["1.2.3", "1.2.4"]), "1.2.3", "UI")
    assert not match_value("1.2.3\\1.2.4", "1.2.5", "UI")
    assert not match_value("1.2.*", "1.2.3", "UI")  # no wild cards in UI


def test_list_of_uid_in_dataset() -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ["1.2.3", "1.2.4"]
    hit, miss = Dataset(), Dataset()
    hit.StudyInstanceUID = "1.2.4"
    miss.StudyInstanceUID = "1.2.5"
    assert matches(query, hit)
    assert not matches(query, miss)


# ---------------------------------------------------------------------------
# Wild Card Matching (§C.2.2.2.4)


@pytest.mark.parametrize(
    ("key", "stored", "expected"),
    [
        ("Smi*", "Smith", True),
        ("Smi*", "Smith^John", True),  # "*" matches any sequence of characters
        ("Smi*", "Smi", True),  # including a zero length value
        ("Smi*", "Jones", False),
        ("?mith", "Smith", True),
        ("?mith", "mith", False),  # "?" matches exactly one character
        ("?mith", "Ssmith", False),
        ("*mit?", "Smith", True),
        ("S*h^J*", "Smith^John", True),
        ("Smith^John^*", "Smith^John", True),
        ("*", "anything", True),
        ("Sm*th", "Smth", True),  # as many literal characters as the value: still matched
        ("Sm?*th", "Smth", False),  # one more than the value has
        ("S?i*h", "Sih", False),
        ("****", "", True),
    ],
)
def test_wildcard_pn(key: str, stored: str, expected: bool) -> None:
    assert match_value(key, stored, "PN") is expected


def test_wildcard_case_sensitivity() -> None:
    assert match_value("smi*", "SMITH", "PN")  # PN: case-insensitive
    assert not match_value("smi*", "SMITH", "PN", pn_case_insensitive=False)
    assert not match_value("ct*", "CT_HEAD", "LO")  # other VRs: case-sensitive
    assert match_value("CT*", "CT_HEAD", "LO")


_HOSTILE_WILDCARDS = ["*" * 5000 + "X", "*?" * 3000 + "X", "?*" * 40 + "Q", ("*a" * 200 + "*") * 2 + "b"]


def test_hostile_wild_card_keys_match_in_bounded_time() -> None:
    """A key of many wild cards against a short value is answered at once (a regular
    expression built from it backtracked for ever, holding the GIL: the event loop of
    ``serve`` stopped). Run in a child process so a regression fails instead of hanging."""
    import subprocess
    import sys

    code = (
        "import sys, time; from dimse_async.archive.matching import match_value; t = time.monotonic()\n"
        f"for key in {_HOSTILE_WILDCARDS!r}:\n"
        "    for vr in ('PN', 'LO'):\n"
        "        assert not match_value(key, 'CompressedSamples^CT1' + 'a' * 300, vr), key[:20]\n"
        "print(time.monotonic() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 2.0, done.stdout


STANDARD_WILDCARD_VRS = ["AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"]  # §C.2.2.2.4


def test_wildcard_vr_list() -> None:
    assert sorted(WILDCARD_VRS) == STANDARD_WILDCARD_VRS


@pytest.mark.parametrize("vr", STANDARD_WILDCARD_VRS)
def test_wildcard_vrs(vr: str) -> None:
    assert match_value("AB*", "ABCD", vr)
    assert match_value("A?CD", "ABCD", vr)
    assert not match_value("A?D", "ABCD", vr)


@pytest.mark.parametrize(
    ("vr", "value"), [("DA", "20200101"), ("TM", "101500"), ("DT", "20200101101500"), ("UI", "1.2.3")]
)
def test_no_wildcards_for_dates_times_uids(vr: str, value: str) -> None:
    assert not match_value("*", value, vr)
    assert not match_value(value[:-1] + "?", value, vr)


def test_regex_metacharacters_are_literal() -> None:
    assert match_value("a.b*", "a.bc", "LO")
    assert not match_value("a.b*", "axbc", "LO")
    assert match_value("(x)+[y]*", "(x)+[y]z", "LO")


def test_backslash_is_literal_in_text_vrs() -> None:
    assert match_value("C:\\dir*", "C:\\dir\\file", "ST")  # ST has VM 1: not split
    assert not match_value("dir", "C:\\dir", "ST")


# ---------------------------------------------------------------------------
# Range Matching (§C.2.2.2.5)


def test_parse_range() -> None:
    assert parse_range("20060705-20060707") == ("20060705", "20060707")
    assert parse_range("20200101-") == ("20200101", None)
    assert parse_range("-20201231") == (None, "20201231")
    assert parse_range("0800-1200") == ("0800", "1200")
    assert parse_range(" 0800 - 1200 ") == ("0800", "1200")
    assert parse_range("-") == (None, None)
    assert parse_range("20200101") is None
    # DT: "-" may also be the sign of an offset from UTC
    assert parse_range("20200101120000-0500", "DT") is None
    assert parse_range("20200101120000-0500", "TM") == ("20200101120000", "0500")
    assert parse_range("20200101-0500-20200102-0500", "DT") == ("20200101-0500", "20200102-0500")
    assert parse_range("20200101120000-0500-", "DT") == ("20200101120000-0500", None)
    assert parse_range("-20200101120000-0500", "DT") == (None, "20200101120000-0500")
    assert parse_range("2019-2020", "DT") == ("2019", "2020")
    assert parse_range("20200101-20200102", "DT") == ("20200101", "20200102")


@pytest.mark.parametrize(
    ("key", "stored", "expected"),
    [
        ("20060705-20060707", "20060705", True),  # inclusive
        ("20060705-20060707", "20060706", True),
        ("20060705-20060707", "20060707", True),
        ("20060705-20060707", "20060708", False),
        ("20060705-20060707", "20060704", False),
        ("20200101-", "20200101", True),  # "<date1> -": date1 and subsequent dates
        ("20200101-", "20991231", True),
        ("20200101-", "20191231", False),
        ("-20201231", "20201231", True),  # "- <date1>": prior to and including date1
        ("-20201231", "19000101", True),
        ("-20201231", "20210101", False),
        ("20060707-20060705", "20060706", False),  # date1 > date2 matches nothing
        ("2006-", "20060101", True),  # reduced precision (tolerated in keys)
        ("-200606", "20060630", True),
        ("-200606", "20060701", False),
        ("20200101-", "", False),  # unknown value never matches a range
        ("garbage-", "20200101", False),
    ],
)
def test_date_range(key: str, stored: str, expected: bool) -> None:
    assert match_value(key, stored, "DA") is expected


@pytest.mark.parametrize(
    ("key", "stored", "expected"),
    [
        ("1000-1800", "1000", True),  # §C.2.2.2.5 note: Study Time "1000-1800"
        ("1000-1800", "143000", True),
        ("1000-1800", "0959", False),
        ("1000-1800", "180059.999999", True),  # "1800" as upper bound includes the whole minute
        ("1000-1800", "1801", False),
        ("1000-1030", "1015", True),
        ("0800-1200", "12", True),
        ("0800-", "235959", True),
        ("0800-", "075959.999999", False),
        ("-1200", "000000", True),  # "prior" starts at midnight of the same day
        ("-1200", "120100", False),
        ("101500.5-101500.7", "101500.6", True),  # fractional seconds
        ("101500.5-101500.7", "101500.45", False),
        ("101500.5-101500.7", "101500.799999", True),
        ("10-11", "115959", True),  # hour precision
        ("10:00-10:30", "102000", True),  # ACR-NEMA form
        ("2300-0100", "2330", False),  # crossing midnight is not supported
    ],
)
def test_time_range(key: str, stored: str, expected: bool) -> None:
    assert match_value(key, stored, "TM") is expected


@pytest.mark.parametrize(
    ("key", "stored", "expected"),
    [
        ("20060705100000-20060707180000", "20060706", True),
        ("20060705100000-20060707180000", "20060705095959", False),
        ("20060705100000-20060707180000", "20060707180000.5", True),  # within the upper second
        ("20060705100000-20060707180000", "20060707180001", False),
        ("200607051000-200607071800", "20060707180059.5", True),  # within the upper minute
        ("2020-", "20200101000000", True),
        ("-2020", "20201231235959.999999", True),
        ("-2020", "2021", False),
        ("202001-202002", "20200229", True),  # month precision: end of February (leap year)
        # offsets are taken into account when both sides carry one
        ("20200101103000+0000-20200101113000+0000", "20200101120000+0100", True),
        ("20200101103000+0000-20200101113000+0000", "20200101120000+0000", False),
        # the DT "-" sign of an offset is not a range separator
        ("20200101120000-0500", "20200101170000+0000", True),
        # naive comparison when one side has no offset
        ("20200101103000-20200101113000", "20200101110000+0900", True),
    ],
)
def test_datetime_range(key: str, stored: str, expected: bool) -> None:
    assert match_value(key, stored, "DT") is expected


def test_several_ranges_in_one_key() -> None:
    assert match_value("20200101-20200105\\20200201", "20200201", "DA")
    assert match_value(MultiValue(str, ["-19991231", "20200101-"]), "20210101", "DA")
    assert not match_value("-19991231\\20200101-", "20100101", "DA")


# ---------------------------------------------------------------------------
# Multiple values (§C.2.2.3, §C.2.2.2.8)


def test_multi_valued_stored_value() -> None:
    assert match_value("PT", "CT\\PT", "CS")
    assert match_value("PT", MultiValue(str, ["CT", "PT"]), "CS")
    assert match_value("P?", ["CT", "PT"], "CS")
    assert not match_value("MR", ["CT", "PT"], "CS")
    assert match_value("ORIGINAL", ["ORIGINAL", "PRIMARY", "AXIAL"], "CS")
    assert match_value("smith*", "Jones^Ann\\Smith^Bob", "PN")


def test_multi_valued_key_is_or_without_extended_negotiation() -> None:
    # §C.2.2.2.8 note 1: with Multiple Value Matching negotiated, "CT\\PT" would need both;
    # without it the semantics are undefined and this module matches either.
    assert match_value("CT\\PT", ["CT", "MR"], "CS")
    assert match_value("CT\\PT", "PT", "CS")
    assert not match_value("CT\\PT", ["MR", "US"], "CS")


# ---------------------------------------------------------------------------
# Unknown (zero-length or absent) stored values (§K.2.2.1.1.1)


def test_unknown_stored_value() -> None:
    for stored in (None, "", "  ", MultiValue(str, [])):
        assert not match_value("CT", stored, "CS")
        assert not match_value("Smi*", stored, "PN")
        assert not match_value("20200101-", stored, "DA")
        assert not match_value("1.2.3", stored, "UI")
        assert match_value("*", stored, "CS")  # note 1: a single wild card returns such entities
        assert match_value("", stored, "CS")


# ---------------------------------------------------------------------------
# Whole identifiers


def _patient(name: str, pid: str, birth: str, sex: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = birth
    if sex is not None:
        ds.PatientSex = sex
    return ds


def test_matches_identifier() -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.SpecificCharacterSet = "ISO_IR 192"  # never matched
    query.PatientName = "smi*"
    query.PatientID = ""
    query.PatientBirthDate = "19700101-19801231"
    assert matches(query, _patient("SMITH^JOHN", "1", "19750601"))
    assert not matches(query, _patient("JONES^ANN", "2", "19750601"))
    assert not matches(query, _patient("SMITH^JOHN", "3", "19690601"))


def test_candidate_missing_attributes() -> None:
    query = Dataset()
    query.PatientName = "Smith^John"
    query.PatientSex = ""  # universal: absence is fine
    query.OtherPatientIDs = "*"  # pure wild card: absence is fine
    candidate = _patient("Smith^John", "1", "19750601")
    assert matches(query, candidate)
    query.PatientSex = "M"  # non-universal key the candidate lacks
    assert not matches(query, candidate)


def test_matches_ignores_meta_and_ignored_keys() -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.add(DataElement(0x00020010, "UI", "1.2.840.10008.1.2.1"))  # group 0x0002 is not a key
    query.StudyDate = "20200101"
    candidate = Dataset()
    candidate.StudyDate = "20200101"
    candidate.QueryRetrieveLevel = "SERIES"
    assert matches(query, candidate)
    query.AccessionNumber = "A1"
    assert not matches(query, candidate)
    assert matches(query, candidate, ignore=frozenset({"QueryRetrieveLevel", "AccessionNumber"}))


def test_matches_pn_option() -> None:
    query = Dataset()
    query.PatientName = "smith"
    candidate = _patient("SMITH", "1", "")
    assert matches(query, candidate)
    assert not matches(query, candidate, pn_case_insensitive=False)


def test_combined_study_date_and_time() -> None:
    # §C.2.2.2.5: without Extended Negotiation, date and time are matched independently.
    query = Dataset()
    query.StudyDate = "20060705-20060707"
    query.StudyTime = "1000-1800"
    study = Dataset()
    study.StudyDate = "20060706"
    study.StudyTime = "0900"  # inside the date range, outside the time range
    assert not matches(query, study)
    study.StudyTime = "1200"
    assert matches(query, study)


# ---------------------------------------------------------------------------
# Sequence Matching (§C.2.2.2.6) with the Modality Worklist (Annex K)


def _sps(modality: str, aet: str, date: str, time: str = "0900") -> Dataset:
    item = Dataset()
    item.Modality = modality
    item.ScheduledStationAETitle = aet
    item.ScheduledProcedureStepStartDate = date
    item.ScheduledProcedureStepStartTime = time
    item.ScheduledProcedureStepDescription = f"{modality} exam"
    return item


def _worklist_entry(name: str, *steps: Dataset) -> Dataset:
    ds = Dataset()
    ds.PatientName = name
    ds.PatientID = name.upper()[:4]
    ds.AccessionNumber = "ACC" + name[:2].upper()
    ds.ScheduledProcedureStepSequence = list(steps)
    return ds


def _worklist_query(**keys: str) -> Dataset:
    item = Dataset()
    item.Modality = keys.get("modality", "")
    item.ScheduledStationAETitle = keys.get("aet", "")
    item.ScheduledProcedureStepStartDate = keys.get("date", "")
    item.ScheduledProcedureStepStartTime = ""
    query = Dataset()
    query.PatientName = ""
    query.PatientID = ""
    query.ScheduledProcedureStepSequence = [item]
    return query


def test_worklist_sequence_matching() -> None:
    entry = _worklist_entry("Doe^Jane", _sps("CT", "CT_SCANNER", "20240115"), _sps("MR", "MR_SCANNER", "20240117"))
    assert matches(_worklist_query(modality="MR", aet="MR_SCANNER", date="20240116-20240118"), entry)
    assert matches(_worklist_query(modality="CT", date="20240115"), entry)
    assert matches(_worklist_query(aet="*_SCANNER"), entry)
    assert matches(_worklist_query(date="-20240115"), entry)
    assert not matches(_worklist_query(modality="US"), entry)
    assert not matches(_worklist_query(date="20240118-"), entry)
    # all Item Key Attributes must match in one and the same item
    assert not matches(_worklist_query(modality="CT", aet="MR_SCANNER"), entry)
    assert not matches(_worklist_query(modality="MR", date="20240115"), entry)


def test_sequence_universal_item() -> None:
    query = Dataset()
    query.ScheduledProcedureStepSequence = [Dataset()]  # zero-length item: universal
    query.ReferencedStudySequence = []  # no item at all: universal too
    assert matches(query, Dataset())
    assert matches(query, _worklist_entry("Doe^Jane", _sps("CT", "A", "20240115")))


def test_sequence_absent_or_empty_in_candidate() -> None:
    candidate = _worklist_entry("Doe^Jane")  # empty ScheduledProcedureStepSequence
    assert matches(_worklist_query(), candidate)  # only universal item keys: a return-key request
    assert not matches(_worklist_query(modality="CT"), candidate)
    del candidate.ScheduledProcedureStepSequence
    assert matches(_worklist_query(), candidate)
    assert not matches(_worklist_query(modality="CT"), candidate)


def test_nested_sequence_matching() -> None:
    code = Dataset()
    code.CodeValue = "P1"
    code.CodingSchemeDesignator = "99LOCAL"
    step = _sps("CT", "A", "20240115")
    step.ScheduledProtocolCodeSequence = [code]
    entry = _worklist_entry("Doe^Jane", step)
    key_code = Dataset()
    key_code.CodeValue = "P1"
    key_item = Dataset()
    key_item.ScheduledProtocolCodeSequence = [key_code]
    query = Dataset()
    query.ScheduledProcedureStepSequence = [key_item]
    assert matches(query, entry)
    key_code.CodeValue = "P2"
    assert not matches(query, entry)


def test_match_value_sq() -> None:
    item = Dataset()
    item.Modality = "MR"
    stored = Sequence([_sps("CT", "A", "20240115"), _sps("MR", "B", "20240116")])
    assert match_value(Sequence([item]), stored, "SQ")
    item.Modality = "US"
    assert not match_value(Sequence([item]), stored, "SQ")


def _two_items(*modalities: str) -> Sequence:
    items = []
    for modality in modalities:
        item = Dataset()
        item.Modality = modality
        items.append(item)
    return Sequence(items)


def test_a_sequence_key_of_several_items_is_no_key() -> None:
    """PS3.4 §C.2.2.2.6: a key sequence "shall contain only a single Item". One of two
    items was taken as two alternatives (any item matching matched); the helpers now
    refuse it whatever the candidate, as the C-FIND SCPs do (0xA900), at any depth and
    for two empty items too."""
    entry = _worklist_entry("Doe^Jane", _sps("CT", "A", "20240115"))
    query = Dataset()
    query.ScheduledProcedureStepSequence = _two_items("MR", "CT")
    with pytest.raises(SequenceKeyError, match="ScheduledProcedureStepSequence: 2 items"):
        matches(query, entry)
    with pytest.raises(SequenceKeyError):
        Matcher(query)  # before any candidate
    with pytest.raises(SequenceKeyError):
        response_identifier(query, entry)
    with pytest.raises(SequenceKeyError):
        match_value(query["ScheduledProcedureStepSequence"], entry.ScheduledProcedureStepSequence, "SQ")
    with pytest.raises(SequenceKeyError):
        match_value(_two_items("MR", "US"), Sequence(), "SQ")
    query.ScheduledProcedureStepSequence = Sequence([Dataset(), Dataset()])
    with pytest.raises(SequenceKeyError):
        matches(query, entry)
    nested = Dataset()
    nested.ScheduledProtocolCodeSequence = Sequence([Dataset(), Dataset()])
    query.ScheduledProcedureStepSequence = Sequence([nested])
    with pytest.raises(SequenceKeyError, match="ScheduledProtocolCodeSequence"):
        Matcher(query)
    with pytest.raises(SequenceKeyError, match="ScheduledProtocolCodeSequence"):
        response_identifier(query, Dataset())
    assert isinstance(SequenceKeyError("X", 2), ValueError)


# ---------------------------------------------------------------------------
# Response identifiers


def test_response_identifier() -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.SpecificCharacterSet = "ISO_IR 192"
    query.PatientName = "Smi*"
    query.PatientID = ""
    query.PatientSex = ""
    candidate = _patient("Smith^John", "12345", "19750601")
    candidate.OtherPatientIDs = "X"
    rsp = response_identifier(query, candidate)
    assert rsp.QueryRetrieveLevel == "PATIENT"
    assert rsp.SpecificCharacterSet == "ISO_IR 100"  # the candidate's, not the query's
    assert rsp.PatientName == "Smith^John"
    assert rsp.PatientID == "12345"
    assert "PatientSex" in rsp and rsp["PatientSex"].is_empty  # absent: returned zero-length
    assert "OtherPatientIDs" not in rsp and "PatientBirthDate" not in rsp  # only requested keys
    assert rsp is not candidate and rsp.PatientName is not candidate.PatientName


def test_response_identifier_without_candidate_charset() -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.SpecificCharacterSet = "ISO_IR 100"
    query.StudyInstanceUID = ""
    candidate = Dataset()
    candidate.StudyInstanceUID = "1.2.3"
    rsp = response_identifier(query, candidate)
    assert "SpecificCharacterSet" not in rsp
    assert rsp.StudyInstanceUID == "1.2.3"


def test_response_identifier_sequences() -> None:
    entry = _worklist_entry("Doe^Jane", _sps("CT", "CT_SCANNER", "20240115"), _sps("MR", "MR_SCANNER", "20240117"))
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = "1.2.3"
    entry.ReferencedStudySequence = [ref]

    query = _worklist_query(modality="MR")
    query.ReferencedStudySequence = [Dataset()]  # universal: the entire sequence is returned
    query.ReferencedPatientSequence = [Dataset()]  # absent in the candidate
    assert matches(query, entry)
    rsp = response_identifier(query, entry)

    steps = rsp.ScheduledProcedureStepSequence
    assert len(steps) == 1  # only matching items
    assert steps[0].Modality == "MR"
    assert steps[0].ScheduledStationAETitle == "MR_SCANNER"
    assert steps[0].ScheduledProcedureStepStartTime == "0900"
    assert "ScheduledProcedureStepDescription" not in steps[0]  # only the requested attributes
    assert rsp.ReferencedStudySequence[0].ReferencedSOPInstanceUID == "1.2.3"
    assert len(rsp.ReferencedPatientSequence) == 0
    assert rsp.PatientName == "Doe^Jane"


def test_response_identifier_sequence_all_items_for_universal_keys() -> None:
    entry = _worklist_entry("Doe^Jane", _sps("CT", "A", "20240115"), _sps("MR", "B", "20240117"))
    rsp = response_identifier(_worklist_query(), entry)
    assert [item.Modality for item in rsp.ScheduledProcedureStepSequence] == ["CT", "MR"]
    missing = response_identifier(_worklist_query(), Dataset())
    assert len(missing.ScheduledProcedureStepSequence) == 0


# ---------------------------------------------------------------------------
# Properties

_SETTINGS = settings(max_examples=60, deadline=None)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\\\x00"), max_size=20)


@_SETTINGS
@given(text=_TEXT, vr=st.sampled_from(sorted(WILDCARD_VRS)))
def test_star_matches_anything(text: str, vr: str) -> None:
    assert match_value("*", text, vr)


@_SETTINGS
@given(
    text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="*?\\\x00"), max_size=20),
    vr=st.sampled_from(["AE", "CS", "LO", "PN", "SH", "UC", "ST", "LT", "UT"]),
)
def test_literal_matches_itself(text: str, vr: str) -> None:
    assert match_value(text, text, vr)


@_SETTINGS
@given(text=st.text(st.sampled_from("abcXYZ"), min_size=1, max_size=10))
def test_non_pn_is_case_sensitive(text: str) -> None:
    assert match_value(text.swapcase(), text, "LO") is (text.swapcase() == text)
    assert match_value(text.swapcase(), text, "PN")


@_SETTINGS
@given(pattern=st.text(st.sampled_from("ab*?"), max_size=8), text=st.text(st.sampled_from("ab"), max_size=8))
def test_wildcards_agree_with_fnmatch(pattern: str, text: str) -> None:
    expected = fnmatch.fnmatchcase(text, pattern) if pattern else True
    if pattern and not text:
        expected = set(pattern) <= {"*"}  # an empty stored value only matches pure wild cards
    assert match_value(pattern, text, "LO") is expected


_DATES = st.dates(min_value=datetime.date(1900, 1, 1), max_value=datetime.date(2100, 12, 31))
_DATETIMES = st.datetimes(min_value=datetime.datetime(1900, 1, 1), max_value=datetime.datetime(2100, 12, 31))


@_SETTINGS
@given(a=_DATES, b=_DATES, x=_DATES)
def test_date_range_property(a: datetime.date, b: datetime.date, x: datetime.date) -> None:
    da, db, dx = (d.strftime("%Y%m%d") for d in (a, b, x))
    assert match_value(f"{da}-{db}", dx, "DA") is (a <= x <= b)
    assert match_value(f"{da}-", dx, "DA") is (a <= x)
    assert match_value(f"-{db}", dx, "DA") is (x <= b)
    assert match_value(da, dx, "DA") is (a == x)


@_SETTINGS
@given(a=st.times(), b=st.times(), x=st.times())
def test_time_range_property(a: datetime.time, b: datetime.time, x: datetime.time) -> None:
    ta, tb, tx = (t.strftime("%H%M%S.%f") for t in (a, b, x))
    assert match_value(f"{ta}-{tb}", tx, "TM") is (a <= x <= b)
    # minute precision bounds cover whole minutes
    lo, hi = a.replace(second=0, microsecond=0), b.replace(second=59, microsecond=999999)
    assert match_value(f"{a:%H%M}-{b:%H%M}", tx, "TM") is (lo <= x <= hi)


@_SETTINGS
@given(a=_DATETIMES, b=_DATETIMES, x=_DATETIMES)
def test_datetime_range_property(a: datetime.datetime, b: datetime.datetime, x: datetime.datetime) -> None:
    fa, fb, fx = (d.strftime("%Y%m%d%H%M%S.%f") for d in (a, b, x))
    assert match_value(f"{fa}-{fb}", fx, "DT") is (a <= x <= b)
    assert match_value(f"-{fb}", fx, "DT") is (x <= b)


def test_undecoded_private_key_uses_candidate_vr() -> None:
    query = Dataset()
    query.add_new(0x00090010, "LO", "ACME")  # private creator: not a key
    query.add_new(0x00091010, "UN", b"x*")  # e.g. a private key read with implicit VR
    candidate = Dataset()
    candidate.add_new(0x00090010, "LO", "ACME")
    candidate.add_new(0x00091010, "LO", "xyz")
    assert matches(query, candidate)
    candidate[0x00091010].value = "abc"
    assert not matches(query, candidate)


def test_match_value_accepts_data_elements() -> None:
    key = DataElement(0x00080060, "CS", "MR")
    assert match_value(key, DataElement(0x00080060, "CS", "MR"), "CS")
    assert not match_value(key, DataElement(0x00080060, "CS", "CT"), "CS")
    assert match_value(DataElement(0x00280010, "US or SS", 512), 512, "US or SS")


def test_matcher_parses_a_long_uid_list_once_and_matches_like_matches():
    """List of UID Matching (C.2.2.2.2) with 20,000 UIDs: the same answers as
    :func:`matches`, padding not significant; a CS list with a wild card still matches
    by wild card."""
    from dimse_async.archive.matching import Matcher

    q = Dataset()
    q.StudyInstanceUID = [f"1.2.{k}" for k in range(20_000)] + ["1.2.3.4\x00"]
    q.Modality = ["MR", "C*"]
    matcher = Matcher(q)
    for uid, modality, expected in [
        ("1.2.19999", "CT", True),
        ("1.2.3.4", "CR", True),
        ("1.2.20000", "CT", False),
        ("1.2.5", "US", False),
        ("1.2.5", "MR", True),
    ]:
        candidate = Dataset()
        candidate.StudyInstanceUID = uid
        candidate.Modality = modality
        assert matcher(candidate) is expected == matches(q, candidate), (uid, modality)
