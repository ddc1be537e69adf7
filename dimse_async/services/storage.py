"""Storage service class, SCP side (PS3.4 Annex B, PS3.7 §9.3.1); the SCU side is
:mod:`.store_scu`.

Data set fragments go into a :class:`Spool` as they arrive: memory up to a
threshold, then a ``.partial`` temporary file written off the event loop, with reading
paused while the disk lags. The handler gets a :class:`StoreRequest`, decodes with
pydicom only if it asks, and :meth:`StoreRequest.save` moves the spool into place
as a complete Part 10 file.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import io
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..acse import PresentationContext
from ..dimse import (
    NO_DATASET,
    Command,
    CommandField,
    Message,
    encode_response_fields,
    encode_store_success,
    response_to,
)
from ..filewriter import InlineWrites, group_commit, make_dirs, sync_file, write_file, write_file_inline
from ..interface import DIMSEProvider, StoreHandler
from ..part10 import encode_file_meta, plausible_uid, valid_uid
from ..session import Operation
from ..sop_classes import is_other_service_class
from ..space import StorageSpace
from ..status import PENDING_CODES, Code, Status
from ..uids import STORE_TRANSFER_SYNTAXES
from .requests import Request
from .scp import failure_status, outcome_status, own_cancellation, response
from .spool import Spool

if TYPE_CHECKING:  # pydicom is loaded only where a data set is decoded or encoded
    from pydicom.dataset import Dataset

__all__ = [
    "CStoreService",
    "STORAGE_SOP_CLASSES",
    "STORE_TRANSFER_SYNTAXES",
    "DirectoryStore",
    "Spool",
    "StoreRequest",
    "make_spool",
    "scp_c_store",
    "start_c_store",
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
        if spool.discarded:  # the association ended: its bytes are gone, never an empty file
            raise OSError(errno.ECANCELED, "instance discarded: the association ended")
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
    supported (0x0122); a standard SOP class that is not a storage class (a C-STORE on
    a Verification, Query/Retrieve, commitment or MPPS context) is an unrecognized
    operation (0x0211, PS3.7 C.5.8); a SOP Instance UID that is not a UID (PS3.5 §9.1:
    1-64 digits and dots, no empty component) cannot be understood (0xC000). PS3.4 B.2.3.
    A component with a leading zero (``1.2.03``), which §9.1 forbids but real devices
    generate, is no reason to lose the instance: it is accepted (:func:`.plausible_uid`;
    the UID names a file safely all the same).
    """
    sop_class = cmd.affected_sop_class_uid or ""
    if sop_class != ctx.abstract_syntax:
        return Status(Code.SOP_CLASS_NOT_SUPPORTED, _NOT_THE_CONTEXTS)
    refusal = _class_refusal(sop_class)
    if refusal is not None:
        return Status(*refusal)
    uid = cmd.affected_sop_instance_uid or ""
    if not valid_uid(uid) and not plausible_uid(uid):  # (valid_uid: the receive path's usual answer, cheapest)
        return Status(Code.CANNOT_UNDERSTAND, "invalid Affected SOP Instance UID", attributes=[_AFFECTED_INSTANCE])
    return None


_AFFECTED_INSTANCE = 0x00001000  # Offending Element (0000,0901) of a refusal for it (PS3.4 Table B.2-1)


_NOT_THE_CONTEXTS = "SOP Class UID does not match the presentation context"


# Judged once per class: a SOP Class UID that reaches here is a context's abstract syntax
# (so only those are kept), the same for every instance sent on that context.
@functools.lru_cache(maxsize=256)
def _class_refusal(sop_class: str) -> tuple[int, str] | None:
    """:func:`store_refusal`'s judgement of a context's abstract syntax: (status, comment) or ``None``."""
    if not valid_uid(sop_class):
        return Code.SOP_CLASS_NOT_SUPPORTED, _NOT_THE_CONTEXTS
    if is_other_service_class(sop_class):
        return Code.UNRECOGNIZED_OPERATION, "C-STORE is not a service of this SOP Class"
    return None


