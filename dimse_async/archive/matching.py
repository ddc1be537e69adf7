"""C-FIND attribute matching (PS3.4 §C.2.2.2), reusable by any C-FIND SCP.

Pure functions, no I/O. The same rules serve Query/Retrieve (PS3.4 Annex C) and
Basic Worklist Management (PS3.4 Annex K, which refers back to §C.2.2.2).

Public API
----------
:func:`match_value`
    Match one Key Attribute value against one stored Attribute value.
:func:`matches`
    Match a whole request Identifier against a candidate Dataset.
:func:`response_identifier`
    Build the C-FIND response Identifier for a matched candidate.
:func:`is_universal`
    Whether a key value requests Universal Matching (§C.2.2.2.3).
:func:`parse_range`
    Split a DA/TM/DT range key (§C.2.2.2.5) into its two ends.

Matching types and how they are implemented
-------------------------------------------
Single Value Matching (§C.2.2.2.1)
    Exact, case-sensitive comparison, except for PN where the standard lets an
    application match literally "insensitive to some or all aspects of case"; here
    PN is case-insensitive by default (``pn_case_insensitive``). Padding is not
    significant (PS3.5 §6.2): trailing spaces are ignored for every string VR and
    leading spaces too for AE, AS, CS, DA, DS, DT, IS, LO, SH, TM; trailing NULs are
    ignored for UI. Numeric VRs (DS, IS, FL, FD, SS, US, SL, UL, SV, UV) compare by
    numeric value, so ``"1.50"`` matches ``1.5``. A single DA/TM/DT value matches
    every stored value that falls within the period it denotes (``"1015"`` matches
    ``"101530.25"``), as if it were the range ``"1015-1015"``.
List of UID Matching (§C.2.2.2.2)
    A backslash-separated list in a UI key: any UID in the list may generate a match.
Universal Matching (§C.2.2.2.3)
    A zero-length key matches every entity, including one lacking the Attribute.
Wild Card Matching (§C.2.2.2.4)
    For AE, CS, LO, LT, PN, SH, ST, UC, UR, UT only: ``*`` matches any sequence of
    characters (including none) and ``?`` any single character. Case-sensitive
    except for PN (see above). ``*`` is "equivalent to Universal Matching", so it
    also matches a zero-length or absent stored value. In DA, TM, DT, UI and the
    numeric VRs ``*`` and ``?`` are ordinary characters.
Range Matching (§C.2.2.2.5)
    DA, TM and DT keys of the form ``A-B``, ``-B`` or ``A-``, inclusive.
Sequence Matching (§C.2.2.2.6)
    A key sequence with one item matches when, for at least one stored item, every
    item key matches (recursively). A key sequence with no items or one empty item
    is a Universal Match and returns the whole stored sequence.
Multiple values in the stored Attribute (§C.2.2.3)
    When the stored Attribute has several values the Attribute matches when any of
    them matches.

Interpretation choices (documented here as a Conformance Statement would)
-------------------------------------------------------------------------
* Multiple values in a non-UI key have undefined semantics without Extended
  Negotiation of Multiple Value Matching (§C.2.2.2.8, note 4); they are treated like
  List of UID Matching: any key value may generate a match (logical OR). Multiple
  Value Matching (AND) is not implemented, nor are Empty Value Matching (§C.2.2.2.7),
  fuzzy semantic PN matching and combined date-time matching (Extended Negotiation).
  ST, LT, UT and UR have VM 1 and may contain a backslash, so they are never split.
* A stored Attribute that is absent or zero-length (an unknown value) fails to
  match every non-universal key (PS3.4 §K.2.2.1.1.1) except a pure wild card such as
  ``*``, which per §K.2.2.1.1.1 note 1 may be used to query such entities. For the
  Required Keys of Query/Retrieve (``matches(..., unknown=...)``) an absent or
  zero-length stored value is unknown and matches any key value (§C.2.2.1.2).
* PN: a key without ``=`` is compared with the first (alphabetic) component group
  of the stored name only; a key with ``=`` is compared group by group, an empty
  key group matching any stored group. Empty trailing components (``Smith^John^^``)
  are not significant. Wild cards apply to the whole group string, so ``*`` and
  ``?`` may match ``^``. Case folding uses :meth:`str.casefold`; accents are
  significant.
* DA/TM/DT values of reduced precision denote a period: as a range lower bound the
  start of the period, as an upper bound its end (``"-1030"`` includes ``103059``,
  ``"2020-"`` in DT starts at 2020-01-01T00:00). Stored values are taken at the
  start of their period. Range Matching crossing midnight is not supported (as the
  standard says); a range whose lower end is after its upper end matches nothing.
  The ACR-NEMA forms ``YYYY.MM.DD`` and ``HH:MM:SS`` are accepted. Reduced-precision
  DA (``YYYY``, ``YYYYMM``) is accepted in keys for convenience. A key that is not
  a valid date/time never matches (except by exact string equality).
* DT offsets from UTC (``&ZZXX``) are taken into account when both the key bound
  and the stored value carry one (both are converted to UTC). When either lacks
  one the comparison is naive (local clock readings compared as they are):
  Timezone Offset From UTC (0008,0201) is not consulted. In a DT key with a single
  ``-`` followed by exactly four digits that form a plausible offset (hours <= 14,
  minutes <= 59) after more than a year's digits, the ``-`` is read as the sign of
  an offset (``20200101120000-0500`` is a single value), otherwise as the range
  separator (``2019-2020``).
* Specific Character Set is never matched (§C.2.2.2); values are compared as the
  decoded Python strings pydicom produces.
"""

