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

import io
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset

from ..acse import PresentationContext
from ..codec import UNCOMPRESSED, encode_dataset
from ..dataset_check import DataSetError, dataset_uids
from ..dimse import Command, CommandField, Message
from ..exceptions import NoAcceptedContext
from ..filewriter import group_commit, make_dirs, sync_file, write_file
from ..interface import DIMSEProvider, StoreHandler
from ..part10 import encode_file_meta, read_file_meta, valid_uid
from ..session import Operation
from ..sop_classes import STORAGE_SOP_CLASSES
from ..status import Code, Status, response_status
from ..transcode import decompress
from ..uids import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    uid_name,
)
from .requests import Request
from .scp import response, run_handler
from .spool import Spool

__all__ = [
    "STORAGE_SOP_CLASSES",
    "STORE_TRANSFER_SYNTAXES",
    "DirectoryStore",
    "Spool",
    "StoreRequest",
    "c_store",
    "make_spool",
    "scp_c_store",
]

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
    def dataset(self) -> Dataset:
        """The data set, decoded by pydicom on first access."""
        if self._dataset is None:
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


class _FilePayload:
    """The data set part of a Part 10 file, read in pieces by the sender."""

    def __init__(self, fp: BinaryIO, offset: int, *, pad_odd: bool = False):
        self.fp = fp
        fp.seek(0, os.SEEK_END)
        self.length = fp.tell() - offset
        # PS3.5 A.5: an odd-length deflated stream gets one trailing NUL (some files lack it).
        self._pad = b"\x00" if pad_odd and self.length % 2 else b""
        self.length += len(self._pad)
        fp.seek(offset)

    def read(self, n: int) -> bytes:
        data = self.fp.read(n)
        if len(data) < n and self._pad:
            data, self._pad = data + self._pad, b""
        return data


async def c_store(
    assoc: DIMSEProvider,
    source: Dataset | str | os.PathLike[str],
    *,
    priority: int = 0,
    move_originator: tuple[str, int] | None = None,
    timeout: float | None = None,
) -> Status:
    """C-STORE one instance from a pydicom ``Dataset`` or a file path (PS3.7 §9.1.1)."""
    if isinstance(source, Dataset):
        ctx, payload, sop_class, sop_instance = _dataset_payload(assoc, source)
        return await _send_store(assoc, ctx, payload, sop_class, sop_instance, priority, move_originator, timeout)
    path = os.fspath(source)
    with open(path, "rb") as fp:  # noqa: ASYNC230 - local reads of PDU-sized pieces; a thread hop per piece costs more
        meta = read_file_meta(fp)
        if meta is not None:
            # The command names what the data set says it is (PS3.4 B.2.3), not the file meta.
            sop_class, sop_instance = _own_uids(path, fp, meta)
            file_ctx = _find_context(assoc, sop_class, meta.transfer_syntax)
            if file_ctx is not None:
                streamed = _FilePayload(
                    fp, meta.dataset_offset, pad_odd=meta.transfer_syntax == DeflatedExplicitVRLittleEndian
                )
                return await _send_store(
                    assoc, file_ctx, streamed, sop_class, sop_instance, priority, move_originator, timeout
                )
        fp.seek(0)
        ds = pydicom.dcmread(fp, force=True)
    ctx, payload, sop_class, sop_instance = _dataset_payload(assoc, ds)
    return await _send_store(assoc, ctx, payload, sop_class, sop_instance, priority, move_originator, timeout)


async def _send_store(
    assoc: DIMSEProvider,
    ctx: PresentationContext,
    payload: bytes | _FilePayload,
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


def _own_uids(path: str, fp: BinaryIO, meta: Any) -> tuple[str, str]:
    """The data set's SOP Class/Instance UIDs (those of the meta when the data set lacks them)."""
    try:
        sop_class, sop_instance = dataset_uids(fp, meta.transfer_syntax, meta.dataset_offset)
    except DataSetError as exc:
        raise ValueError(f"{path}: not a well-formed data set in {uid_name(meta.transfer_syntax)}: {exc}") from None
    if not sop_instance or not sop_class:
        raise ValueError(f"{path}: the data set has no SOP Class or SOP Instance UID")
    return sop_class, sop_instance


def _find_context(assoc: DIMSEProvider, sop_class: str, transfer_syntax: str) -> PresentationContext | None:
    for ctx in assoc.accepted_contexts:
        if ctx.abstract_syntax == sop_class and ctx.transfer_syntax == transfer_syntax and ctx.as_scu:
            return ctx
    return None


def _dataset_payload(assoc: DIMSEProvider, ds: Dataset) -> tuple[PresentationContext, bytes, str, str]:
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
    if source_ts and source_ts not in UNCOMPRESSED:
        # Compressed, and the peer did not accept that syntax: decode the pixel data
        # when pydicom can, and send in an accepted uncompressed syntax (lossy stays marked).
        if not any(c.abstract_syntax == sop_class and c.as_scu and c.transfer_syntax in UNCOMPRESSED
                   for c in assoc.accepted_contexts):  # fmt: skip
            raise NoAcceptedContext(
                f"{sop_instance}: stored as {uid_name(source_ts)}, which the peer did not accept for "
                f"{uid_name(sop_class)}, nor an uncompressed syntax"
            )
        ds = decompress(ds)
        source_ts = ExplicitVRLittleEndian
    for ctx in assoc.accepted_contexts:
        if ctx.abstract_syntax == sop_class and ctx.as_scu and ctx.transfer_syntax in UNCOMPRESSED:
            return ctx, encode_dataset(ds, ctx.transfer_syntax, source_ts or None), sop_class, sop_instance
    raise NoAcceptedContext(f"{sop_instance}: no accepted presentation context for {uid_name(sop_class)}")
