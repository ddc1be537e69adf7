"""Matching one key value against one stored value (PS3.4 §C.2.2.2.1-§C.2.2.2.5).

Padding, value multiplicity, Universal, Single Value, List of UID, Wild Card and
Person Name matching; DA/TM/DT ranges come from :mod:`.date_ranges`. The rules and
the interpretation choices are documented in :mod:`dimse_async.archive.matching`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any
from unicodedata import east_asian_width

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import PersonName

from .date_ranges import range_match

__all__ = [
    "WILDCARD_VRS",
    "KeyValues",
    "is_universal",
    "key_values",
    "match_key_values",
    "match_plain_value",
    "norm_vr",
    "unwrap",
]

#: VRs for which ``*`` and ``?`` are wild cards (PS3.4 §C.2.2.2.4).
WILDCARD_VRS: frozenset[str] = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})

_RANGE_VRS = frozenset({"DA", "TM", "DT"})
# VM is always 1 and a backslash is an ordinary character (PS3.5 §6.2).
_UNSPLIT_VRS = frozenset({"LT", "ST", "UT", "UR"})
# Leading spaces are padding, not content (PS3.5 Table 6.2-1).
_LEADING_PAD_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM"})
_NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "SS", "US", "SL", "UL", "SV", "UV"})
# Values compared by string equality alone when no key value holds a wild card.
_EQUALITY_VRS = frozenset({"UI", "AE", "AS", "CS", "LO", "SH", "UC"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


# ---------------------------------------------------------------------------
# Values


def norm_vr(vr: str | None) -> str:
    """``"US or SS"`` -> ``"US"``; ``None`` -> ``"UN"``."""
    if not vr:
        return "UN"
    return vr.split(" or ")[0].strip().upper()


def unwrap(value: Any) -> Any:
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
    value = unwrap(value)
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
    value = unwrap(value)
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
def _segment_regex(segment: str) -> re.Pattern[str]:
    """A piece of a key between two ``*``: literal characters and ``?`` (any one)."""
    return re.compile("".join("." if c == "?" else re.escape(c) for c in segment), re.DOTALL)


def _has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def _wildcard_match(pattern: str, text: str) -> bool:
    """Wild card matching (PS3.4 §C.2.2.2.4) in O(len(pattern) * len(text)).

    The pieces between ``*`` are found in order, each at its leftmost place (which
    never loses a match); the first is anchored at the start, the last at the end.
    No backtracking regular expression: a key of many ``*`` and ``?`` would take
    exponential time, holding the GIL and so the event loop. A value shorter than the
    key's literal characters and ``?`` (one character each) is refused without a look.
    """
    if len(pattern) - pattern.count("*") > len(text):
        return False
    first, *middle = pattern.split("*")
    if not middle:
        return len(first) == len(text) and _segment_regex(first).fullmatch(text) is not None
    last = middle.pop()
    end = len(text) - len(last)
    if end < len(first):
        return False
    if _segment_regex(first).fullmatch(text, 0, len(first)) is None:
        return False
    if _segment_regex(last).fullmatch(text, end) is None:
        return False
    pos = len(first)
    for segment in middle:
        if segment:
            found = _segment_regex(segment).search(text, pos, end)
            if found is None:
                return False
            pos = found.end()
    return True


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


def ideographic_or_phonetic(text: str) -> bool:
    """Whether ``text`` holds a wide (East Asian) character: ideographic or phonetic
    (kanji, kana, hangul), which no alphabetic component group holds (PS3.5 6.2.1.1: the
    alphabetic group is single-byte text)."""
    return any(east_asian_width(ch) in "WF" for ch in text)


def _pn_match(key: str, stored: str, case_insensitive: bool) -> bool:
    """PN matching by component group (PS3.5 6.2.1.1, PS3.4 C.2.2.2.1): a key of one
    group is the alphabetic group, matched against the stored alphabetic group; one of
    several (``=山田^太郎``, ``*=山田*``) is matched group by group, an empty key group
    matching any stored one. A single-group key of ideographic or phonetic characters
    (``山田*``, sent without ``=`` by SCUs that hold one name form) is matched against
    every stored group, since no alphabetic group could hold it."""
    if case_insensitive:
        key, stored = key.casefold(), stored.casefold()
    key_groups = _pn_groups(key)
    stored_groups = _pn_groups(stored)
    if len(key_groups) == 1:
        if not key.isascii() and ideographic_or_phonetic(key_groups[0]):
            return any(_pn_group_match(key_groups[0], group) for group in stored_groups)
        return _pn_group_match(key_groups[0], stored_groups[0])
    stored_groups += [""] * (len(key_groups) - len(stored_groups))
    return all(_pn_group_match(k, s) for k, s in zip(key_groups, stored_groups))


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
        return range_match(k, s, vr)
    if vr == "PN":
        return _pn_match(k, s, pn_case_insensitive)
    if vr in WILDCARD_VRS and _has_wildcard(k):
        return _wildcard_match(k, s)
    return k == s


def _pure_wildcard(key_values: list[Any], vr: str) -> bool:
    """A key like ``*`` (or ``**``) that also matches a zero-length value."""
    return vr in WILDCARD_VRS and any(isinstance(k, str) and k and set(k) <= {"*"} for k in key_values)


def match_plain_value(query: Any, stored: Any, vr: str, *, pn_case_insensitive: bool = True) -> bool:
    """:func:`~dimse_async.archive.matching.match_value` for a key that is not a sequence.

    Universal (§C.2.2.2.3), single value (§C.2.2.2.1), List of UID (§C.2.2.2.2),
    wild card (§C.2.2.2.4) and range (§C.2.2.2.5) matching; several stored values
    match if any does (§C.2.2.3).
    """
    vr = norm_vr(vr)
    query, stored = unwrap(query), unwrap(stored)
    if is_universal(query):
        return True
    return match_key_values(key_values(query, vr), stored, vr, pn_case_insensitive=pn_case_insensitive)


class KeyValues:
    """The values of one (non-universal) key, parsed once for many stored values:
    ``exact`` is their set when every one is compared by equality alone (UI, or AE,
    AS, CS, LO, SH, UC without wild cards), so a long List of UID (§C.2.2.2.2) costs
    one look-up per stored value."""

    __slots__ = ("exact", "pure_wildcard", "values")

    def __init__(self, values: list[Any], vr: str):
        self.values = values
        self.pure_wildcard = _pure_wildcard(values, vr)
        self.exact: frozenset[str] | None = None
        if (
            vr in _EQUALITY_VRS
            and all(type(v) is str for v in values)
            and (vr in ("UI", "AS") or not any(_has_wildcard(v) for v in values))
        ):
            self.exact = frozenset(values)


def key_values(query: Any, vr: str) -> KeyValues:
    """A non-universal key's values for :func:`match_key_values`."""
    return KeyValues(_values(query, norm_vr(vr)), norm_vr(vr))


def match_key_values(keys: KeyValues, stored: Any, vr: str, *, pn_case_insensitive: bool = True) -> bool:
    """:func:`match_plain_value` of a key whose values :func:`key_values` parsed (for
    the same ``vr``)."""
    if not keys.values:  # only delimiters / padding: nothing to match on
        return True
    stored_values = _values(stored, vr)
    if not stored_values:
        return keys.pure_wildcard
    exact = keys.exact
    if exact is not None:
        return any(str(s) in exact if isinstance(s, str) else False for s in stored_values)
    return any(_match_single(k, s, vr, pn_case_insensitive) for k in keys.values for s in stored_values)