from __future__ import annotations

import calendar
import copy
import datetime
import re
from collections.abc import Container, Iterable
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import PersonName

__all__ = [
    "DEFAULT_IGNORE",
    "WILDCARD_VRS",
    "is_universal",
    "match_value",
    "matches",
    "parse_range",
    "response_identifier",
]

#: Keywords present in an Identifier that are never matched (§C.2.2.2; PS3.4 §C.4.1.1.3.1).
DEFAULT_IGNORE: frozenset[str] = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})

#: VRs for which ``*`` and ``?`` are wild cards (PS3.4 §C.2.2.2.4).
WILDCARD_VRS: frozenset[str] = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})

_RANGE_VRS = frozenset({"DA", "TM", "DT"})
# VM is always 1 and a backslash is an ordinary character (PS3.5 §6.2).
_UNSPLIT_VRS = frozenset({"LT", "ST", "UT", "UR"})
# Leading spaces are padding, not content (PS3.5 Table 6.2-1).
_LEADING_PAD_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM"})
_NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "SS", "US", "SL", "UL", "SV", "UV"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


# ---------------------------------------------------------------------------
# Values


def _norm_vr(vr: str | None) -> str:
    """``"US or SS"`` -> ``"US"``; ``None`` -> ``"UN"``."""
    if not vr:
        return "UN"
    return vr.split(" or ")[0].strip().upper()


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, DataElement) else value


def _strip(text: str, vr: str) -> str:
    """Drop the padding that PS3.5 §6.2 declares not significant."""
    if vr == "UI":
        return text.strip(" \x00")
    text = text.rstrip(" \x00")
    return text.lstrip(" ") if vr in _LEADING_PAD_VRS else text


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _values(value: Any, vr: str) -> list[Any]:
    """The individual values of a key or stored Attribute, padding removed.

    Strings are split on backslash (the VM delimiter) unless the VR has VM 1 and
    allows backslash in text. Zero-length values are dropped, so an empty list means
    "zero-length".
    """
    value = _unwrap(value)
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        if vr not in _TEXT_VRS:
            return [bytes(value)] if value else []
        # an undecoded value (e.g. a UN private key) compared under a text VR
        value = _decode(bytes(value))
    if isinstance(value, (Dataset, DicomSequence)):
        return [value]
    if isinstance(value, (str, PersonName)):
        text = str(value)
        parts = [text] if vr in _UNSPLIT_VRS else text.split("\\")
        return [p for p in (_strip(p, vr) for p in parts) if p]
    if isinstance(value, Iterable):
        out: list[Any] = []
        for item in value:
            out.extend(_values(item, vr))
        return out
    return [value]  # int, float, Tag, ...


