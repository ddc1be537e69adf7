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
    is a Universal Match and returns the whole stored sequence. A key sequence
    "shall contain only a single Item": one of several items (at any depth) is no
    key, and :func:`match_value`, :func:`matches`, :class:`Matcher` and
    :func:`response_identifier` raise :class:`SequenceKeyError` (a ``ValueError``)
    for it, whatever the candidate; the archive's Query/Retrieve and worklist SCPs
    refuse such an identifier before matching (0xA900 naming the key,
    ``schema.check_key_vrs``).
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
  of the stored name only, unless it holds ideographic or phonetic (wide) characters,
  which no alphabetic group holds: then with every group (``山田*``); a key with ``=``
  is compared group by group, an empty key group matching any stored group
  (``=山田^太郎`` matches by the ideographic group alone). Empty trailing components (``Smith^John^^``)
  are not significant. Wild cards apply to the whole group string, so ``*`` and
  ``?`` may match ``^``. Case folding uses :meth:`str.casefold`; accents are
  significant.
* DA/TM/DT values of reduced precision denote a period: as a range lower bound the
  start of the period, as an upper bound its end (``"-1030"`` includes ``103059``,
  ``"2020-"`` in DT starts at 2020-01-01T00:00). Stored values are taken at the
  start of their period. Range Matching crossing midnight is not supported (as the
  standard says); a range whose lower end is after its upper end matches nothing
  (the archive's SCPs refuse such a key 0xA900, ``schema.check_key_vrs``).
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
  decoded Python strings pydicom produces. Nor is Timezone Offset From UTC
  (0008,0201), which is no key (§C.4.1.1.3.1): DA and TM keys are compared with the
  stored values as they are, not moved to another timezone.
"""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from .date_ranges import parse_range
from .value_matching import (
    WILDCARD_VRS,
    KeyValues,
    is_universal,
    key_values,
    match_key_values,
    match_plain_value,
    norm_vr,
    unwrap,
)

__all__ = [
    "DEFAULT_IGNORE",
    "WILDCARD_VRS",
    "Matcher",
    "SequenceKeyError",
    "is_universal",
    "match_value",
    "matches",
    "parse_range",
    "response_identifier",
]


#: Keywords present in an Identifier that are never matched (§C.2.2.2; PS3.4 §C.4.1.1.3.1):
#: Timezone Offset From UTC says in which timezone the date and time keys are, it is
#: not a key (and a candidate lacking it would never match).
DEFAULT_IGNORE: frozenset[str] = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"})


class SequenceKeyError(ValueError):
    """A key sequence of more than one item: PS3.4 §C.2.2.2.6 says a key sequence
    "shall contain only a single Item", so it is no key to match (a C-FIND SCP answers
    0xA900 naming it). ``keyword``: the sequence's keyword (or tag)."""

    def __init__(self, keyword: str, items: int):
        super().__init__(f"{keyword}: {items} items; a sequence key has a single item (PS3.4 C.2.2.2.6)")
        self.keyword = keyword
        self.items = items


def check_sequence_keys(query: Dataset, depth: int = 0) -> None:
    """Raise :class:`SequenceKeyError` for a key sequence of ``query`` (at any depth)
    with more than one item (PS3.4 §C.2.2.2.6)."""
    for elem in query:
        if elem.VR != "SQ" or elem.value is None:
            continue
        items = list(elem.value)
        if len(items) > 1:
            raise SequenceKeyError(elem.keyword or str(elem.tag), len(items))
        if items and isinstance(items[0], Dataset) and depth < _MAX_DEPTH:
            check_sequence_keys(items[0], depth + 1)


#: Sequence keys nested deeper than this are not looked into (a Dataset cannot hold
#: itself, but a hostile identifier can nest items deeply).
_MAX_DEPTH = 32


def _one_item(query: Any, name: str = "sequence key") -> list[Dataset]:
    """The items of a key sequence (none or one, checked as :func:`check_sequence_keys`)."""
    items = _items(query)
    if len(items) > 1:
        raise SequenceKeyError(name, len(items))
    if items:
        check_sequence_keys(items[0])
    return items


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
    * a zero-length stored value matches only universal keys and pure wild cards;
    * a sequence key (``vr="SQ"``) of more than one item raises
      :class:`SequenceKeyError` (§C.2.2.2.6: a single item).

    See the module documentation for the matching types and interpretation choices.
    """
    if norm_vr(vr) == "SQ":
        name = query.keyword if isinstance(query, DataElement) else "sequence key"
        if not _one_item(unwrap(query), name or "sequence key") or is_universal(unwrap(query)):
            return True
        return _match_sequence(unwrap(query), unwrap(stored), pn_case_insensitive)
    return match_plain_value(query, stored, vr, pn_case_insensitive=pn_case_insensitive)


# ---------------------------------------------------------------------------
# Datasets and sequences


def _items(value: Any) -> list[Dataset]:
    value = unwrap(value)
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
    vr = norm_vr(key.VR)
    if (vr == "UN" or " or " in str(key.VR)) and stored is not None:
        return norm_vr(stored.VR)
    return vr


def _match_sequence(query: Any, stored: Any, pn_case_insensitive: bool) -> bool:
    """Sequence Matching (§C.2.2.2.6) for a key sequence of one non-empty item
    (checked by the caller).

    All Item Key Attributes must match within one and the same stored item. An
    absent or empty stored sequence is treated as a single empty item, so only
    an item whose keys are all universal (or pure wild cards) matches it.
    """
    (key_item,) = _items(query)
    matcher = Matcher(key_item, ignore=frozenset(), pn_case_insensitive=pn_case_insensitive)
    return any(matcher(item) for item in _items(stored) or [Dataset()])


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
    Sequence keys use Sequence Matching (§C.2.2.2.6); one of more than one item
    raises :class:`SequenceKeyError`. For many candidates, build a :class:`Matcher`
    once instead.
    """
    return Matcher(query, ignore=ignore, pn_case_insensitive=pn_case_insensitive, unknown=unknown)(candidate)


class _Key:
    """One Key Attribute of a :class:`Matcher`, its values parsed once per VR (a key
    of VR UN, e.g. a list over 64 KiB sent in explicit VR, takes the stored one's)."""

    __slots__ = ("_parsed", "elem", "keyword", "tag", "universal")

    def __init__(self, elem: DataElement):
        self.elem = elem
        self.tag = elem.tag
        self.keyword = elem.keyword
        self.universal = is_universal(elem.value)
        self._parsed: dict[str, KeyValues] = {}

    def values(self, vr: str) -> KeyValues:
        parsed = self._parsed.get(vr)
        if parsed is None:
            parsed = self._parsed[vr] = key_values(self.elem.value, vr)
        return parsed


class Matcher:
    """:func:`matches` for one request Identifier and many candidates: each key's
    values are parsed once (a set for List of UID Matching, PS3.4 C.2.2.2.2, and for
    other keys compared by equality), so a candidate costs about one look-up per key
    however many values a key lists, instead of the whole list split and compared
    again for each candidate. A sequence key of more than one item (at any depth)
    raises :class:`SequenceKeyError` here (§C.2.2.2.6), before any candidate."""

    __slots__ = ("_keys", "_pn_case_insensitive", "_unknown")

    def __init__(
        self,
        query: Dataset,
        *,
        ignore: frozenset[str] = DEFAULT_IGNORE,
        pn_case_insensitive: bool = True,
        unknown: Container[str] = frozenset(),
    ):
        self._keys = [_Key(elem) for elem in query if _is_key(elem, ignore)]
        for key in self._keys:
            if key.elem.VR == "SQ":
                _one_item(key.elem.value, key.keyword or str(key.tag))
        self._pn_case_insensitive = pn_case_insensitive
        self._unknown = unknown

    def __call__(self, candidate: Dataset) -> bool:
        pn = self._pn_case_insensitive
        for key in self._keys:
            stored = candidate.get(key.tag)
            stored_value = stored.value if stored is not None else None
            if key.keyword in self._unknown and is_universal(stored_value):
                continue  # an unknown value of a Required key matches any key value (C.2.2.1.2)
            if key.universal:
                continue
            vr = _key_vr(key.elem, stored)
            if vr == "SQ":
                if not match_value(key.elem.value, stored_value, vr, pn_case_insensitive=pn):
                    return False
            elif not match_key_values(key.values(vr), stored_value, vr, pn_case_insensitive=pn):
                return False
        return True


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
        if top and key.keyword == "TimezoneOffsetFromUTC" and tag not in candidate:
            continue  # never zero length (PS3.4 C.4.1.1.3.2): the candidate's, when it has one
        stored = candidate.get(tag)
        if key.VR != "SQ" or (stored is not None and stored.VR != "SQ"):
            out.add(copy.deepcopy(stored) if stored is not None else _empty_element(key))
            continue
        if is_universal(key.value):
            # "request that ... the entire Sequence of Items be returned" (§C.2.2.2.6)
            out.add(copy.deepcopy(stored) if stored is not None else _empty_element(key))
            continue
        (key_item,) = _one_item(key.value, key.keyword or str(tag))
        matcher = Matcher(key_item, ignore=frozenset(), pn_case_insensitive=pn_case_insensitive)
        items = [
            _project(key_item, item, pn_case_insensitive, top=False)
            for item in _items(stored.value if stored is not None else None)
            if matcher(item)
        ]
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
    each reduced to the item keys (recursively); a key sequence of more than one item
    raises :class:`SequenceKeyError`. Group 0x0002 elements are dropped.
    """
    check_sequence_keys(query)
    return _project(query, candidate, pn_case_insensitive, top=True)
