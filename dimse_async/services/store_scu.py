"""Storage service class, SCU side (PS3.4 Annex B, PS3.7 §9.1.1): C-STORE requests
from files prepared in worker threads (small data sets read whole, large ones streamed
in pieces read ahead), from decoded data sets, or transcoded to an accepted syntax."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, BinaryIO

from ..acse import PresentationContext
from ..dataset_check import NO_LIMIT, DataSetError, check_dataset, check_dataset_bytes, dataset_uids
from ..dimse import Command, CommandField, affected_mismatch
from ..exceptions import DIMSEFailure, NoAcceptedContext
from ..interface import DIMSEProvider
from ..lazy_dataclass import dataclass
from ..part10 import FileMeta, file_meta_from_bytes, read_file_meta
from ..status import Status, response_status
from ..uids import UNCOMPRESSED_TRANSFER_SYNTAXES, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, uid_name

if TYPE_CHECKING:  # pydicom is loaded only where a data set is decoded or encoded
    from pydicom.dataset import Dataset

__all__ = ["READ_WHOLE", "PreparedFile", "c_store", "prepare_file"]


#: Data sets up to this size are read whole (in a worker thread) before they are sent;
#: larger ones are streamed from their file in pieces read ahead in a worker thread.
READ_WHOLE = 4 << 20
#: :func:`c_store` from a path (a C-GET / C-MOVE sub-operation) streams data sets larger
#: than this: a peer that stops reading holds at most about this much of the file in
#: memory besides what its transport holds (within the output budget).
STREAM_ABOVE = 1 << 20
_PIECE = 1 << 20  # bytes per read of a streamed file
#: Files up to this size are read whole in one read (the data set is then copied out of
#: it); a larger one has its meta read first and its data set read into its own buffer.
ONE_READ = 256 << 10
_UNCOMPRESSED = frozenset(UNCOMPRESSED_TRANSFER_SYNTAXES) | {DeflatedExplicitVRLittleEndian}


@dataclass(slots=True)
class PreparedFile:
    """A Part 10 file ready to send (PS3.10 §7.1): the UIDs its data set names, its
    transfer syntax, and the data set's bytes (``dataset``, when small) or where they
    are in the file (``offset``, ``length``)."""

    path: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    file_size: int
    offset: int
    length: int
    dataset: bytes | None = None
    pad: bool = False  # PS3.5 A.5: an odd-length deflated stream gets one trailing NUL


def prepare_file(path: str, *, check: bool = False, read_whole: int = READ_WHOLE) -> PreparedFile | None:
    """Read what sending ``path`` needs, without decoding it. Blocking (run it in a thread).

    ``None`` when the file has no usable file meta (pydicom must read it). Raises
    ``ValueError`` for a data set that is not well formed: with ``check`` every element
    is walked to the end (PS3.5 §7), else only as far as the SOP Instance UID.
    Data sets up to ``read_whole`` bytes are read into memory, larger ones stay on disk;
    a file of at most :data:`ONE_READ` (and ``read_whole``) bytes is read in one go, its
    meta parsed from memory.
    """
    with open(path, "rb", buffering=0) as raw:
        if os.fstat(raw.fileno()).st_size <= min(read_whole, ONE_READ):
            return _prepare_read(path, raw.readall(), check)
    return _prepare_open(path, check, read_whole)


def _prepare_read(path: str, whole: bytes, check: bool) -> PreparedFile | None:
    """:func:`prepare_file` of a file read whole."""
    meta = file_meta_from_bytes(whole)
    if meta is None:
        return None
    ts = meta.transfer_syntax
    data = whole[meta.dataset_offset :]
    try:
        if check:
            summary = check_dataset_bytes(data, ts, max_elements=NO_LIMIT)
            sop_class, sop_instance = summary.sop_class_uid, summary.sop_instance_uid
        else:
            sop_class, sop_instance = dataset_uids(io.BytesIO(data), ts, 0)
    except DataSetError as exc:
        raise ValueError(f"not a valid data set in its transfer syntax ({uid_name(ts)}): {exc}") from None
    return _prepared(path, meta, sop_class, sop_instance, len(whole), data)


def _prepare_open(path: str, check: bool, read_whole: int) -> PreparedFile | None:
    """:func:`prepare_file` of a larger file: its meta read first, then its data set
    read whole (up to ``read_whole`` bytes) or walked in the file."""
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        if meta is None:
            return None
        file_size = os.fstat(fp.fileno()).st_size
        length = file_size - meta.dataset_offset
        ts = meta.transfer_syntax
        data: bytes | None = None
        try:
            if length <= read_whole:
                fp.seek(meta.dataset_offset)
                data = fp.read(length)
                if check:
                    summary = check_dataset_bytes(data, ts, max_elements=NO_LIMIT)
                    sop_class, sop_instance = summary.sop_class_uid, summary.sop_instance_uid
                else:
                    sop_class, sop_instance = dataset_uids(io.BytesIO(data), ts, 0)
            elif check:
                summary = check_dataset(fp, ts, meta.dataset_offset, max_elements=NO_LIMIT)
                sop_class, sop_instance = summary.sop_class_uid, summary.sop_instance_uid
            else:
                sop_class, sop_instance = dataset_uids(fp, ts, meta.dataset_offset)
        except DataSetError as exc:
            raise ValueError(f"not a valid data set in its transfer syntax ({uid_name(ts)}): {exc}") from None
    return _prepared(path, meta, sop_class, sop_instance, file_size, data)


def _prepared(
    path: str, meta: FileMeta, sop_class: str, sop_instance: str, file_size: int, data: bytes | None
) -> PreparedFile:
    """The checks both ways of reading share, and the result (``data``: the data set read whole)."""
    if not sop_class or not sop_instance:
        raise ValueError("the data set has no SOP Class or SOP Instance UID")
    if sop_class != meta.sop_class_uid:  # the contexts were planned from the meta (PS3.10 7.1)
        raise ValueError(
            f"the file meta's SOP class ({uid_name(meta.sop_class_uid)}) is not the data set's ({uid_name(sop_class)})"
        )
    ts = meta.transfer_syntax
    length = file_size - meta.dataset_offset
    pad = ts == DeflatedExplicitVRLittleEndian and length % 2 == 1
    if data is not None and pad:
        data += b"\x00"
    return PreparedFile(path, sop_class, sop_instance, ts, file_size, meta.dataset_offset, length + pad, data, pad)


class _FileStream:
    """The data set of a large file, sent in pieces read ahead in a worker thread.

    :meth:`prefetch` (awaited by the sender between writes) keeps the next bytes in
    memory, one read in flight behind them while the peer keeps up; :meth:`read` serves
    from there. At most about two write batches of the file are in memory at once,
    whatever its size, and none while the sender waits long for its peer
    (:meth:`shed`): a peer that does not read holds only what its transport holds.
    """

    #: :meth:`read` returns bytes, or views of bytes, that nothing changes afterwards:
    #: the sender may hand them to the transport without copying them.
    immutable = True

    def __init__(self, fp: BinaryIO, prepared: PreparedFile):
        self.fp = fp
        self.length = prepared.length
        self._unread = prepared.length - prepared.pad  # bytes of the file not yet asked for
        self._pad = b"\x00" if prepared.pad else b""
        self._padded = prepared.pad
        self._pieces: deque[memoryview] = deque()
        self._buffered = 0
        self._pending: concurrent.futures.Future[bytes] | None = None  # the read in flight

    def _start(self) -> None:
        if self._pending is None and self._unread > 0:
            n = min(_PIECE, self._unread)
            self._unread -= n
            self._pending = concurrent.futures.Future()
            asyncio.get_running_loop().run_in_executor(None, self._read_piece, self._pending, n)

    def _read_piece(self, done: concurrent.futures.Future[bytes], n: int) -> None:
        """In a worker thread: one piece of the file into ``done``."""
        try:
            done.set_result(self.fp.read(n))
        except BaseException as exc:
            done.set_exception(exc)

    def _keep(self, data: bytes) -> None:
        self._pending = None
        if data:
            self._pieces.append(memoryview(data))
            self._buffered += len(data)
        if self._unread <= 0 and self._pending is None and self._pad:
            self._pieces.append(memoryview(self._pad))
            self._buffered, self._pad = self._buffered + 1, b""

    async def prefetch(self, n: int, read_ahead: bool = True) -> None:
        """Have at least ``n`` bytes (or all that is left) in memory and, with
        ``read_ahead``, the next read started."""
        while self._buffered < n:
            self._start()
            if self._pending is None:
                break
            self._keep(await asyncio.wrap_future(self._pending))
        if read_ahead:
            self._start()

    async def shed(self) -> None:
        """Give back the bytes read ahead: they are read again from the file when
        asked for (the sender waits for a peer that may never read them)."""
        if self._pending is not None:
            self._keep(await asyncio.wrap_future(self._pending))
        back = self._buffered
        if back and self._padded and not self._pad and self._unread <= 0:
            back, self._pad = back - 1, b"\x00"  # the pad is queued last: queued again later
        self._pieces.clear()
        self._buffered = 0
        if back:
            self.fp.seek(-back, os.SEEK_CUR)  # no read in flight: the position is ours
            self._unread += back

    def read(self, n: int) -> bytes | memoryview:
        # Prefetched, this only slices what is in memory. A sender that reads ahead of
        # what it prefetched (or never prefetches) gets the rest read here, blocking.
        while self._buffered < n and (self._pending is not None or self._unread > 0):
            if self._pending is None:
                self._unread -= (k := min(_PIECE, self._unread))
                data = self.fp.read(k)
            else:
                data = self._pending.result()
            self._pending = None
            if len(data) == 0:
                self._unread = 0
            self._keep(data)
        out: list[memoryview] = []
        want = n
        while want and self._pieces:
            head = self._pieces[0]
            if len(head) <= want:
                out.append(self._pieces.popleft())
                want -= len(head)
            else:
                out.append(head[:want])
                self._pieces[0] = head[want:]
                want = 0
        self._buffered -= n - want
        return out[0] if len(out) == 1 else b"".join(out)

    async def close(self) -> None:
        """Close the file once no read is in flight (even if this task is cancelled meanwhile)."""
        pending, self._pending = self._pending, None
        if pending is None:
            self.fp.close()
            return
        pending.add_done_callback(self._close_after)
        with contextlib.suppress(Exception):  # the read's own error does not matter any more
            await asyncio.shield(asyncio.wrap_future(pending))

    def _close_after(self, read: concurrent.futures.Future[bytes]) -> None:
        if not read.cancelled():
            read.exception()  # retrieved: nobody else will
        self.fp.close()


async def c_store(
    assoc: DIMSEProvider,
    source: Dataset | str | os.PathLike[str] | PreparedFile,
    *,
    priority: int = 0,
    move_originator: tuple[str, int] | None = None,
    timeout: float | None = None,
) -> Status:
    """C-STORE one instance from a pydicom ``Dataset``, a file path or a
    :class:`PreparedFile` (PS3.7 §9.1.1).

    A file in an accepted transfer syntax goes as it is stored: read whole in a worker
    thread when small (up to :data:`STREAM_ABOVE`), else streamed from disk with
    bounded read-ahead (never the whole file in memory, none while the peer does not
    read); the command names what the data set says it is (PS3.4
    B.2.3), not the file meta. Other files are decoded and transcoded with pydicom.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        prepared = await asyncio.to_thread(prepare_file, path, read_whole=STREAM_ABOVE)
        if prepared is None:
            return await _store_decoded(assoc, path, priority, move_originator, timeout)
    elif isinstance(source, PreparedFile):
        prepared = source
    else:
        ctx, payload, sop_class, sop_instance = _dataset_payload(assoc, source)
        return await _send_store(assoc, ctx, payload, sop_class, sop_instance, priority, move_originator, timeout)
    file_ctx = _find_context(assoc, prepared.sop_class, prepared.transfer_syntax)
    if file_ctx is None:
        return await _store_decoded(assoc, prepared.path, priority, move_originator, timeout)
    if prepared.dataset is not None:
        return await _send_store(
            assoc,
            file_ctx,
            prepared.dataset,
            prepared.sop_class,
            prepared.sop_instance,
            priority,
            move_originator,
            timeout,
        )
    fp = await asyncio.to_thread(open, prepared.path, "rb")
    stream = _FileStream(fp, prepared)
    try:
        await asyncio.to_thread(fp.seek, prepared.offset)
        return await _send_store(
            assoc, file_ctx, stream, prepared.sop_class, prepared.sop_instance, priority, move_originator, timeout
        )
    finally:
        await stream.close()


