"""Query/Retrieve (PS3.4 Annex C) and Modality Worklist (Annex K): C-FIND, C-GET,
C-MOVE and C-CANCEL (PS3.7 §9.1.2-9.1.5, §9.3.2-9.3.4), SCU and SCP.

SCU: :func:`c_find`, :func:`c_get` and :func:`c_move` return a :class:`Responses`
async iterator. Leaving the loop early (``break``, an exception, task cancellation)
sends C-CANCEL and drains the final response in the background; ``status`` holds the
final status afterwards.

SCP: handlers are ``async def`` generators. A C-FIND handler yields matching
identifiers; a C-GET / C-MOVE handler yields what to send (file paths or
``Dataset``s). A C-CANCEL from the peer stops the handler at its next yield and the
final status is Cancel (0xFE00).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from ..dimse import Command, CommandField, Message, Status
from ..exceptions import AssociationError, DIMSEFailure, NoAcceptedContext
from ..part10 import read_file_meta
from ..uids import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from .requests import Request
from .send import FileInfo, inspect_file, plan_contexts
from .storage import encode_dataset

if TYPE_CHECKING:
    from ..acse import PresentationContext
    from ..association import Association

__all__ = [
    "MODELS",
    "Progress",
    "QueryRequest",
    "Responses",
    "RetrieveRequest",
    "StatusError",
    "c_find",
    "c_get",
    "c_move",
    "decode_identifier",
    "model_uid",
    "scp_c_find",
    "scp_c_get",
    "scp_c_move",
]

#: Information models by short name and operation (PS3.4 C.6, K.6).
MODELS: dict[str, dict[str, str]] = {
    "patient": {
        "find": "1.2.840.10008.5.1.4.1.2.1.1",
        "move": "1.2.840.10008.5.1.4.1.2.1.2",
        "get": "1.2.840.10008.5.1.4.1.2.1.3",
    },
    "study": {
        "find": "1.2.840.10008.5.1.4.1.2.2.1",
        "move": "1.2.840.10008.5.1.4.1.2.2.2",
        "get": "1.2.840.10008.5.1.4.1.2.2.3",
    },
    "patient-study": {
        "find": "1.2.840.10008.5.1.4.1.2.3.1",
        "move": "1.2.840.10008.5.1.4.1.2.3.2",
        "get": "1.2.840.10008.5.1.4.1.2.3.3",
    },
    "worklist": {"find": "1.2.840.10008.5.1.4.31"},
}

PENDING = (0xFF00, 0xFF01)


def model_uid(model: str, operation: str) -> str:
    """The SOP class UID of ``model`` (short name or UID) for ``operation``."""
    if model in MODELS:
        try:
            return MODELS[model][operation]
        except KeyError:
            raise ValueError(f"the {model} model has no {operation.upper()} SOP class") from None
    return model


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """Decode an identifier (a data set without meta) in ``transfer_syntax``."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        data = zlib.decompress(data, -15)
    fp = DicomBytesIO(data)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    return read_dataset(fp, implicit, little)


@dataclass(slots=True)
class Progress:
    """Sub-operation counters of a C-GET / C-MOVE response (PS3.7 §9.3.3.2, §9.3.4.2)."""

    status: Status
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    failed_instances: list[str] = field(default_factory=list)


class Responses:
    """Async iterator over one multi-response operation; ``status`` is set at the end.

    Use ``async for`` directly, or ``async with`` to be sure a cancel has finished
    before the block is left.
    """

    def __init__(self, run: Callable[[Responses], AsyncIterator[Any]]):
        self.status: Status | None = None
        self.result: Progress | None = None
        self._cancelling: asyncio.Task[None] | None = None
        self._agen = run(self)

    def __aiter__(self) -> Responses:
        return self

    async def __anext__(self) -> Any:
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        await self._agen.aclose()
        if self._cancelling is not None:  # C-CANCEL sent: wait for the final response
            await asyncio.shield(self._cancelling)

    async def __aenter__(self) -> Responses:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------
# SCU
# ---------------------------------------------------------------------------


