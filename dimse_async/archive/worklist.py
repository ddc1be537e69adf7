"""Modality worklist served from a directory of worklist files (PS3.4 K)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..dataset_check import DataSetError, check_dataset
from ..log import get_logger
from ..part10 import read_file_meta
from ..services.qr import QueryRequest
from ..uids import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from .budget import QueryBudget
from .schema import check_key_vrs, with_default_repertoire

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = get_logger()


def _read_item(path: Path) -> Dataset:
    """A worklist file's item, once its data set has been walked to its end (PS3.5
    §7.1, §7.5; the check stored instances get): a truncated or garbage file is never
    served as an item with the values that happened to parse (pydicom's ``force``
    reads 200 zero bytes as an empty data set, which matches every query). A file
    without file meta is a bare data set in explicit or implicit VR little endian."""
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        if meta is not None:
            check_dataset(fp, meta.transfer_syntax, meta.dataset_offset, ordered=True)
        else:
            first: DataSetError | None = None
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                try:
                    check_dataset(fp, syntax, 0, ordered=True)
                    break
                except DataSetError as exc:
                    first = first or exc
            else:
                raise first or DataSetError("not a data set")
    import pydicom  # here: a server loads pydicom at its first data set, not at start

    ds = with_default_repertoire(pydicom.dcmread(path, force=True))
    if not any(elem.tag.group > 2 for elem in ds):
        raise DataSetError("no attributes")
    return ds


class Worklist:
    """Modality worklist items from ``*.wl`` / ``*.dcm`` files in a directory (PS3.4 K).

    Files are re-read when they change; one that does not parse to its end is skipped
    with a warning (once per version of the file, :func:`_read_item`); matching follows PS3.4 C.2.2.2 (with
    sequence matching on the Scheduled Procedure Step Sequence). A query stops with
    0xA700 past ``max_matches`` matches or ``time_budget`` seconds (PS3.4 K.4.1.1.4).
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_matches: int = 50_000, time_budget: float = 60.0):
        self.directory = Path(directory)
        self.max_matches = max_matches
        self.time_budget = time_budget
        self._cache: dict[str, tuple[float, Dataset | None]] = {}

    def _items(self, budget: QueryBudget | None = None) -> list[Dataset]:
        items = []
        present = set()
        for path in sorted(self.directory.glob("*")):
            if budget is not None and budget.expired():
                budget.timed_out()
            if path.suffix.lower() not in (".wl", ".dcm") or not path.is_file():
                continue
            key = str(path)
            present.add(key)
            mtime = path.stat().st_mtime
            cached = self._cache.get(key)
            if cached is None or cached[0] != mtime:
                try:
                    cached = (mtime, _read_item(path))
                except Exception as exc:  # warned once per version of the file
                    log.warning("worklist: skipping unreadable file", path=key, error=str(exc)[:200])
                    cached = (mtime, None)
                self._cache[key] = cached
            if cached[1] is not None:
                items.append(cached[1])
        for key in list(self._cache):
            if key not in present:
                del self._cache[key]
        return items

    async def on_c_find(self, request: QueryRequest) -> AsyncIterator[Dataset]:
        from .matching import Matcher, response_identifier  # here: matching loads pydicom

        check_key_vrs(with_default_repertoire(request.identifier))
        budget = QueryBudget(self.max_matches, self.time_budget, "worklist C-FIND")
        items = await asyncio.to_thread(self._items, budget)
        produced = 0
        matches = Matcher(request.identifier)  # the keys parsed once (a long list a set)
        for i, item in enumerate(items):
            if matches(item):
                produced += 1
                budget.check(produced)
                yield response_identifier(request.identifier, item)
            elif i % 256 == 255:  # a long list without matches: the budget, and the others
                budget.check(produced)
                await asyncio.sleep(0)
