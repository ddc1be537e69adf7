"""Storage service class (PS3.4 Annex B): C-STORE SCU and SCP (PS3.7 §9.1.1, §9.3.1).

SCU: a file is streamed from disk in PDU-sized pieces when its transfer syntax was
accepted; otherwise it is transcoded between the uncompressed syntaxes, or refused
with :class:`NoAcceptedContext` (never sent in a syntax the peer did not accept).

SCP: data set fragments go into a :class:`Spool` as they arrive: memory up to a
threshold, then a ``.partial`` temporary file written off the event loop, with reading
paused while the disk lags. The handler gets a :class:`StoreRequest`, decodes with
pydicom only if it asks, and :meth:`StoreRequest.save` moves the spool into place
as a complete Part 10 file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import shutil
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..acse import PresentationContext
from ..dataset_check import DataSetError, check_dataset, check_dataset_bytes, dataset_uids
from ..dimse import Command, CommandField, Message
from ..exceptions import NoAcceptedContext
from ..filewriter import group_commit, make_dirs, sync_file, write_file
from ..interface import DIMSEProvider, StoreHandler
from ..part10 import encode_file_meta, read_file_meta, valid_uid
from ..session import Operation
from ..status import Code, Status, response_status
from ..uids import (
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    uid_name,
)
from .requests import Request
from .scp import response, run_handler
from .spool import Spool

if TYPE_CHECKING:  # pydicom is loaded only where a data set is decoded or encoded
    from pydicom.dataset import Dataset

__all__ = [
    "STORAGE_SOP_CLASSES",
    "STORE_TRANSFER_SYNTAXES",
    "DirectoryStore",
    "PreparedFile",
    "Spool",
    "StoreRequest",
    "c_store",
    "make_spool",
    "prepare_file",
    "scp_c_store",
]

#: The storage SOP classes (:mod:`dimse_async.sop_classes`), loaded on first use.
STORAGE_SOP_CLASSES: list[str]


def __getattr__(name: str) -> Any:
    if name == "STORAGE_SOP_CLASSES":  # built from pydicom's registry on first use
        from .. import sop_classes

        return sop_classes.STORAGE_SOP_CLASSES
    if name == "encode_dataset":  # pydicom-based: loaded when asked for
        from .. import codec

        return codec.encode_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: What a storage SCP accepts by default: uncompressed first, then the usual compressed.
STORE_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]


# ---------------------------------------------------------------------------
# SCP: spooling and the handler's request
# ---------------------------------------------------------------------------


class StoreRequest(Request):
    """A received C-STORE: metadata from the command set, the data set on demand."""

    __slots__ = ("_dataset", "_saved", "spool")

    def __init__(self, assoc: DIMSEProvider, message: Message, spool: Spool):
        super().__init__(assoc, message)
        self.spool = spool
        self._dataset: Dataset | None = None
        self._saved: str | None = None

    @property
    def sop_class_uid(self) -> str:
        return self.command.affected_sop_class_uid or ""

    @property
    def sop_instance_uid(self) -> str:
        return self.command.affected_sop_instance_uid or ""

    @property
    def priority(self) -> int:
        return self.command.priority or 0

    @property
    def move_originator(self) -> tuple[str, int] | None:
        cmd = self.command
        if cmd.move_originator_ae:
            return cmd.move_originator_ae, cmd.move_originator_message_id or 0
        return None

    @property
    def size(self) -> int:
        """Data set size in bytes, as received."""
        return self.spool.size

    def open(self) -> BinaryIO:
        """The instance as a Part 10 stream (file meta + data set), without decoding."""
        if self._saved is not None:
            return open(self._saved, "rb")
        if self.spool.path is not None:
            return open(self.spool.path, "rb")
        return io.BytesIO(self.spool.memory())

    @property
    def decoded(self) -> bool:
        """Whether :attr:`dataset` has been decoded (it costs a full parse)."""
        return self._dataset is not None

    @property
    def dataset(self) -> Dataset:
        """The data set, decoded by pydicom on first access."""
        if self._dataset is None:
            import pydicom

            with self.open() as fp:
                self._dataset = pydicom.dcmread(fp)
        return self._dataset

    async def save(self, path: str | os.PathLike[str], *, durable: bool = False) -> str:
        """Write the instance as a Part 10 file at ``path``, atomically.

        The file appears complete or not at all. A spooled instance is moved into
        place (no copy when on the same file system). The file work runs in the
        association's writer thread, never on the event loop. ``durable``: the file
        and its directory entry are on stable storage (``fsync``; the directory's
        shared with concurrent stores, :class:`~dimse_async.filewriter.GroupCommit`)
        before this returns.
        """
        dest = os.fspath(path)
        spool, writer = self.spool, self.assoc.writer
        if spool.path is not None:
            source, spool.path = spool.path, None
            created = await writer.submit(_move_into_place, source, dest, durable)
        else:
            created = await writer.submit(write_file, dest, spool.chunks(), durable)
        if durable:  # the new name, and those of directories made for it, on disk too
            commit = group_commit()
            for directory in [os.path.dirname(dest) or ".", *reversed(created)]:
                await commit.sync(directory)
        self._saved = dest
        return dest


def _move_into_place(src: str, dest: str, durable: bool) -> list[str]:
    """Rename a spool file to ``dest`` (copy across file systems); in the writer thread.
    Returns the parents of directories created for it (see :func:`make_dirs`)."""
    created: list[str] = []
    try:
        if durable:
            sync_file(src)
        try:
            os.replace(src, dest)  # one rename, no data copied
        except FileNotFoundError:
            if not os.path.exists(src):
                raise
            created = make_dirs(os.path.dirname(dest) or ".")
            os.replace(src, dest)
    except FileNotFoundError:
        raise
    except OSError:  # another file system: copy, then drop the spool file
        _copy_then_replace(src, dest, durable)
    return created


def _copy_then_replace(src: str, dest: str, durable: bool = False) -> None:
    tmp = f"{dest}.partial"
    try:
        shutil.copyfile(src, tmp)
        if durable:
            sync_file(tmp)
        os.replace(tmp, dest)
    finally:
        for p in (src, tmp):
            try:
                os.unlink(p)
            except OSError:
                pass


def store_refusal(cmd: Command, ctx: PresentationContext) -> Status | None:
    """Why a C-STORE-RQ cannot be stored, judged from its command set alone, or ``None``.

    A SOP Class UID other than the context's abstract syntax is refused as not
    supported (0x0122); a SOP Instance UID that is not a UID (PS3.5 §9.1) cannot be
    understood (0xC000). PS3.4 B.2.3.
    """
    sop_class = cmd.affected_sop_class_uid or ""
    if sop_class != ctx.abstract_syntax or not valid_uid(sop_class):
        return Status(Code.SOP_CLASS_NOT_SUPPORTED, "SOP Class UID does not match the presentation context")
    if not valid_uid(cmd.affected_sop_instance_uid or ""):
        return Status(Code.CANNOT_UNDERSTAND, "invalid Affected SOP Instance UID")
    return None


def make_spool(assoc: DIMSEProvider, msg: Message, *, threshold: int, directory: str | None) -> Spool:
    """Sink for an incoming C-STORE-RQ data set: Part 10 meta first, then the fragments.

    Never raises: a request that cannot be stored gets a spool that drains its data set
    and answers with a failure status.
    """
    cmd = msg.command
    refusal = store_refusal(cmd, assoc.context(msg.context_id))
    if refusal is not None:
        return Spool.refused(refusal)
    header = encode_file_meta(
        cmd.affected_sop_class_uid or "",
        cmd.affected_sop_instance_uid or "",
        assoc.context(msg.context_id).transfer_syntax,
        assoc.peer_ae or None,
    )
    return Spool(
        header,
        threshold=threshold,
        directory=directory,
        pause=lambda: assoc.pause_reading("spool"),
        resume=lambda: assoc.resume_reading("spool"),
        writer=assoc.writer,
    )


async def scp_c_store(assoc: DIMSEProvider, op: Operation, handler: StoreHandler | None = None) -> None:
    """Run the C-STORE handler for one received instance and answer (PS3.4 B.2.3).

    ``assoc.store_handler`` (a C-GET's sink) takes precedence over ``handler``.
    """
    cmd = op.command
    spool = op.message.sink
    if not isinstance(spool, Spool):
        # Command Data Set Type said "no data set": there is nothing to store (PS3.7 §9.3.1.1).
        spool = Spool.refused(Status(Code.CANNOT_UNDERSTAND, "C-STORE-RQ without a data set"))
    try:
        await spool.finish()
        handler = assoc.store_handler or handler
        if spool.refusal is not None:
            status = spool.refusal
        elif spool.error is not None:
            assoc.log.error("cannot spool instance", sop_instance=cmd.affected_sop_instance_uid, error=str(spool.error))
            assoc.note_error("spool")
            status = Status(Code.OUT_OF_RESOURCES, f"Out of resources: {spool.error.strerror or spool.error}")
        elif handler is None:
            status = Status(Code.SOP_CLASS_NOT_SUPPORTED, "No C-STORE handler: SOP class not supported")
        else:
            status = await run_handler(CommandField.C_STORE_RQ, handler, StoreRequest(assoc, op.message, spool), assoc)
    finally:
        spool.discard()
    await assoc.send(op.context.id, response(cmd, status))


_SUCCESS = Status(Code.SUCCESS)


class DirectoryStore:
    """A C-STORE handler that writes each instance to ``root/<SOP Instance UID>.dcm``.

    UIDs are validated (PS3.5 §9.1) and never used as paths otherwise: an invalid UID
    gets failure 0xC000 instead of a file. An instance already present is replaced.
    ``durable``: success is answered only once file and directory entry were fsynced
    (group commit across concurrent stores, see :meth:`StoreRequest.save`).
    """

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = False):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = os.fspath(self.root)
        self.durable = durable
        self.stored = 0

    def path_for(self, sop_instance_uid: str) -> Path:
        if not valid_uid(sop_instance_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_instance_uid[:70]!r}")
        return self.root / f"{sop_instance_uid}.dcm"

    async def __call__(self, request: StoreRequest) -> Status:
        uid = request.sop_instance_uid
        if not valid_uid(uid):
            return Status(Code.CANNOT_UNDERSTAND, f"invalid SOP Instance UID {uid[:70]!r}"[:64])
        if not valid_uid(request.sop_class_uid):
            return Status(Code.CANNOT_UNDERSTAND, "invalid SOP Class UID")
        await request.save(os.path.join(self._root, uid + ".dcm"), durable=self.durable)
        self.stored += 1
        return _SUCCESS


# ---------------------------------------------------------------------------
# SCU
# ---------------------------------------------------------------------------


#: Data sets up to this size are read whole (in a worker thread) before they are sent;
#: larger ones are streamed from their file in pieces read ahead in a worker thread.
READ_WHOLE = 4 << 20
_PIECE = 1 << 20  # bytes per read of a streamed file
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


def prepare_file(path: str, *, check: bool = False) -> PreparedFile | None:
    """Read what sending ``path`` needs, without decoding it. Blocking (run it in a thread).

    ``None`` when the file has no usable file meta (pydicom must read it). Raises
    ``ValueError`` for a data set that is not well formed: with ``check`` every element
    is walked to the end (PS3.5 §7), else only as far as the SOP Instance UID.
    Data sets up to :data:`READ_WHOLE` bytes are read into memory, larger ones stay on disk.
    """
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        if meta is None:
            return None
        file_size = os.fstat(fp.fileno()).st_size
        length = file_size - meta.dataset_offset
        ts = meta.transfer_syntax
        data: bytes | None = None
        try:
            if length <= READ_WHOLE:
                fp.seek(meta.dataset_offset)
                data = fp.read(length)
                if check:
                    summary = check_dataset_bytes(data, ts)
                    sop_class, sop_instance = summary.sop_class_uid, summary.sop_instance_uid
                else:
                    sop_class, sop_instance = dataset_uids(io.BytesIO(data), ts, 0)
            elif check:
                summary = check_dataset(fp, ts, meta.dataset_offset)
                sop_class, sop_instance = summary.sop_class_uid, summary.sop_instance_uid
            else:
                sop_class, sop_instance = dataset_uids(fp, ts, meta.dataset_offset)
        except DataSetError as exc:
            raise ValueError(f"not a valid data set in its transfer syntax ({uid_name(ts)}): {exc}") from None
    if not sop_class or not sop_instance:
        raise ValueError("the data set has no SOP Class or SOP Instance UID")
    pad = ts == DeflatedExplicitVRLittleEndian and length % 2 == 1
    if data is not None and pad:
        data += b"\x00"
    return PreparedFile(path, sop_class, sop_instance, ts, file_size, meta.dataset_offset, length + pad, data, pad)


class _FileStream:
    """The data set of a large file, sent in pieces read ahead in a worker thread.

    :meth:`prefetch` (awaited by the sender between writes) keeps the next bytes in
    memory, one read in flight behind them; :meth:`read` serves from there. At most
    about two write batches of the file are in memory at once, whatever its size.
    """

    def __init__(self, fp: BinaryIO, prepared: PreparedFile):
        self.fp = fp
        self.length = prepared.length
        self._unread = prepared.length - prepared.pad  # bytes of the file not yet asked for
        self._pad = b"\x00" if prepared.pad else b""
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

    async def prefetch(self, n: int) -> None:
        """Have at least ``n`` bytes (or all that is left) in memory, and the next read started."""
        self._start()
        while self._buffered < n and self._pending is not None:
            self._keep(await asyncio.wrap_future(self._pending))
            self._start()

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
    thread when small, else streamed from disk with bounded read-ahead (never the
    whole file in memory); the command names what the data set says it is (PS3.4
    B.2.3), not the file meta. Other files are decoded and transcoded with pydicom.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        prepared = await asyncio.to_thread(prepare_file, path)
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
    rsp = await assoc.request(ctx, cmd, payload, timeout=timeout)
    return response_status(rsp.command.status, rsp.command.error_comment)  # the association logs the outcome


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