async def _exchange(
    assoc: Association, ctx: PresentationContext, cmd: Command, identifier: bytes, owner: Responses
) -> AsyncIterator[Message]:
    """Send a request and yield every response; cancel on early exit (PS3.7 §9.3.2.3)."""
    assert assoc._window is not None
    async with assoc._window:
        assoc._check_can_send()
        mid = assoc._next_message_id()
        cmd.message_id = mid
        queue: asyncio.Queue[Any] = asyncio.Queue()
        assoc._pending[mid] = queue
        finished = False
        try:
            await assoc.send_message(ctx.id, cmd, identifier)
            while True:
                item = await _next_response(assoc, queue, cmd)
                status = item.command.status
                if status in PENDING:
                    yield item
                    continue
                finished = True
                owner.status = Status(status if status is not None else 0xC000, item.command.error_comment)
                yield item
                return
        finally:
            if finished or not assoc.is_established:
                assoc._pending.pop(mid, None)
            else:
                owner._cancelling = assoc._spawn(_cancel_and_drain(assoc, ctx, mid, queue, owner))


async def _next_response(assoc: Association, queue: asyncio.Queue[Any], cmd: Command) -> Message:
    timeout = assoc.ae.dimse_timeout
    try:
        item = await asyncio.wait_for(queue.get(), timeout)
    except TimeoutError:
        assoc.abort(f"no {cmd.name} response within {timeout} s")
        raise DIMSEFailure(f"no {cmd.name} response within {timeout} s") from None
    if isinstance(item, BaseException):
        raise item
    return item


async def _cancel_and_drain(
    assoc: Association, ctx: PresentationContext, mid: int, queue: asyncio.Queue[Any], owner: Responses
) -> None:
    try:
        await assoc.send_message(ctx.id, Command(CommandField.C_CANCEL_RQ, message_id_being_responded_to=mid))
        while True:
            item = await _next_response(assoc, queue, Command(CommandField.C_CANCEL_RQ))
            if item.command.status not in PENDING:
                owner.status = Status(item.command.status or 0, item.command.error_comment)
                return
    except AssociationError:
        return
    finally:
        assoc._pending.pop(mid, None)


def _identifier_bytes(query: Dataset, ctx: PresentationContext) -> bytes:
    return encode_dataset(query, ctx.transfer_syntax)


def c_find(assoc: Association, query: Dataset, model: str = "study", *, priority: int = 0) -> Responses:
    """C-FIND: yields each pending identifier as a ``Dataset``; ``status`` at the end."""
    sop_class = model_uid(model, "find")
    ctx = assoc.context_for(sop_class)

    async def run(owner: Responses) -> AsyncIterator[Dataset]:
        cmd = Command(CommandField.C_FIND_RQ, affected_sop_class_uid=sop_class, priority=priority)
        async with contextlib.aclosing(_exchange(assoc, ctx, cmd, _identifier_bytes(query, ctx), owner)) as msgs:
            async for msg in msgs:
                if msg.command.status in PENDING and msg.dataset is not None:
                    yield decode_identifier(msg.dataset, ctx.transfer_syntax)

    return Responses(run)


def _progress(msg: Message, ctx: PresentationContext) -> Progress:
    cmd = msg.command
    failed_list: list[str] = []
    if msg.dataset:
        try:
            ident = decode_identifier(msg.dataset, ctx.transfer_syntax)
            value = ident.get("FailedSOPInstanceUIDList")
            if value:
                failed_list = [str(value)] if isinstance(value, str) else [str(v) for v in value]
        except Exception:  # a malformed identifier does not hide the counters
            failed_list = []
    return Progress(
        Status(cmd.status if cmd.status is not None else 0xC000, cmd.error_comment),
        cmd.remaining,
        cmd.completed,
        cmd.failed,
        cmd.warning,
        failed_list,
    )