def is_universal(value: Any) -> bool:
    """Whether a key value requests Universal Matching (PS3.4 §C.2.2.2.3).

    True for a zero-length value: ``None``, ``""`` (or only padding), an empty
    MultiValue/list, empty bytes, and for a sequence key with no items or a single
    item with no Item Key Attributes (§C.2.2.2.6, "Universal Matching like
    mechanism"). A :class:`~pydicom.dataelem.DataElement` is judged by its value.
    ``"*"`` is not a zero-length value; it reaches the same result through Wild Card
    Matching where wild cards apply.
    """
    value = _unwrap(value)
    if value is None:
        return True
    if isinstance(value, DicomSequence) or (
        isinstance(value, list) and value and all(isinstance(v, Dataset) for v in value)
    ):
        return len(value) == 0 or (len(value) == 1 and len(value[0]) == 0)
    if isinstance(value, Dataset):
        return len(value) == 0
    if isinstance(value, (str, bytes, bytearray, PersonName)):
        if isinstance(value, (bytes, bytearray)):
            return len(value) == 0
        return not str(value).strip(" \x00")
    if isinstance(value, Iterable):
        return all(is_universal(v) for v in value)
    return False


# ---------------------------------------------------------------------------
# Wild cards and person names


@lru_cache(maxsize=1024)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


def _has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def _wildcard_match(pattern: str, text: str) -> bool:
    return _wildcard_regex(pattern).fullmatch(text) is not None


def _pn_groups(text: str) -> list[str]:
    """Component groups with empty trailing components and groups removed."""
    groups = [g.rstrip(" ").rstrip("^") for g in text.split("=")]
    while len(groups) > 1 and not groups[-1]:
        groups.pop()
    return groups


def _pn_group_match(key: str, stored: str) -> bool:
    if not key:
        return True  # an empty key group is universal for that group
    if _has_wildcard(key):
        # Allow "Smith^John^*" to match "Smith^John" by also trying the padded form.
        padded = stored + "^" * max(0, 4 - stored.count("^"))
        return _wildcard_match(key, stored) or _wildcard_match(key, padded)
    return key == stored


def _pn_match(key: str, stored: str, case_insensitive: bool) -> bool:
    if case_insensitive:
        key, stored = key.casefold(), stored.casefold()
    key_groups = _pn_groups(key)
    stored_groups = _pn_groups(stored)
    if len(key_groups) == 1:
        return _pn_group_match(key_groups[0], stored_groups[0])
    stored_groups += [""] * (len(key_groups) - len(stored_groups))
    return all(_pn_group_match(k, s) for k, s in zip(key_groups, stored_groups))


# ---------------------------------------------------------------------------
# Dates and times (PS3.5 §6.2 DA, TM, DT)

_US_PER_SECOND = 1_000_000
_DA_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?")
_DA_LEGACY_RE = re.compile(r"\d{4}\.\d{2}\.\d{2}")
_TM_RE = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DT_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?")
_DT_TOKEN_RE = re.compile(r"\d{4}(?:\d{2}){0,5}(?:\.\d{1,6})?(?:[+-]\d{4})?")


class _Period:
    """The interval ``[start, end]`` a DA/TM/DT value denotes, with its UTC offset."""

    __slots__ = ("end", "offset", "start")

    def __init__(self, start: Any, end: Any, offset: datetime.timedelta | None = None):
        self.start = start
        self.end = end
        self.offset = offset


