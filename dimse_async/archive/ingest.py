"""The C-STORE path of the archive (PS3.4 B.2.3): checking a received data set,
the duplicate policy, a per-instance lock across processes, fsync, undo of a store
whose indexing failed, 0xA700 with its reason, and indexing / re-indexing files."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import io
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from ..dataset_check import (
    BudgetExceeded,
    DataSetError,
    DataSetSummary,
    check_dataset_bytes,
    check_part10,
    same_dataset,
)
from ..dimse import Status
from ..inflate import DEFAULT_LIMITS, CorruptDeflate, InflationLimit, InflationLimits, check_deflated
from ..part10 import plausible_uid, read_file_meta, valid_uid
from ..services.storage import StoreRequest
from ..space import StorageSpace, log_store_refusal
from .backend import HierarchyConflict, IndexRow
from .date_ranges import index_date
from .db import IndexDB, log
from .schema import (
    INDEX_TAGS,
    IndexingError,
    dataset_of_kept,
    level_attrs,
    name_key,
    patient_key_of,
    tag_of,
    text_of,
    with_default_repertoire,
)


def _check_inflation(fp: Any, limits: InflationLimits) -> None:
    """Refuse a deflated data set that would inflate past ``limits`` (a deflate bomb),
    measured by streaming it, before anything decodes it whole (PS3.5 A.5)."""
    meta = read_file_meta(fp)
    if meta is not None and meta.transfer_syntax == _DEFLATED_LE:
        check_deflated(fp, meta.dataset_offset, limits)
    fp.seek(0)


_DEFLATED_LE = "1.2.840.10008.1.2.1.99"
# Offending Element (0000,0901) of a refused C-STORE (PS3.4 Table B.2-1): the data
# set's UIDs, or the command's (PS3.7 Table 9.3-1).
_SOP_CLASS_UID, _SOP_INSTANCE_UID = 0x00080016, 0x00080018
_AFFECTED_SOP_CLASS_UID, _AFFECTED_SOP_INSTANCE_UID = 0x00000002, 0x00001000

#: Elements, items and fragments a received data set held in memory may have for its
#: check to run on the event loop (a few milliseconds at most; real instances have a
#: few hundred to a few thousand); one cut into more tiny pieces is walked on a thread.
IN_PLACE_BUDGET = 5000

#: With an index shared by several nodes, start-up removes interrupted stores'
#: leftovers only once they are this old (seconds): younger ones may be in use.
LEFTOVER_AGE = 3600.0


async def _check_request(request: StoreRequest, limits: InflationLimits = DEFAULT_LIMITS) -> DataSetSummary:
    """Parse the received data set to its end (off the loop when it is large), keeping
    the raw values of the elements the index needs (:data:`.schema.INDEX_TAGS`): the
    one pass over the data set a store makes. Its elements must ascend in each data set
    and item (PS3.5 §7.1): of a repeated one, the index (pydicom) would read the last
    copy and DCMTK the first."""

    def check() -> DataSetSummary:
        with request.open() as fp:
            _meta_as_written(read_file_meta(fp), request)
            _check_inflation(fp, limits)
            return check_part10(fp, INDEX_TAGS, ordered=True, max_elements=limits.max_elements)

    if request.spool.path is None and request.size < (1 << 20):
        data = request.spool.memory()
        meta = read_file_meta(io.BytesIO(data))
        _meta_as_written(meta, request)
        if meta is not None and meta.transfer_syntax != _DEFLATED_LE:  # walked in place, header by header
            walk = functools.partial(
                check_dataset_bytes,
                data[meta.dataset_offset :],
                meta.transfer_syntax,
                INDEX_TAGS,
                ordered=True,
                max_elements=limits.max_elements,
            )
            try:
                return walk(budget=IN_PLACE_BUDGET)
            except BudgetExceeded:  # many tiny elements, items or fragments: not on the event loop
                return await asyncio.to_thread(walk)
    # Large, or deflated: a few KB may inflate to 200 times as much to walk (PS3.5 A.5).
    return await asyncio.to_thread(check)


def _meta_as_written(meta: Any, request: StoreRequest) -> None:
    """The file meta read back from the received instance ends where the one written
    for it ends. A data set that begins with group 0002 elements (never in a data set,
    PS3.10 §7.2) would have them read as file meta, here and by pydicom (DCMTK goes by
    the group length): another transfer syntax or instance named, elements dropped."""
    if meta is None or meta.dataset_offset != request.spool.header_length:
        raise DataSetError("data set holds file meta elements (0002,eeee)")


def _dataset_part(fp: Any) -> tuple[str, int] | None:
    meta = read_file_meta(fp)
    if meta is None:
        return None
    fp.seek(meta.dataset_offset)
    return meta.transfer_syntax, meta.dataset_offset


#: A stored instance and a re-send of it in another encoding are compared element by
#: element (:func:`.same_dataset`, linear, bounded memory) only up to this many bytes
#: (each) and elements: past them the cost is not worth it and the re-send is refused
#: as a different data set, as any sender changing its instance would be.
SAME_INSTANCE_COMPARE_BYTES = 256 << 20
SAME_INSTANCE_COMPARE_ELEMENTS = 500_000


def _same_instance(stored: str, request: StoreRequest) -> str | None:
    """Whether the stored file holds the received data set: ``"identical"`` (byte for
    byte, same syntax), ``"equivalent"`` (the same elements and values in another
    encoding: another uncompressed syntax, little or big endian, deflated or not, or
    sequence lengths, group lengths or padding written otherwise), else ``None``."""
    with open(stored, "rb") as a, request.open() as b:
        pa, pb = _dataset_part(a), _dataset_part(b)
        if pa is None or pb is None:
            return None
        if pa[0] == pb[0]:
            while True:
                x, y = a.read(1 << 20), b.read(1 << 20)
                if x != y:
                    break
                if not x:
                    return "identical"
        if max(os.fstat(a.fileno()).st_size, request.size) > SAME_INSTANCE_COMPARE_BYTES:
            return None
        same = same_dataset(a, pa[0], pa[1], b, pb[0], pb[1], SAME_INSTANCE_COMPARE_ELEMENTS)
        return "equivalent" if same else None


_HIERARCHY_UIDS = (
    ("SOPInstanceUID", _SOP_INSTANCE_UID),
    ("StudyInstanceUID", 0x0020000D),
    ("SeriesInstanceUID", 0x0020000E),
)


def _warn_nonconformant_uids(request: StoreRequest, summary: DataSetSummary) -> None:
    """One warning line per instance naming each of its UIDs (SOP Instance, Study,
    Series) that PS3.5 §9.1 forbids but that is stored all the same: a component with a
    leading zero (``1.2.03``), as some devices generate. Refusing it would lose the image
    (DCMTK's storescp and Orthanc store it); it is found and retrieved by that UID."""
    odd: dict[str, str] = {}
    for keyword, tag in _HIERARCHY_UIDS:
        if tag == _SOP_INSTANCE_UID:
            uid = summary.sop_instance_uid
        else:
            raw = summary.kept.get(tag)
            uid = "" if raw is None else raw[1].decode("latin-1").strip(" \x00")
        if uid and not valid_uid(uid) and plausible_uid(uid):
            odd[keyword] = uid
    if odd:
        request.assoc.log.warning(
            "C-STORE UIDs not conformant (PS3.5 9.1: leading zero in a component); stored as received",
            sop_instance=summary.sop_instance_uid, **odd,
        )  # fmt: skip


def _keep_previous(dest: str) -> str | None:
    """Hard-link a file about to be replaced to ``<dest>.old`` (restored if indexing fails)."""
    if not os.path.exists(dest):
        return None
    old = f"{dest}.old"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(old)
    try:
        os.link(dest, old)
    except OSError:  # a file system without hard links
        shutil.copyfile(dest, old)
    return old


def _files_before_store(existing: tuple[str, int] | None, dest: str) -> tuple[tuple[str, int] | None, str | None]:
    """(the stored copy, if its file is there at the size it was stored at; else the
    hard link of a file about to be replaced). A copy cut short behind the archive's
    back is not kept against the same instance sent again: the new one replaces it."""
    if existing is not None:
        try:
            size = os.stat(existing[0]).st_size
        except FileNotFoundError:
            size = None
        if size is not None and (existing[1] is None or size == existing[1]):
            return existing, None
        if size is not None:
            log.warning("archive: stored file damaged, replaced by the new copy", path=existing[0],
                        size=size, stored_size=existing[1])  # fmt: skip
    return None, _keep_previous(dest)


def _out_of_resources(request: StoreRequest, exc: BaseException) -> Status:
    """0xA700 with the true reason: disk full, read-only, too many open files, a locked index."""
    if isinstance(exc, OSError):
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
    else:
        reason = f"index: {exc}"
    log_store_refusal(request, str(exc))
    return Status(0xA700, f"Out of resources: {reason}"[:64])


def _log_not_indexed(path: str, exc: BaseException) -> None:
    """The re-index's warning line for a file it leaves out, naming the true reason: a
    data set that does not parse (or inflates past the limits) is unreadable; one that
    parses but has no place in the Q/R hierarchy (no Study, Series or SOP Instance UID,
    a UID that is none) or conflicts with what the index holds (its series under
    another study, its study another patient's: a UID names one entity, PS3.3 A.1.2)
    is readable, and said to be so."""
    reason = str(exc)[:200]
    if isinstance(exc, HierarchyConflict):
        log.warning(
            "archive: re-index: file not indexed: conflicts with the stored hierarchy", path=path, reason=reason
        )
    elif isinstance(exc, IndexingError):
        log.warning("archive: re-index: file not indexed: no place in the Q/R hierarchy", path=path, reason=reason)
    else:
        log.warning("archive: skipping unreadable file", path=path, error=reason)


class IngestMixin(IndexDB):
    """Storing and indexing files (see the module)."""

    #: Set when the caller of :meth:`reindex` was cancelled: the pass stops before the next file.
    _reindex_stop: threading.Event | None = None
    #: Bytes the storage's file system must keep available (``statvfs`` ``f_bavail``):
    #: below it every C-STORE is refused 0xA700 "storage full" before its data set is
    #: checked or written, and :meth:`probe` (``/healthz``) says so; 0: never refused
    #: for space (stores then fail only when a write does, ENOSPC). A read-only file
    #: system is refused and reported the same way.
    min_free_space: int = 0
    _space: StorageSpace | None = None

    def _storage_space(self) -> StorageSpace:
        space = self._space
        if space is None:
            space = self._space = StorageSpace(self.root)
        space.min_free_space = self.min_free_space
        return space

    @property
    def storage_space(self) -> StorageSpace:
        """The storage's file system (:class:`~dimse_async.space.StorageSpace`, with
        :attr:`min_free_space`): what a store is refused by when its command arrives."""
        return self._storage_space()

    def storage_problem(self) -> tuple[str, str] | None:
        """Why every store would be refused for the storage itself, or ``None``
        (:meth:`~dimse_async.space.StorageSpace.problem`: read-only, or below
        :attr:`min_free_space`)."""
        return self._storage_space().problem()

    async def probe(self, timeout: float = 5.0) -> str | None:
        """``None`` while stores can succeed, else why not (for ``/healthz``): the
        storage is read-only or full (below :attr:`min_free_space`), or the index does
        not answer."""
        problem = await self._storage_space().probe(timeout)
        if problem is not None:
            return problem
        return await super().probe(timeout)

    def _index_file(self, path: str) -> str:
        import pydicom  # noqa: F401 - first imported outside catch_warnings: the filters its import adds stay

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's value warnings: the file is stored as received
            return self._index_file_quietly(path)

    def _index_file_quietly(self, path: str) -> str:
        return self.backend.retry(lambda: self._index_file_once(path))

    def _index_file_once(self, path: str) -> str:
        import pydicom  # here: a server whose archive needs no re-index loads no pydicom at start

        st = os.stat(path)
        ds = with_default_repertoire(pydicom.dcmread(path, stop_before_pixels=True))
        meta = ds.file_meta
        sop_uid = text_of(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID"))
        row = self._index_row(
            path, st, ds, sop_uid, text_of(meta.get("MediaStorageSOPClassUID")), text_of(meta.get("TransferSyntaxUID"))
        )
        self.backend.write_index(self.connection(), row)
        return sop_uid

    def _stored_rows(self, path: str, summary: DataSetSummary) -> IndexRow:
        """The index rows of a file just stored, from the values its check kept (no
        second parse); on a writer thread."""
        import pydicom  # noqa: F401 - first imported outside catch_warnings: the filters its import adds stay

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's value warnings: the file is stored as received
            st = os.stat(path)
            ds = dataset_of_kept(summary.kept, summary.transfer_syntax)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
                if "\\" in text_of(ds.get(keyword)):
                    # VM 1 (PS3.3 C.7.1.1, C.7.2.1, C.7.3.1; a backslash separates values,
                    # PS3.5 6.2): no query key can name it (it reads as a list, PS3.4
                    # C.2.2.2.2), so no retrieve by it or below it could reach the instance.
                    # Refused when received; files already stored are indexed as they are.
                    raise IndexingError(f"{keyword} holds several values", (tag_of(keyword),))
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
                value = text_of(ds.get(keyword))
                if any(c in value for c in "*?"):
                    # Not in a UID (PS3.5 9.1), and no key may hold them (no wild cards in
                    # UI, PS3.4 C.2.2.2.4; a retrieve's unique keys hold none, C.4.2.2.1):
                    # nothing could find or retrieve the instance by it.
                    raise IndexingError(f"{keyword} holds a wild card", (tag_of(keyword),))
                if value.strip(" \x00") and not plausible_uid(value.strip(" \x00")):
                    # Letters, separators, empty components, over 64 characters: no UID
                    # (PS3.5 9.1); a leading zero in a component is tolerated.
                    raise IndexingError(f"{keyword} is not a UID", (tag_of(keyword),))
            return self._index_row(
                path, st, ds, summary.sop_instance_uid, summary.sop_class_uid, summary.transfer_syntax
            )

    @staticmethod
    def _index_row(
        path: str, st: os.stat_result, ds: Any, sop_uid: str, sop_class: str, transfer_syntax: str
    ) -> IndexRow:
        """The index rows of one stored file (written by :meth:`.Backend.write_index`)."""
        study_uid, series_uid = text_of(ds.get("StudyInstanceUID")), text_of(ds.get("SeriesInstanceUID"))
        if not (sop_uid and study_uid and series_uid):
            missing = [tag for tag, uid in ((0x0020000D, study_uid), (0x0020000E, series_uid),
                                            (_SOP_INSTANCE_UID, sop_uid)) if not uid]  # fmt: skip
            raise IndexingError("missing Study, Series or SOP Instance UID", tuple(missing))
        patient = level_attrs(ds, "PATIENT")
        study = level_attrs(ds, "STUDY")
        series = level_attrs(ds, "SERIES")
        image = level_attrs(ds, "IMAGE")
        image.setdefault("SOPClassUID", sop_class)
        # The columns a query narrows by in SQL hold the values without their padding
        # (LO, SH, CS, DA "may be padded with leading and/or trailing spaces", PS3.5
        # Table 6.2-1; not significant in matching, PS3.4 C.2.2.2.1), as the keys are
        # compared: a Patient ID " P1" is found by "P1". The attributes keep them as stored.
        return IndexRow(
            patient_key_of(patient, study_uid),
            patient.get("PatientID", "").strip(" "),
            json.dumps(patient),
            name_key(patient.get("PatientName", "")),
            study_uid,
            index_date(study.get("StudyDate", "")),  # as the C-FIND prefilter compares it
            study.get("AccessionNumber", "").strip(" "),
            json.dumps(study),
            series_uid,
            series.get("Modality", "").strip(" "),
            json.dumps(series),
            sop_uid,
            image["SOPClassUID"],
            transfer_syntax,
            path,
            st.st_size,
            st.st_mtime,
            json.dumps(image),
        )

    async def index_file(self, path: str | os.PathLike[str]) -> str:
        """Index one Part 10 file (after it was stored); returns its SOP Instance UID."""
        return await self.in_index_thread(self._index_file, os.fspath(path))

    def _clean_leftovers(self) -> int:
        """Remove what an interrupted store leaves behind: spools (``.partial``) and the
        previous version kept while a replacement was indexed (``.dcm.old``). With an
        index shared by several nodes, other nodes may be storing right now: only
        leftovers untouched for :data:`LEFTOVER_AGE` seconds go."""
        removed = 0
        cutoff = time.time() - LEFTOVER_AGE if self.backend.multi_node else None
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if name.endswith((".partial", ".dcm.old")):
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        if cutoff is not None and os.stat(path).st_mtime > cutoff:
                            continue
                        os.unlink(path)
                        removed += 1
        return removed

    def _reindex(self) -> tuple[int, int, int]:
        db = self.connection()
        # One re-index at a time across the processes and nodes sharing the index. The
        # files are the truth and a re-index interrupted is simply redone: no flush per
        # file while catching up.
        with self.backend.exclusive("reindex"), self.backend.bulk(db):
            self._clean_leftovers()
            return self._reindex_files(db)

    def _reindex_files(self, db: Any) -> tuple[int, int, int]:
        """Index the files not indexed as they are: new ones, and those whose size or
        time changed, oldest first (file modification time): a patient's, study's or
        series' attributes are those of its first instance stored, supplemented by the
        later ones (:func:`.backend.write_index_rows`), as the live archive decided them,
        whatever order the directory walk meets the files in. A file shorter than the
        index's record of it that still names the instance, study and series recorded
        was cut after it was stored (damage, a crash of a store without ``fsync``): its
        data set may end at an element boundary and parse as complete, so it is not
        indexed again; its record stays (a retrieve fails it, a C-FIND says UNAVAILABLE)
        and a warning line names it. A file rewritten (other UIDs, or longer) is indexed
        as it is now, with a warning line when its size changed."""
        known = {row[0]: (row[1], row[2]) for row in db.execute("SELECT path, size, mtime FROM instances")}
        added = skipped = 0
        seen = set()
        changed: list[tuple[float, str, int, int | None]] = []  # (mtime, path, size, size recorded)
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.endswith(".dcm"):
                    continue
                if self._reindex_stop is not None and self._reindex_stop.is_set():
                    log.warning("archive: re-index stopped", added=added, skipped=skipped)
                    return added, skipped, 0  # what was not seen is not gone
                path = os.path.join(dirpath, name)
                seen.add(path)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                record = known.get(path)
                if record == (st.st_size, st.st_mtime):
                    continue
                changed.append((st.st_mtime, path, st.st_size, record[0] if record is not None else None))
        changed.sort()
        for _mtime, path, size, stored_size in changed:
            if self._reindex_stop is not None and self._reindex_stop.is_set():
                log.warning("archive: re-index stopped", added=added, skipped=skipped)
                return added, skipped, 0
            try:
                with open(path, "rb") as fp:
                    _check_inflation(fp, self.inflation_limits)
                    check_part10(fp, max_elements=self.inflation_limits.max_elements)
                if stored_size is not None and size != stored_size:
                    if size < stored_size and self._names_as_recorded(db, path):
                        skipped += 1
                        log.warning("archive: re-index: stored file shorter than when stored; not indexed, "
                                    "its instance unavailable until stored again", path=path, size=size,
                                    stored_size=stored_size)  # fmt: skip
                        continue
                    log.warning("archive: re-index: stored file changed size since stored; indexed as it is now",
                                path=path, size=size, stored_size=stored_size)  # fmt: skip
                self._index_file(path)
                added += 1
            except FileNotFoundError:
                continue  # gone meanwhile (its row, if any, is dropped below)
            except self.resource_errors:
                raise
            except Exception as exc:
                skipped += 1
                _log_not_indexed(path, exc)
        # A row whose file is gone is dropped, unless the file came back meanwhile (another
        # node storing it again): only the very row seen, at the moment it is still missing.
        # The series, studies and patients left without instances go with them (see
        # :func:`.backend.drop_emptied`: each only if still empty, in its transaction).
        gone = [(p, *known[p]) for p in known if p not in seen and not os.path.exists(p)]
        series: dict[str, None] = {}
        with db:
            for path, size, mtime in gone:
                for (uid,) in db.execute(
                    "DELETE FROM instances WHERE path = ? AND size = ? AND mtime = ? RETURNING series_uid",
                    (path, size, mtime),
                ).fetchall():
                    series[uid] = None
            if series:
                self.backend.drop_emptied(db, list(series))
        return added, skipped, len(gone)

    @staticmethod
    def _names_as_recorded(db: Any, path: str) -> bool:
        """Whether the file at ``path`` names the SOP Instance, Study and Series UIDs its
        index row records: what a file cut short keeps (they come early in a data set),
        and a file rewritten for another instance, study or series does not."""
        import pydicom

        row = db.execute(
            "SELECT i.sop_uid, se.study_uid, i.series_uid FROM instances i "
            "JOIN series se ON se.series_uid = i.series_uid WHERE i.path = ?",
            (path,),
        ).fetchone()
        if row is None:
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
            )
        named = (text_of(ds.get(k)).strip(" \x00") for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))
        return tuple(named) == tuple(str(v).strip(" \x00") for v in row)

    async def reindex(self) -> tuple[int, int, int]:
        """Incremental re-index: (files added or changed, files not indexed, files gone).

        Leftovers of interrupted stores are removed first; a file is indexed only
        when its data set parses to its end and fits the hierarchy the index holds (a
        warning line names each file left out and why, see :func:`_log_not_indexed`). Cancelling the caller stops the pass before
        its next file (what was indexed stays; the next pass goes on from there)."""
        stop = self._reindex_stop = threading.Event()
        try:
            return await self.in_index_thread(self._reindex)
        except asyncio.CancelledError:
            stop.set()
            raise

    # -- storing ------------------------------------------------------------------

    def path_for(self, sop_instance_uid: str) -> Path:
        """Where the instance's file is: the UID (PS3.5 §9.1's characters, leading
        zeros tolerated: :func:`~dimse_async.part10.plausible_uid`) is its name."""
        if not plausible_uid(sop_instance_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_instance_uid[:70]!r}")
        # Two levels of fan-out keep directories small with 10^5..10^7 files.
        digest = sop_instance_uid[-4:].replace(".", "0")
        return self.root / digest[:2] / digest[2:] / f"{sop_instance_uid}.dcm"

    async def on_c_store(self, request: StoreRequest) -> Status:
        """C-STORE handler (PS3.4 B.2.3): check, then store and index together.

        The data set must parse to its end (else 0xC000) and carry the command's SOP
        Class and Instance UIDs (else 0xA900). An instance already stored is kept or
        replaced according to :attr:`duplicates`. The file is moved into place and then
        indexed; if indexing fails the previous state is restored and the answer is
        0xA700 (out of resources, with the reason) or 0xA900. A success is answered
        only when the file and its index row are both committed. A9xx and Cxxx name
        the element at fault as Offending Element (0000,0901) where it is known (PS3.4
        Table B.2-1).
        """
        uid = request.sop_instance_uid
        try:
            path = self.path_for(uid)
        except ValueError as exc:
            return Status(0xC000, str(exc)[:64], attributes=[_AFFECTED_SOP_INSTANCE_UID])
        if not valid_uid(request.sop_class_uid):
            return Status(0xC000, "invalid SOP Class UID", attributes=[_AFFECTED_SOP_CLASS_UID])
        refusal = self._storage_space().refusal(request)
        if refusal is not None:  # (PS3.4 B.2.3: refused, nothing stored)
            return refusal
        try:
            summary = await _check_request(request, self.inflation_limits)
        except (DataSetError, InflationLimit, CorruptDeflate) as exc:
            request.assoc.log.warning("C-STORE data set refused", sop_instance=uid, error=str(exc))
            tag = exc.tag if isinstance(exc, DataSetError) else None
            return Status(0xC000, f"Cannot understand: {exc}"[:64], attributes=() if tag is None else [tag])
        _warn_nonconformant_uids(request, summary)
        if summary.sop_instance_uid != uid or summary.sop_class_uid != request.sop_class_uid:
            request.assoc.log.warning(
                "C-STORE UIDs differ from the data set's",
                sop_instance=uid,
                dataset_instance=summary.sop_instance_uid,
                sop_class=request.sop_class_uid,
                dataset_class=summary.sop_class_uid,
            )
            what, tag = (
                ("Instance", _SOP_INSTANCE_UID) if summary.sop_instance_uid != uid else ("Class", _SOP_CLASS_UID)
            )
            return Status(0xA900, f"Data set SOP {what} UID differs from the command's"[:64], attributes=[tag])
        # One store at a time per SOP Instance UID; the entry lives while someone uses it.
        entry = self._locks.setdefault(uid, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            # and across processes and nodes
            async with entry[0], self.backend.instance_lock(uid, find=self.duplicates == "keep") as held:
                return await self._store_locked(request, path, summary, held)
        except self.backend.errors as exc:  # the lock could not be had (the index unreachable)
            return _out_of_resources(request, exc)
        finally:
            entry[1] -= 1
            if not entry[1]:
                self._locks.pop(uid, None)

    async def _store_locked(self, request: StoreRequest, path: Path, summary: DataSetSummary, held: Any) -> Status:
        uid = request.sop_instance_uid
        dest = os.fspath(path)
        try:
            if held is None:  # the look-up on a writer thread
                existing, old = await self.in_index_thread(self._before_store, uid, dest)
            else:  # looked up with the lock
                existing, old = await asyncio.to_thread(_files_before_store, held.existing, dest)
        except self.resource_errors as exc:
            return _out_of_resources(request, exc)
        if existing is not None:
            same = await asyncio.to_thread(_same_instance, existing[0], request)
            if same == "equivalent":  # a retry or a router's conversion: stored intact, findable
                request.assoc.log.info("duplicate SOP Instance UID: same data set in another encoding; "
                                       "stored instance kept", sop_instance=uid)  # fmt: skip
            if same:
                return Status(0)
            request.assoc.log.warning("duplicate SOP Instance UID: stored instance kept", sop_instance=uid)
            return Status(0xA900, "Duplicate SOP Instance UID; stored instance kept", attributes=[_SOP_INSTANCE_UID])
        # From here the store runs to its end (the file placed and indexed, or undone)
        # even when the association ends meanwhile and cancels this handler: the file
        # work goes on in the writer thread regardless, and only the store itself can
        # index what it placed or put back what it replaced.
        placing = asyncio.ensure_future(self._place(request, dest, summary, held, old))
        try:
            return await asyncio.shield(placing)
        except asyncio.CancelledError:
            while not placing.done():  # still holding the instance's lock
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(placing)
            status = placing.result()
            request.assoc.log.info("C-STORE finished after the association ended", sop_instance=uid,
                                   status=f"0x{int(status):04X}")  # fmt: skip
            raise

    async def _place(
        self, request: StoreRequest, dest: str, summary: DataSetSummary, held: Any, old: str | None
    ) -> Status:
        """Move the checked instance into place and index it; on failure put back what
        was there (``old``) and answer 0xA700 or 0xA900."""
        uid = request.sop_instance_uid
        try:
            await request.save(dest, durable=self.fsync)  # fsync of file and directory (group commit)
        except OSError as exc:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.replace(old, dest)
            return _out_of_resources(request, exc)
        make = functools.partial(self._stored_rows, dest, summary)
        try:
            if held is None:
                await self.commit_write(make)
            else:  # on the lock's connection; unlocked at once unless a previous file is still to go
                await held.write_index(make, unlock=old is None)
        except Exception as exc:
            await asyncio.to_thread(self._undo_store, dest, old, request)
            request.assoc.note_error("index")
            if isinstance(exc, self.resource_errors):
                return _out_of_resources(request, exc)
            request.assoc.log.warning("C-STORE data set cannot be indexed", sop_instance=uid, error=str(exc)[:200])
            return Status(0xA900, f"Cannot index: {exc}"[:64], attributes=getattr(exc, "tags", ()))
        if old is not None:
            with contextlib.suppress(OSError):
                os.unlink(old)
        return Status(0)

    def _before_store(self, uid: str, dest: str) -> tuple[tuple[str, int] | None, str | None]:
        """One hop to a writer thread before a store: (the stored copy kept by the
        ``keep`` policy, if any; else the hard link of a file about to be replaced)."""
        return _files_before_store(self._stored(uid) if self.duplicates == "keep" else None, dest)

    @staticmethod
    def _undo_store(dest: str, old: str | None, request: StoreRequest) -> None:
        """Put back the file that was there before a store whose indexing failed. The
        index needs nothing: its transaction rolled back, so its row (if any) still
        describes the previous file, whose size and time come back with it."""
        try:
            if old is not None:
                os.replace(old, dest)
            else:
                os.unlink(dest)
        except OSError as exc:  # the re-index at the next start repairs what is left
            request.assoc.log.error("cannot undo a failed store", path=dest, error=str(exc)[:200])

    # -- querying -----------------------------------------------------------------