def _retrieve(
    assoc: Association, op: str, query: Dataset, model: str, priority: int, destination: str | None
) -> Responses:
    sop_class = model_uid(model, op)
    ctx = assoc.context_for(sop_class)

    async def run(owner: Responses) -> AsyncIterator[Progress]:
        field_ = CommandField.C_GET_RQ if op == "get" else CommandField.C_MOVE_RQ
        cmd = Command(field_, affected_sop_class_uid=sop_class, priority=priority, move_destination=destination)
        async with contextlib.aclosing(_exchange(assoc, ctx, cmd, _identifier_bytes(query, ctx), owner)) as msgs:
            async for msg in msgs:
                progress = _progress(msg, ctx)
                if msg.command.status not in PENDING:
                    owner.result = progress
                yield progress

    return Responses(run)


def c_get(
    assoc: Association,
    query: Dataset,
    model: str = "study",
    *,
    priority: int = 0,
    store: Callable[..., Awaitable[Any]] | None = None,
) -> Responses:
    """C-GET: yields :class:`Progress`; the instances arrive as C-STORE sub-operations on
    this association (we must have the SCP role for their storage classes) and go to
    ``store`` if given, else to the AE's C-STORE handler."""
    responses = _retrieve(assoc, "get", query, model, priority, None)
    if store is None:
        return responses
    inner = responses._agen

    async def with_store(owner: Responses) -> AsyncIterator[Progress]:
        previous, assoc.store_handler = assoc.store_handler, store
        try:
            async with contextlib.aclosing(inner) as items:
                async for item in items:
                    yield item
        finally:
            assoc.store_handler = previous

    responses._agen = with_store(responses)
    return responses


def c_move(
    assoc: Association, query: Dataset, destination: str, model: str = "study", *, priority: int = 0
) -> Responses:
    """C-MOVE to ``destination`` (an AE title the peer knows): yields :class:`Progress`."""
    return _retrieve(assoc, "move", query, model, priority, destination)


# ---------------------------------------------------------------------------
# SCP
# ---------------------------------------------------------------------------


class QueryRequest(Request):
    """A C-FIND / C-GET / C-MOVE request as seen by its handler."""

    __slots__ = ("cancelled", "identifier")

    def __init__(self, assoc: Association, message: Message, identifier: Dataset):
        super().__init__(assoc, message)
        self.identifier = identifier
        self.cancelled = False

    @property
    def model(self) -> str:
        """The information model's SOP class UID."""
        return self.command.affected_sop_class_uid or ""

    @property
    def level(self) -> str:
        return str(self.identifier.get("QueryRetrieveLevel", ""))

    def cancel(self) -> None:
        self.cancelled = True


class RetrieveRequest(QueryRequest):
    __slots__ = ()

    @property
    def move_destination(self) -> str | None:
        return self.command.move_destination


async def _start(
    assoc: Association, ctx: PresentationContext, msg: Message, cls: type[QueryRequest]
) -> QueryRequest | Status:
    try:
        identifier = decode_identifier(msg.dataset or b"", ctx.transfer_syntax)
    except Exception as exc:
        assoc.log.warning("cannot decode identifier", command=msg.command.name, error=repr(exc))
        return Status(0xA900, "Identifier does not match SOP class")
    request = cls(assoc, msg, identifier)
    if msg.command.message_id is not None:
        assoc.running_operations[msg.command.message_id] = request
    return request


async def _respond(
    assoc: Association,
    ctx: PresentationContext,
    msg: Message,
    status: Status,
    identifier: Dataset | None = None,
    counters: tuple[int | None, int, int, int] | None = None,
) -> None:
    cmd = msg.command
    rsp = Command(
        cmd.command_field | 0x8000,
        message_id_being_responded_to=cmd.message_id,
        affected_sop_class_uid=cmd.affected_sop_class_uid,
        status=int(status),
        error_comment=(status.error_comment or "")[:64] or None if status.category == "failure" else None,
    )
    if counters is not None:
        rsp.remaining, rsp.completed, rsp.failed, rsp.warning = counters
    payload = encode_dataset(identifier, ctx.transfer_syntax) if identifier is not None else None
    await assoc.send_message(ctx.id, rsp, payload)


class StatusError(Exception):
    """Raise from a handler to answer with a specific failure ``status``."""

    def __init__(self, status: Status | int, comment: str | None = None):
        self.status = status if isinstance(status, Status) else Status(status, comment)
        super().__init__(self.status.error_comment or repr(self.status))