def _fraction(digits: str | None) -> tuple[int, int]:
    """(microseconds, width of the precision unit in microseconds)."""
    if not digits:
        return 0, 0
    return int(digits.ljust(6, "0")), 10 ** (6 - len(digits))


def _parse_da(text: str) -> _Period | None:
    if _DA_LEGACY_RE.fullmatch(text):
        text = text.replace(".", "")
    m = _DA_RE.fullmatch(text)
    if m is None:
        return None
    year, month, day = m.group(1), m.group(2), m.group(3)
    try:
        y = int(year)
        if month is None:
            first, last = datetime.date(y, 1, 1), datetime.date(y, 12, 31)
        elif day is None:
            mo = int(month)
            first = datetime.date(y, mo, 1)
            last = datetime.date(y, mo, calendar.monthrange(y, mo)[1])
        else:
            first = last = datetime.date(y, int(month), int(day))
    except ValueError:
        return None
    return _Period(first.toordinal(), last.toordinal())


def _parse_tm(text: str) -> _Period | None:
    m = _TM_RE.fullmatch(text.replace(":", ""))
    if m is None:
        return None
    hh, mm, ss, frac = m.groups()
    if frac is not None and ss is None:
        return None
    h, mi, s = int(hh), int(mm or 0), int(ss or 0)
    if h > 23 or mi > 59 or s > 60:
        return None
    us, unit = _fraction(frac)
    start = ((h * 60 + mi) * 60 + s) * _US_PER_SECOND + us
    if frac:
        width = unit
    elif ss is not None:
        width = _US_PER_SECOND
    elif mm is not None:
        width = 60 * _US_PER_SECOND
    else:
        width = 3600 * _US_PER_SECOND
    return _Period(start, start + width - 1)


def _parse_offset(text: str | None) -> datetime.timedelta | None:
    if not text:
        return None
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        raise ValueError(text)
    delta = datetime.timedelta(hours=hours, minutes=minutes)
    return -delta if text[0] == "-" else delta


def _parse_dt(text: str) -> _Period | None:
    m = _DT_RE.fullmatch(text)
    if m is None:
        return None
    year, month, day, hh, mm, ss, frac, off = m.groups()
    if frac is not None and ss is None:
        return None
    try:
        offset = _parse_offset(off)
        y = int(year)
        mo, d = int(month or 1), int(day or 1)
        h, mi, s = int(hh or 0), int(mm or 0), int(ss or 0)
        us, unit = _fraction(frac)
        if s == 60:  # leap second: datetime cannot represent it; clamp
            s, us, unit = 59, 999_999, 1
        start = datetime.datetime(y, mo, d, h, mi, s, us)
        if frac or ss is not None:
            end = start + datetime.timedelta(microseconds=(unit or _US_PER_SECOND) - 1)
        elif mm is not None:
            end = start.replace(second=59, microsecond=999_999)
        elif hh is not None:
            end = start.replace(minute=59, second=59, microsecond=999_999)
        elif day is not None:
            end = start.replace(hour=23, minute=59, second=59, microsecond=999_999)
        elif month is not None:
            end = datetime.datetime(y, mo, calendar.monthrange(y, mo)[1], 23, 59, 59, 999_999)
        else:
            end = datetime.datetime(y, 12, 31, 23, 59, 59, 999_999)
    except (ValueError, OverflowError):
        return None
    return _Period(start, end, offset)


_PARSERS = {"DA": _parse_da, "TM": _parse_tm, "DT": _parse_dt}


def _le(a: Any, a_off: datetime.timedelta | None, b: Any, b_off: datetime.timedelta | None) -> bool:
    """``a <= b``; DT readings are converted to UTC only when both carry an offset."""
    if a_off is not None and b_off is not None:
        return bool(a - a_off <= b - b_off)
    return bool(a <= b)


def _looks_like_dt_offset(left: str, right: str) -> bool:
    """Is ``left-right`` a single DT whose ``-`` is an offset sign? (see module doc)"""
    if not (len(right) == 4 and right.isdigit() and int(right[:2]) <= 14 and int(right[2:]) <= 59):
        return False
    return len(left) > 4 and _DT_TOKEN_RE.fullmatch(left) is not None and left[-5] not in "+-"


