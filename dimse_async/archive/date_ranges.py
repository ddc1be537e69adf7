"""DA, TM and DT values as periods, and Range Matching (PS3.4 §C.2.2.2.5).

Values of reduced precision denote a period (PS3.5 §6.2); a key's lower bound is
the start of its period, its upper bound the end. See :mod:`dimse_async.archive.matching`
for the interpretation choices (DT offsets, ACR-NEMA forms).
"""

from __future__ import annotations

import calendar
import datetime
import re
from typing import Any

__all__ = ["da_days", "index_date", "key_problem", "parse_range", "range_match", "valid_key"]

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


def _yyyymmdd(ordinal: int) -> str:
    day = datetime.date.fromordinal(ordinal)
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def da_days(text: str) -> tuple[str, str] | None:
    """The first and last day (``YYYYMMDD``) of the period a DA value denotes, as the
    matcher reads it (a year or a month: its days; ``YYYY.MM.DD``: that day; PS3.5
    §6.2, PS3.4 §C.2.2.2.1); ``None`` when it is no date."""
    period = _parse_da(text.strip(" \x00"))
    return None if period is None else (_yyyymmdd(period.start), _yyyymmdd(period.end))


def index_date(stored: str) -> str:
    """A stored DA value as the index compares it (its Study Date column): the first
    day of its period as ``YYYYMMDD`` - the point the matcher compares (:func:`range_match`),
    so that a range of ``YYYYMMDD`` bounds compared as text narrows to exactly what the
    matcher then matches. The ACR-NEMA form ``1993.02.15`` becomes ``19930215``;
    padding is dropped. ``""`` (never narrowed away) for an unknown value, several
    values (any may match, PS3.4 §C.2.2.3) or a value that is no date."""
    values = [v for v in (v.strip(" \x00") for v in stored.split("\\")) if v]
    if len(values) != 1:
        return ""
    days = da_days(values[0])
    return "" if days is None else days[0]


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

    is_dt = vr.split(" or ")[0].strip().upper() == "DT" if vr else False
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


def range_match(key: str, stored: str, vr: str) -> bool:
    """A DA/TM/DT key, single value or range (PS3.4 §C.2.2.2.1, §C.2.2.2.5), against a stored value."""
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


def valid_key(key: str, vr: str) -> bool:
    """Whether a DA, TM or DT key value (one of a list) is a value of its VR, of
    reduced precision or not, or a range of such values (PS3.4 §C.2.2.2.1, §C.2.2.2.5;
    an empty one is universal); see :func:`key_problem`."""
    return key_problem(key, vr) is None


def key_problem(key: str, vr: str) -> str | None:
    """What makes a DA, TM or DT key value (one of a list) no key of its VR, or
    ``None`` when it is one: a value of the VR, of reduced precision or not, or a
    range of such values whose lower end is not after its upper end (PS3.4
    §C.2.2.2.1, §C.2.2.2.5: "<date1> - <date2>, where <date1> is less or equal to
    <date2>"; for TM "Range Matching crossing midnight is not supported"). An empty
    value is universal. The ends are compared as the matcher compares them: the start
    of the lower end's period with the end of the upper's (``2020-2020``, ``2020-202001``
    are ranges), DT readings in UTC when both carry an offset."""
    parse = _PARSERS[vr]
    text = key.strip(" \x00")
    if not text:
        return None
    bounds = parse_range(text, vr)
    if bounds is None:
        return None if parse(text) is not None else f"not a {vr} value or range"
    lower, upper = (parse(end) if end is not None else None for end in bounds)
    if (bounds[0] is not None and lower is None) or (bounds[1] is not None and upper is None):
        return f"not a {vr} value or range"
    if lower is not None and upper is not None and not _le(lower.start, lower.offset, upper.end, upper.offset):
        return "range crosses midnight" if vr == "TM" else "lower end after upper end"
    return None