def make_spool(
    assoc: DIMSEProvider,
    msg: Message,
    *,
    threshold: int,
    directory: str | None,
    store: StoreHandler | None = None,
) -> Spool:
    """Sink for an incoming C-STORE-RQ data set: Part 10 meta first, then the fragments.

    ``store``: the C-STORE handler registered now; a plain :class:`DirectoryStore`
    (not durable) lends the spool its inline-write policy, so a large instance is
    written on the loop as it arrives (see :class:`Spool`). A handler with a ``space``
    (:class:`~dimse_async.space.StorageSpace`: a :class:`DirectoryStore` with
    ``min_free_space``, the archive's) refuses the request here while its storage is
    full or read-only: 0xA700, its data set dropped as it arrives, never written
    (PS3.4 B.2.3). Never raises: a request that cannot be stored gets a spool that
    drains its data set and answers with a failure status.
    """
    cmd = msg.command
    context = assoc.context(msg.context_id)
    refusal = store_refusal(cmd, context)
    space = None
    if refusal is None and assoc.store_handler is None:
        space = getattr(store, "space", None)
        if isinstance(space, StorageSpace):
            refusal = space.command_refusal(assoc.log, cmd.affected_sop_instance_uid)
    if refusal is not None:
        return Spool.refused(refusal)
    header = encode_file_meta(
        cmd.affected_sop_class_uid or "",
        cmd.affected_sop_instance_uid or "",
        context.transfer_syntax,
        assoc.peer_ae or None,
    )
    # (the arguments by position: keywords to a class build a dict per call)
    spool = Spool(
        header,
        threshold,
        directory,
        None,
        None,
        assoc.writer,
        # the inline-write policy of a plain, non-durable DirectoryStore
        store.inline if type(store) is DirectoryStore and not store.durable and assoc.store_handler is None else None,
        assoc,  # pause_reading("spool") / resume_reading("spool") (no closures made)
    )
    spool.uids_valid = True
    spool.space_checked = space
    return spool


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
        if not spool.in_memory:
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
        else:  # run_handler, inlined: one coroutine less per instance
            try:
                result: Any = handler(StoreRequest(assoc, op.message, spool))
                if hasattr(result, "__await__"):  # an async def's; a plain def's result is the outcome
                    result = await result
            except asyncio.CancelledError as exc:
                if own_cancellation():
                    raise
                status = failure_status(CommandField.C_STORE_RQ, exc, assoc)
            except Exception as exc:
                status = failure_status(CommandField.C_STORE_RQ, exc, assoc)
            else:
                status = result
                if not isinstance(result, Status) or int(result) in PENDING_CODES:
                    status = outcome_status(CommandField.C_STORE_RQ, result, assoc.log)
    finally:
        spool.discard()
    await assoc.send(op.context.id, response(cmd, status))


_SUCCESS = Status(Code.SUCCESS)