def parse_range(value: str, vr: str | None = None) -> tuple[str | None, str | None] | None:
    """Split a Range Matching key (PS3.4 §C.2.2.2.5) into ``(lower, upper)``.

    ``"A-B"`` -> ``("A", "B")``, ``"-B"`` -> ``(None, "B")``, ``"A-"`` -> ``("A", None)``;
    spaces around either end are removed. Returns ``None`` when *value* is not a
    range (no ``-``), i.e. the key asks for Single Value Matching. ``"-"`` alone gives
    ``(None, None)``, an unbounded range.

    Only DT values may themselves contain ``-`` (a negative UTC offset). With
    ``vr="DT"`` the separator is chosen so that both ends are valid DT values, and
    a lone ``-`` followed by a plausible offset is read as the offset sign (see the
    module documentation). Without *vr* (or for DA/TM) a value with one ``-`` is
    always a range and one with several ``-`` is resolved as for DT. The ends are
    not otherwise validated; unparseable ends simply match nothing.
    """
    text = str(value).strip(" \x00")
    dashes = [i for i, c in enumerate(text) if c == "-"]
    if not dashes:
        return None

    def ends(i: int) -> tuple[str | None, str | None]:
        lo, hi = text[:i].strip(), text[i + 1 :].strip()
        return (lo or None, hi or None)

    is_dt = _norm_vr(vr) == "DT" if vr else False
    if len(dashes) == 1:
        lo, hi = ends(dashes[0])
        if is_dt and lo is not None and hi is not None and _looks_like_dt_offset(lo, hi):
            return None
        return lo, hi
    for i in dashes:
        lo, hi = ends(i)
        if all(part is None or _DT_TOKEN_RE.fullmatch(part) for part in (lo, hi)):
            return lo, hi
    return None


def _range_match(key: str, stored: str, vr: str) -> bool:
    parse = _PARSERS[vr]
    point = parse(stored)
    bounds = parse_range(key, vr)
    if bounds is None:  # Single Value Matching on the period the key denotes
        period = parse(key)
        if period is None or point is None:
            return key == stored
        lower: _Period | None = period
        upper: _Period | None = period
    else:
        lo, hi = bounds
        lower = parse(lo) if lo is not None else None
        upper = parse(hi) if hi is not None else None
        if (lo is not None and lower is None) or (hi is not None and upper is None):
            return False
        if point is None:
            return False
    if lower is not None and not _le(lower.start, lower.offset, point.start, point.offset):
        return False
    return upper is None or _le(point.start, point.offset, upper.end, upper.offset)


# ---------------------------------------------------------------------------
# Single values