async def _store_decoded(
    assoc: DIMSEProvider, path: str, priority: int, move_originator: tuple[str, int] | None, timeout: float | None
) -> Status:
    """A file without file meta, or in a syntax the peer did not accept: decoded and
    re-encoded (in a worker thread) in an accepted syntax."""

    def decode() -> tuple[PresentationContext, bytes, str, str]:
        import pydicom

        ds = pydicom.dcmread(path, force=True)
        return _dataset_payload(assoc, ds)

    ctx, payload, sop_class, sop_instance = await asyncio.to_thread(decode)
    return await _send_store(assoc, ctx, payload, sop_class, sop_instance, priority, move_originator, timeout)


async def _send_store(
    assoc: DIMSEProvider,
    ctx: PresentationContext,
    payload: bytes | _FileStream,
    sop_class: str,
    sop_instance: str,
    priority: int,
    move_originator: tuple[str, int] | None,
    timeout: float | None,
) -> Status:
    cmd = Command(
        CommandField.C_STORE_RQ,
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=sop_instance,
        priority=priority,
        data_set_type=0x0000,
    )
    if move_originator is not None:
        cmd.move_originator_ae, cmd.move_originator_message_id = move_originator
    rsp = (await assoc.request(ctx, cmd, payload, timeout=timeout)).command
    # PS3.7 §9.1.1.1.3-4, §9.3.1.2: a status for another instance says nothing about this one.
    mismatch = affected_mismatch(cmd, rsp)
    if mismatch is not None:
        raise DIMSEFailure(f"C-STORE-RSP for {sop_instance} {mismatch}")
    # the association logs the outcome; Offending Element (0000,0901) in ``attributes``
    return response_status(rsp.status, rsp.error_comment, rsp.offending_element)