def start_c_store(
    assoc: DIMSEProvider, op: Operation, handler: StoreHandler | None, done: asyncio.Future[None]
) -> bool:
    """The usual C-STORE, run as callbacks instead of a task: the handler is a plain
    :class:`DirectoryStore` (not durable) and the instance's UIDs were checked on
    arrival. An instance whole in memory is written and renamed into place (as
    :meth:`StoreRequest.save` does) at once on the loop when small and such writes are
    fast (:class:`~dimse_async.filewriter.InlineWrites`, nothing of this association
    still in its writer), else by one job in the association's writer; one spooled to a
    file as it arrived gets one job for its last bytes and the move into place. Then the
    status from its outcome, as :func:`scp_c_store` would answer, sent in the loop pass
    that learns it (PS3.4 B.2.3: success only once the file is complete and renamed).
    ``False``: anything else, for :func:`scp_c_store` in a task."""
    spool = op.message.sink
    if (
        type(handler) is not DirectoryStore
        or handler.durable
        or handler.check  # the data set is walked first, in a worker thread
        or assoc.store_handler is not None
        or type(spool) is not Spool
        or not spool.uids_valid
        or spool.refusal is not None
        or spool.error is not None
        # refused by the handler; once per store: not again when judged as the command arrived
        # (a disk that fills meanwhile fails the write: 0xA700, no file)
        or (
            handler.space is not None
            and spool.space_checked is not handler.space
            and handler.space.problem() is not None
        )
    ):
        return False
    rest = None
    if not spool.in_memory:  # spooled as it arrived: the rest, then the move, in one more job
        if spool.writer is not assoc.writer:
            return False
        rest = spool.take_rest()
        if rest is None:
            return False
    cmd = op.message.command
    store: DirectoryStore = handler
    dest = f"{store._prefix}{cmd.affected_sop_instance_uid}.dcm"
    writer = spool.writer  # the association's, from make_spool (no property call)
    if writer is None:  # pragma: no cover - a spool made elsewhere
        writer = assoc.writer
    inline = store.inline
    if rest is None:
        if inline is not None and not writer.busy and inline.allowed(spool.header_length + spool.size):
            # The usual small instance: placed here, on the loop (as _write_inline does,
            # without a callback made for it).
            mark = inline.start()
            error: Exception | None = None
            try:
                placed = write_file_inline(dest, spool.chunks())
            except Exception as exc:
                placed, error = True, exc  # tried, and failed: answered as such
            inline.done(mark)
            if placed:
                _written(assoc, op, done, store, spool, cmd, None, error)
                return True
        writer.submit_then(
            functools.partial(_written, assoc, op, done, store, spool, cmd), write_file, dest, spool.chunks(), False
        )
        return True
    written = functools.partial(_written, assoc, op, done, store, spool, cmd)
    if (
        inline is not None
        and spool.inline is inline
        and spool.file_started
        and not writer.busy
        and inline.writable()
        and sum(map(len, rest)) <= _INLINE_REST
    ):
        # Written on the loop as it arrived (see Spool): its last bytes, the close
        # and the rename here too, no thread hop, as a small instance's.
        if not _write_inline(inline, written, OSError, _finish_spooled_inline, spool, dest, rest):
            # the directory is missing or on another file system
            writer.submit_then(written, _move_spooled, spool, dest)
        return True
    writer.submit_then(written, _place_spooled, spool, dest, rest)
    return True


def _written(
    assoc: DIMSEProvider,
    op: Operation,
    done: asyncio.Future[None],
    store: DirectoryStore,
    spool: Spool,
    cmd: Command,
    _created: object,
    exc: BaseException | None,
) -> None:
    """:func:`start_c_store`'s file work has ended (``exc``: how it failed): answer."""
    spool.discard()
    if done.done():
        return  # the association ended meanwhile
    try:
        if exc is None:
            store.stored += 1
            mid, instance = cmd.message_id, cmd.affected_sop_instance_uid
            if (
                mid is not None
                and instance is not None
                and assoc.answer_encoded(  # success_response's bytes, no Command if none is needed
                    op, done, encode_store_success(cmd.affected_sop_class_uid, mid, instance)
                )
            ):
                return
            rsp, encoded = success_response(cmd)
            assoc.answer(op, rsp, done, encoded)
            return
        status: Status
        if isinstance(exc, OSError) and exc is spool.write_error:  # as scp_c_store answers a spool error
            assoc.log.error("cannot spool instance", sop_instance=cmd.affected_sop_instance_uid, error=str(exc))
            assoc.note_error("spool")
            status = Status(Code.OUT_OF_RESOURCES, f"Out of resources: {exc.strerror or exc}")
        elif isinstance(exc, Exception):
            status = failure_status(CommandField.C_STORE_RQ, exc, assoc)
        else:  # pragma: no cover - KeyboardInterrupt and the like in the writer thread
            raise exc
        assoc.answer(op, response(cmd, status), done)
    except BaseException as err:  # never leave the operation hanging
        assoc.log.error("internal error in C-STORE", error=repr(err))
        done.set_exception(err)


_INLINE_REST = 1 << 20  # at most this much of a spooled instance left to write on the loop