def _as_number(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None


def _as_tag(value: Any) -> int | None:
    """An AT value as an int: a Tag/int, or text like ``00100010`` or ``(0010,0010)``."""
    if isinstance(value, int):
        return int(value)
    text = re.sub(r"[\s(),]", "", str(value)).removeprefix("0x").removeprefix("0X")
    try:
        return int(text, 16) if len(text) == 8 else None
    except ValueError:
        return None


def _match_single(key: Any, stored: Any, vr: str, pn_case_insensitive: bool) -> bool:
    """One key value against one stored value (both already padding-stripped)."""
    if isinstance(key, (bytes, bytearray)) or isinstance(stored, (bytes, bytearray)) or vr in _BINARY_VRS:
        return bool(key == stored)
    if vr in _NUMERIC_VRS:
        a, b = _as_number(key), _as_number(stored)
        if a is not None and b is not None and not (a.is_nan() or b.is_nan()):
            return a == b
        return str(key) == str(stored)
    if vr == "AT":
        a_tag, b_tag = _as_tag(key), _as_tag(stored)
        return a_tag == b_tag if a_tag is not None and b_tag is not None else str(key) == str(stored)
    k, s = str(key), str(stored)
    if vr in _RANGE_VRS:
        return _range_match(k, s, vr)
    if vr == "PN":
        return _pn_match(k, s, pn_case_insensitive)
    if vr in WILDCARD_VRS and _has_wildcard(k):
        return _wildcard_match(k, s)
    return k == s


def _pure_wildcard(key_values: list[Any], vr: str) -> bool:
    """A key like ``*`` (or ``**``) that also matches a zero-length value."""
    return vr in WILDCARD_VRS and any(isinstance(k, str) and k and set(k) <= {"*"} for k in key_values)


def match_value(query: Any, stored: Any, vr: str, *, pn_case_insensitive: bool = True) -> bool:
    """Whether a stored Attribute value matches a Key Attribute value (PS3.4 §C.2.2.2).

    *query* and *stored* may be ``str``, pydicom values (``PersonName``, ``UID``,
    ``DSfloat``, ``IS``, ints, floats, ``MultiValue``), lists, bytes, ``None`` (zero
    length / absent), :class:`~pydicom.dataelem.DataElement` (its value is used), or
    for ``vr="SQ"`` a sequence of Datasets. *vr* is the key's Value Representation
    (``"US or SS"`` style ambiguous VRs use their first alternative).

    * a zero-length key always matches (Universal Matching, §C.2.2.2.3);
    * a key with several values matches if any of them does (List of UID Matching,
      §C.2.2.2.2, applied to every VR);
    * a stored Attribute with several values matches if any of them does (§C.2.2.3);
    * a zero-length stored value matches only universal keys and pure wild cards.

    See the module documentation for the matching types and interpretation choices.
    """
    vr = _norm_vr(vr)
    query, stored = _unwrap(query), _unwrap(stored)
    if is_universal(query):
        return True
    if vr == "SQ":
        return _match_sequence(query, stored, pn_case_insensitive)
    keys = _values(query, vr)
    if not keys:  # only delimiters / padding: nothing to match on
        return True
    stored_values = _values(stored, vr)
    if not stored_values:
        return _pure_wildcard(keys, vr)
    return any(_match_single(k, s, vr, pn_case_insensitive) for k in keys for s in stored_values)


# ---------------------------------------------------------------------------
# Datasets and sequences


def _items(value: Any) -> list[Dataset]:
    value = _unwrap(value)
    if value is None:
        return []
    if isinstance(value, Dataset):
        return [value]
    return [item for item in value if isinstance(item, Dataset)]


def _is_key(elem: DataElement, ignore: Container[Any]) -> bool:
    tag = elem.tag
    if tag.group in (0x0000, 0x0002) or tag.element == 0x0000 or tag.is_private_creator:
        return False
    return not (elem.keyword in ignore or tag in ignore)


def _key_vr(key: DataElement, stored: DataElement | None) -> str:
    vr = _norm_vr(key.VR)
    if (vr == "UN" or " or " in str(key.VR)) and stored is not None:
        return _norm_vr(stored.VR)
    return vr


def _match_dataset(
    query: Dataset,
    candidate: Dataset,
    ignore: Container[Any],
    pn_case_insensitive: bool,
    unknown: Container[str] = frozenset(),
) -> bool:
    for key in query:
        if not _is_key(key, ignore):
            continue
        stored = candidate.get(key.tag)
        stored_value = stored.value if stored is not None else None
        if key.keyword in unknown and is_universal(stored_value):
            continue  # an unknown value of a Required key matches any key value (C.2.2.1.2)
        if not match_value(key.value, stored_value, _key_vr(key, stored), pn_case_insensitive=pn_case_insensitive):
            return False
    return True


def _match_sequence(query: Any, stored: Any, pn_case_insensitive: bool) -> bool:
    """Sequence Matching (§C.2.2.2.6) for a non-universal key sequence.

    All Item Key Attributes must match within one and the same stored item. An
    absent or empty stored sequence is treated as a single empty item, so only
    items whose keys are all universal (or pure wild cards) match it.
    """
    key_items = [item for item in _items(query) if len(item)]
    if not key_items:
        return True
    stored_items = _items(stored) or [Dataset()]
    return any(
        _match_dataset(key_item, item, frozenset(), pn_case_insensitive)
        for key_item in key_items
        for item in stored_items
    )


def matches(
    query: Dataset,
    candidate: Dataset,
    *,
    ignore: frozenset[str] = DEFAULT_IGNORE,
    pn_case_insensitive: bool = True,
    unknown: Container[str] = frozenset(),
) -> bool:
    """Whether *candidate* matches every Key Attribute of the request Identifier *query*.

    Every element of *query* is a key (PS3.4 §C.2.2.1), except group 0x0000/0x0002
    elements, group lengths, private creator elements and those whose keyword (or
    tag) is in *ignore* (by default Query/Retrieve Level and Specific Character Set,
    which are never matched, §C.2.2.2). A candidate lacking a key's Attribute
    matches it only if the key is universal (or a pure ``*`` wild card), unless the
    key's keyword is in *unknown*: for Required Keys of Query/Retrieve an absent or
    zero-length stored value is unknown and matches any key value (§C.2.2.1.2).
    Sequence keys use Sequence Matching (§C.2.2.2.6).
    """
    return _match_dataset(query, candidate, ignore, pn_case_insensitive, unknown)


def _empty_element(key: DataElement) -> DataElement:
    if key.VR == "SQ":
        return DataElement(key.tag, "SQ", DicomSequence())
    return DataElement(key.tag, key.VR, None)


def _project(query: Dataset, candidate: Dataset, pn_case_insensitive: bool, top: bool) -> Dataset:
    out = Dataset()
    for key in query:
        tag = key.tag
        if tag.group in (0x0000, 0x0002) or tag.element == 0x0000:
            continue
        if top and key.keyword == "QueryRetrieveLevel":
            out.add(copy.deepcopy(key))
            continue
        if top and key.keyword == "SpecificCharacterSet":
            continue
        stored = candidate.get(tag)
        if key.VR != "SQ" or (stored is not None and stored.VR != "SQ"):
            out.add(copy.deepcopy(stored) if stored is not None else _empty_element(key))
            continue
        if is_universal(key.value):
            # "request that ... the entire Sequence of Items be returned" (§C.2.2.2.6)
            out.add(copy.deepcopy(stored) if stored is not None else _empty_element(key))
            continue
        key_items = [item for item in _items(key.value) if len(item)]
        items: list[Dataset] = []
        for item in _items(stored.value if stored is not None else None):
            for key_item in key_items:
                if _match_dataset(key_item, item, frozenset(), pn_case_insensitive):
                    items.append(_project(key_item, item, pn_case_insensitive, top=False))
                    break
        out.add(DataElement(tag, "SQ", DicomSequence(items)))
    if top and "SpecificCharacterSet" in candidate:
        out.add(copy.deepcopy(candidate["SpecificCharacterSet"]))
    return out


def response_identifier(query: Dataset, candidate: Dataset, *, pn_case_insensitive: bool = True) -> Dataset:
    """The C-FIND response Identifier for *candidate* (PS3.4 §C.4.1.1.3.2, §K.4.1.1.3.2).

    A new Dataset holding every key of *query*, valued from *candidate* (a deep copy
    of its element) or zero-length when the candidate lacks it. Query/Retrieve Level
    is copied from the query; Specific Character Set is taken from the candidate when
    present (the values returned are the candidate's) and otherwise omitted. Sequence
    keys (§C.2.2.2.6): a universal key sequence returns the candidate's whole
    sequence; otherwise the sequence holds the candidate's matching items only,
    each reduced to the item keys (recursively). Group 0x0002 elements are dropped.
    """
    return _project(query, candidate, pn_case_insensitive, top=True)