#: Per association: (SOP class, transfer syntax) -> the accepted context to send it on.
_CONTEXTS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], PresentationContext | None]] = (
    weakref.WeakKeyDictionary()
)


def _find_context(assoc: DIMSEProvider, sop_class: str, transfer_syntax: str) -> PresentationContext | None:
    """The accepted context for the pair where we may be SCU; remembered per association
    (the contexts do not change once negotiated), so a batch does not rescan them per file."""
    try:
        known = _CONTEXTS.setdefault(assoc, {})
    except TypeError:  # not weakly referenceable: no memory
        known = {}
    key = (sop_class, transfer_syntax)
    if key in known:
        return known[key]
    accepted = assoc.accepted_contexts
    found = next(
        (c for c in accepted if c.abstract_syntax == sop_class and c.transfer_syntax == transfer_syntax and c.as_scu),
        None,
    )
    if accepted:  # negotiated: the answer holds for the association's life
        known[key] = found
    return found


def _dataset_payload(assoc: DIMSEProvider, ds: Dataset) -> tuple[PresentationContext, bytes, str, str]:
    from ..codec import encode_dataset

    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    sop_instance = str(ds.get("SOPInstanceUID", ""))
    if not sop_class or not sop_instance:
        raise ValueError("data set has no SOP Class UID or SOP Instance UID")
    meta = getattr(ds, "file_meta", None)
    source_ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if source_ts:
        ctx = _find_context(assoc, sop_class, source_ts)
        if ctx is not None:
            return ctx, encode_dataset(ds, source_ts, source_ts), sop_class, sop_instance
    if source_ts and source_ts not in _UNCOMPRESSED:
        # Compressed, and the peer did not accept that syntax: decode the pixel data
        # when pydicom can, and send in an accepted uncompressed syntax (lossy stays marked).
        if not any(c.abstract_syntax == sop_class and c.as_scu and c.transfer_syntax in _UNCOMPRESSED
                   for c in assoc.accepted_contexts):  # fmt: skip
            raise NoAcceptedContext(
                f"{sop_instance}: stored as {uid_name(source_ts)}, which the peer did not accept for "
                f"{uid_name(sop_class)}, nor an uncompressed syntax"
            )
        from ..transcode import decompress

        ds = decompress(ds)
        source_ts = ExplicitVRLittleEndian
    for ctx in assoc.accepted_contexts:
        if ctx.abstract_syntax == sop_class and ctx.as_scu and ctx.transfer_syntax in _UNCOMPRESSED:
            return ctx, encode_dataset(ds, ctx.transfer_syntax, source_ts or None), sop_class, sop_instance
    raise NoAcceptedContext(f"{sop_instance}: no accepted presentation context for {uid_name(sop_class)}")