def success_response(request: Command) -> tuple[Command, bytes | None]:
    """The C-STORE-RSP Success answering ``request`` (:func:`~.scp.response` of
    :data:`_SUCCESS`) and its command set encoded from the kept parts of its shape
    (``None``: a request without a Message ID, encoded in full when sent)."""
    rsp = response_to(request, 0)
    instance = rsp.affected_sop_instance_uid = request.affected_sop_instance_uid
    mid = request.message_id
    if mid is None:
        return rsp, None
    return rsp, encode_response_fields(0x8001, rsp.affected_sop_class_uid, NO_DATASET, mid, 0, None, instance)


def _write_inline(
    inline: InlineWrites,
    written: Callable[[object, BaseException | None], None],
    errors: type[Exception],
    write: Callable[..., bool],
    *args: Any,
) -> bool:
    """``write(*args)`` on the loop, timed by ``inline`` (:class:`InlineWrites`). ``True``:
    it placed the file, or failed with one of ``errors``; ``written`` has then been called
    with the outcome. ``False``: it declined (nothing placed; the caller hands the work
    to the writer thread)."""
    mark = inline.start()
    error: Exception | None = None
    try:
        placed = write(*args)
    except errors as exc:
        placed, error = True, exc  # tried, and failed: answered as such
    inline.done(mark)
    if placed:
        written(None, error)
    return placed


def _finish_spooled_inline(spool: Spool, dest: str, rest: list[bytes | memoryview]) -> bool:
    """On the loop, for a spool whose file was written as the data set arrived: its last
    bytes written, the file closed and renamed to ``dest``. ``False``: written and
    closed, but the rename needs :func:`_move_spooled` in the writer thread (``dest``'s
    directory missing, or another file system); an error is raised."""
    source = spool.finish_job(rest)
    if source is None:  # pragma: no cover - file_started was checked
        raise OSError(errno.EIO, "spool file missing")
    try:
        os.replace(source, dest)
    except OSError:
        return False
    spool.path = None  # moved: nothing left for discard() to remove
    return True


def _move_spooled(spool: Spool, dest: str) -> list[str]:
    """In the writer thread: the closed spool file moved to ``dest``."""
    source = spool.path
    if source is None:  # pragma: no cover - discarded meanwhile
        raise OSError(errno.EIO, "spool file missing")
    created = _move_into_place(source, dest, False)
    spool.path = None
    return created


def _place_spooled(spool: Spool, dest: str, rest: list[bytes | memoryview]) -> list[str]:
    """In the writer thread, after the spool's earlier writes: its last bytes written,
    the file closed and moved to ``dest`` (what :meth:`Spool.finish` and
    :meth:`StoreRequest.save` do, in one job instead of three)."""
    source = spool.finish_job(rest)
    if source is None:  # past the threshold, but nothing written yet: the whole instance is here
        return write_file(dest, rest, False)
    created = _move_into_place(source, dest, False)
    spool.path = None  # moved: nothing left for discard() to remove
    return created


class CStoreService:
    """The C-STORE entry of an AE's dispatch table: :func:`scp_c_store` in a task, or
    :func:`start_c_store` where it applies; ``handler()`` gives the handler registered
    at the time of the request."""

    __slots__ = ("_handler",)

    def __init__(self, handler: Callable[[], StoreHandler | None]):
        self._handler = handler

    def __call__(self, assoc: DIMSEProvider, op: Operation) -> Awaitable[None]:
        return scp_c_store(assoc, op, self._handler())

    def start(self, assoc: DIMSEProvider, op: Operation, done: asyncio.Future[None]) -> bool:
        return start_c_store(assoc, op, self._handler(), done)