def _handler_failure(assoc: Association, msg: Message, exc: BaseException) -> Status:
    if isinstance(exc, StatusError):
        assoc.log.info("handler refused", command=msg.command.name, status=repr(exc.status))
        return exc.status
    assoc.log.error("handler failed", command=msg.command.name, error=repr(exc))
    return Status(0xC000 if not isinstance(exc, OSError) else 0xA700, f"Unable to process: {exc}")


async def scp_c_find(assoc: Association, ctx: PresentationContext, msg: Message) -> None:
    """Run the C-FIND handler: a pending response per yielded identifier (PS3.4 C.4.1)."""
    handler = assoc.ae._handlers.get("c_find")
    request = await _start(assoc, ctx, msg, QueryRequest)
    if isinstance(request, Status):
        await _respond(assoc, ctx, msg, request)
        return
    status = Status(0x0000)
    try:
        if handler is None:
            status = Status(0x0122, "C-FIND not supported")
        else:
            agen = handler(request)
            try:
                async for item in agen:
                    if request.cancelled:
                        status = Status(0xFE00)
                        break
                    code, ident = item if isinstance(item, tuple) else (0xFF00, item)
                    await _respond(assoc, ctx, msg, Status(code), ident)
                    await asyncio.sleep(0)  # let the loop read a C-CANCEL that may have arrived
                    if request.cancelled:
                        status = Status(0xFE00)
                        break
                else:
                    if request.cancelled:
                        status = Status(0xFE00)
            finally:
                await agen.aclose()
    except AssociationError:
        raise
    except Exception as exc:
        status = _handler_failure(assoc, msg, exc)
    finally:
        assoc.running_operations.pop(msg.command.message_id or -1, None)
    await _respond(assoc, ctx, msg, status)


def _item_uid(item: Any) -> str:
    if isinstance(item, Dataset):
        return str(item.get("SOPInstanceUID", ""))
    try:
        with open(os.fspath(item), "rb") as fp:
            meta = read_file_meta(fp)
        return meta.sop_instance_uid if meta else ""
    except OSError:
        return ""


async def _collect(handler: Any, request: QueryRequest) -> list[Any]:
    items = []
    agen = handler(request)
    try:
        async for item in agen:
            items.append(item)
            if request.cancelled:
                break
    finally:
        await agen.aclose()
    return items


async def _run_suboperations(
    assoc: Association,
    ctx: PresentationContext,
    msg: Message,
    request: QueryRequest,
    items: list[Any],
    store: Callable[[Any], Awaitable[Status]],
    concurrency: int = 1,
) -> None:
    """C-STORE every item with ``store``, answering pending responses with the four
    counters, then the final response (PS3.4 C.4.2.3 / C.4.3.3)."""
    total = len(items)
    completed = failed = warning = 0
    failed_uids: list[str] = []
    queue = list(reversed(items))

    async def worker() -> None:
        nonlocal completed, failed, warning
        while queue and not request.cancelled and assoc.is_established:
            item = queue.pop()
            try:
                status = await store(item)
                category = status.category
            except NoAcceptedContext as exc:
                assoc.log.warning("sub-operation not possible", error=str(exc))
                category = "failure"
            except AssociationError:
                raise
            except Exception as exc:
                assoc.log.warning("sub-operation failed", error=repr(exc))
                category = "failure"
            if category == "success":
                completed += 1
            elif category == "warning":
                warning += 1
            else:
                failed += 1
                failed_uids.append(_item_uid(item))
            remaining = total - completed - failed - warning
            if remaining and not request.cancelled:
                # The association's send lock keeps concurrent workers' responses whole and in order.
                await _respond(assoc, ctx, msg, Status(0xFF00), None, (remaining, completed, failed, warning))

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total or 1)))))
    remaining = total - completed - failed - warning
    final_ident = None
    if request.cancelled and remaining:
        status = Status(0xFE00)
    elif failed and not completed and not warning:
        status = Status(0xA702, "Unable to perform sub-operations")
    elif failed or warning:
        status = Status(0xB000, "Sub-operations complete, one or more failures or warnings")
    else:
        status = Status(0x0000)
    if failed_uids:
        final_ident = Dataset()
        final_ident.FailedSOPInstanceUIDList = [u for u in failed_uids if u] or [""]
    # Remaining is only meaningful in pending and cancel responses (PS3.7 §9.3.3.2).
    counters = (remaining if status == 0xFE00 else None, completed, failed, warning)
    await _respond(assoc, ctx, msg, status, final_ident, counters)