def _dataset_refusal(request: StoreRequest) -> Status | None:
    """Why the received data set is not stored (see ``DirectoryStore(check=True)``), or
    ``None``. Blocking: run in a thread."""
    from ..dataset_check import DataSetError, check_dataset
    from ..part10 import read_file_meta

    try:
        with request.open() as fp:
            meta = read_file_meta(fp)
            if meta is None or meta.dataset_offset != request.spool.header_length:
                raise DataSetError("data set holds file meta elements (0002,eeee)")  # PS3.10 §7.2
            summary = check_dataset(fp, meta.transfer_syntax, meta.dataset_offset)
    except DataSetError as exc:  # the element at fault as Offending Element, when known (PS3.4 Table B.2-1)
        tag = exc.tag
        return Status(Code.CANNOT_UNDERSTAND, f"Cannot understand: {exc}"[:64], attributes=() if tag is None else [tag])
    if not summary.sop_instance_uid and not summary.sop_class_uid:
        return Status(Code.CANNOT_UNDERSTAND, "Cannot understand: no SOP Class or Instance UID")
    for what, tag, ours, theirs in (
        ("Instance", 0x00080018, summary.sop_instance_uid, request.sop_instance_uid),
        ("Class", 0x00080016, summary.sop_class_uid, request.sop_class_uid),
    ):
        if ours != theirs:  # the data set's element as Offending Element (PS3.4 Table B.2-1)
            comment = f"Data set SOP {what} UID differs from the command's"
            return Status(Code.DATASET_DOES_NOT_MATCH_SOP_CLASS, comment, attributes=[tag])
    return None


class DirectoryStore:
    """A C-STORE handler that writes each instance to ``root/<SOP Instance UID>.dcm``.

    UIDs are validated (PS3.5 §9.1, leading zeros in a component tolerated: see
    :func:`store_refusal`) and never used as paths otherwise: an invalid UID gets
    failure 0xC000 instead of a file. An instance already present is replaced.
    ``durable``: success is answered only once file and directory entry were fsynced
    (group commit across concurrent stores, see :meth:`StoreRequest.save`).
    ``inline``: when a small instance's file is written on the event loop instead of in
    the association's writer thread (:class:`~dimse_async.filewriter.InlineWrites`;
    ``True``: its defaults; ``False``: never; never when durable).
    ``check``: the data set is walked to its end first (PS3.5 §7.1, in a worker thread)
    and must name the command's SOP Class and Instance UIDs: else it is refused, 0xC000
    or 0xA900 (PS3.4 B.2.3), and no file is written (what a C-GET's peer sends).
    ``min_free_space`` (bytes; 0: read-only only): while the root's file system is
    below it or read-only, every store is refused 0xA700 before its data set is checked
    or written (:class:`~dimse_async.space.StorageSpace`, :attr:`space`, whose
    ``probe`` serves ``/healthz``); ``None``: stores fail only when a write does.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        durable: bool = False,
        inline: bool | InlineWrites = True,
        check: bool = False,
        min_free_space: int | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = os.fspath(self.root)
        self._prefix = os.path.join(self._root, "")  # the root with its trailing separator
        self.durable = durable
        self.inline: InlineWrites | None = (
            inline if isinstance(inline, InlineWrites) else InlineWrites() if inline else None
        )
        self.stored = 0
        self.check = check
        self.space = None if min_free_space is None else StorageSpace(self._root, min_free_space)

    def path_for(self, sop_instance_uid: str) -> Path:
        if not plausible_uid(sop_instance_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_instance_uid[:70]!r}")
        return self.root / f"{sop_instance_uid}.dcm"

    async def __call__(self, request: StoreRequest) -> Status:
        uid = request.sop_instance_uid
        if not request.spool.uids_valid:  # else checked as the request arrived (store_refusal)
            if not plausible_uid(uid):
                comment = f"invalid SOP Instance UID {uid[:70]!r}"[:64]
                return Status(Code.CANNOT_UNDERSTAND, comment, attributes=[_AFFECTED_INSTANCE])
            if not valid_uid(request.sop_class_uid):
                return Status(Code.CANNOT_UNDERSTAND, "invalid SOP Class UID", attributes=[0x00000002])
        if self.space is not None and request.spool.space_checked is not self.space:  # (once per store)
            refusal = self.space.refusal(request)
            if refusal is not None:  # (PS3.4 B.2.3: refused, nothing stored)
                return refusal
        if self.check:
            refusal = await asyncio.to_thread(_dataset_refusal, request)
            if refusal is not None:
                request.assoc.log.warning("C-STORE data set refused", sop_instance=uid, error=refusal.error_comment)
                return refusal
        await request.save(os.path.join(self._root, uid + ".dcm"), durable=self.durable)
        self.stored += 1
        return _SUCCESS