async def _scp_retrieve(
    assoc: Association,
    ctx: PresentationContext,
    msg: Message,
    service: str,
    perform: Callable[[QueryRequest, list[Any]], Awaitable[None]],
    check: Callable[[], Status | None] = lambda: None,
) -> None:
    """Shared C-GET / C-MOVE SCP flow: decode, refuse early, collect the handler's
    items, then ``perform`` the sub-operations; always forget the operation."""
    handler = assoc.ae._handlers.get(service)
    request = await _start(assoc, ctx, msg, RetrieveRequest)
    if isinstance(request, Status):
        await _respond(assoc, ctx, msg, request)
        return
    try:
        refusal = Status(0x0122, f"{msg.command.name[:-3]} not supported") if handler is None else check()
        if refusal is not None:
            await _respond(assoc, ctx, msg, refusal)
            return
        try:
            items = await _collect(handler, request)
        except AssociationError:
            raise
        except Exception as exc:
            await _respond(assoc, ctx, msg, _handler_failure(assoc, msg, exc))
            return
        await perform(request, items)
    finally:
        assoc.running_operations.pop(msg.command.message_id or -1, None)


async def scp_c_get(assoc: Association, ctx: PresentationContext, msg: Message) -> None:
    """C-GET SCP: the handler's instances go back as C-STORE sub-operations on this
    association (PS3.4 C.4.3)."""

    async def perform(request: QueryRequest, items: list[Any]) -> None:
        await _run_suboperations(assoc, ctx, msg, request, items, assoc.c_store)

    await _scp_retrieve(assoc, ctx, msg, "c_get", perform)


async def scp_c_move(assoc: Association, ctx: PresentationContext, msg: Message) -> None:
    """C-MOVE SCP: look up the destination, open a second association, C-STORE the
    handler's instances with the move originator fields set (PS3.4 C.4.2)."""
    ae = assoc.ae
    dest_title = (msg.command.move_destination or "").strip()
    destination = ae.known_aes.get(dest_title)

    def check() -> Status | None:
        if destination is None:
            assoc.log.warning("unknown move destination", destination=dest_title)
            return Status(0xA801, f"Move destination unknown: {dest_title}"[:64])
        return None

    async def perform(request: QueryRequest, items: list[Any]) -> None:
        assert destination is not None
        if not items:
            await _respond(assoc, ctx, msg, Status(0x0000), None, (None, 0, 0, 0))
            return
        inspected = [_dataset_item(i) if isinstance(i, Dataset) else inspect_file(os.fspath(i)) for i in items]
        specs = plan_contexts([x for x in inspected if isinstance(x, FileInfo)])
        host, port = destination
        originator = (assoc.peer_ae, msg.command.message_id or 0)
        try:
            sub = await ae.associate(host, port, dest_title, contexts=specs, async_ops=(ae.move_concurrency, 1))
        except AssociationError as exc:
            assoc.log.warning("cannot reach move destination", destination=dest_title, error=str(exc))
            await _respond(assoc, ctx, msg, Status(0xA801, f"Cannot reach {dest_title}: {exc}"[:64]))
            return
        try:

            async def store(item: Any) -> Status:
                return await sub.c_store(item, move_originator=originator)

            await _run_suboperations(assoc, ctx, msg, request, items, store, concurrency=ae.move_concurrency)
        finally:
            if sub.is_established:
                await sub.release()
            else:
                sub.abort("move sub-association ended")

    await _scp_retrieve(assoc, ctx, msg, "c_move", perform, check)


def _dataset_item(ds: Dataset) -> FileInfo:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return FileInfo("", str(ds.SOPClassUID), ts or ExplicitVRLittleEndian, 0)
