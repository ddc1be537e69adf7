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
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydicom.dataset import Dataset

from ..acse import ContextSpec, PresentationContext
from ..codec import decode_identifier, encode_dataset
from ..contexts import FileInfo, inspect_file, plan_contexts
from ..dimse import Command, CommandField, Message
from ..exceptions import AssociationError, NoAcceptedContext
from ..inflate import InflationLimit
from ..interface import DIMSEProvider, ResponseStream, StoreHandler
from ..part10 import read_file_meta
from ..session import Operation
from ..status import Code, Status, StatusCategory, response_status
from ..uids import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from .requests import Request
from .scp import StatusError, decode_received, failure_status, response
from .store_scu import c_store

__all__ = [
    "MODELS",
    "Matches",
    "MoveRoute",
    "Progress",
    "QueryRequest",
    "Responses",
    "RetrieveRequest",
    "StatusError",
    "StoredFile",
    "Unavailable",
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

PENDING = (Code.PENDING, Code.PENDING_WARNING)
T = TypeVar("T")


def model_uid(model: str, operation: str) -> str:
    """The SOP class UID of ``model`` (short name or UID) for ``operation``."""
    if model in MODELS:
        try:
            return MODELS[model][operation]
        except KeyError:
            raise ValueError(f"the {model} model has no {operation.upper()} SOP class") from None
    return model


@dataclass(frozen=True, slots=True)
class Unavailable:
    """What a C-GET / C-MOVE handler yields for a matching instance it cannot send (its
    file gone or changed): a failed sub-operation, the UID in the Failed SOP Instance
    UID List (PS3.4 C.4.2.3.1, C.4.3.3.1), ``reason`` logged; nothing is sent."""

    sop_instance_uid: str
    reason: str


@dataclass(frozen=True, slots=True)
class Matches:
    """What a C-GET / C-MOVE handler may yield first: how many items follow (the
    Number of Remaining Sub-operations of the first pending response, PS3.4 C.4.2.3.1,
    C.4.3.3.1) and, for a C-MOVE, the (SOP Class UID, Transfer Syntax UID) pairs among
    them (the contexts proposed to the destination). With it the items are sent as the
    handler yields them, never collected into a list first; without it (or, for a
    C-MOVE, without ``kinds``) they are collected, counted and inspected first."""

    count: int
    kinds: tuple[tuple[str, str], ...] | None = None


class StoredFile(str):
    """A file path a C-GET / C-MOVE handler yields, with the SOP Instance UID its index
    knows: a sub-operation that fails because the file went away still names the
    instance in the Failed SOP Instance UID List (PS3.4 C.4.2.3.1, C.4.3.3.1)."""

    __slots__ = ("sop_instance_uid",)
    sop_instance_uid: str

    def __new__(cls, path: str, sop_instance_uid: str = "") -> StoredFile:
        self = super().__new__(cls, path)
        self.sop_instance_uid = sop_instance_uid
        return self

    def __reduce__(self) -> tuple[type[StoredFile], tuple[str, str]]:  # pickled for a worker process
        return StoredFile, (str(self), self.sop_instance_uid)


@dataclass(slots=True)
class Progress:
    """Sub-operation counters of a C-GET / C-MOVE response (PS3.7 §9.3.3.2, §9.3.4.2)."""

    status: Status
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    failed_instances: list[str] = field(default_factory=list)


class Responses(Generic[T]):
    """The results of one C-FIND / C-GET / C-MOVE: an async iterator and an async
    context manager; ``status`` holds the final status once the operation is over.

    Leave early the documented way, ``async with assoc.c_find(q) as responses:``, or
    with ``await responses.aclose()``: C-CANCEL goes out at once and the final
    response is awaited, so ``status`` is set (PS3.7 §9.3.2.3). A loop left with
    ``break`` over an iterator nobody else holds cancels as soon as it is dropped.
    """

    def __init__(
        self,
        stream: ResponseStream,
        convert: Callable[[Message], T | None],
        *,
        on_start: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ):
        self._stream = stream
        self._iter: AsyncIterator[Message] | None = None
        self._convert = convert
        self._on_start, self._on_end = on_start, on_end
        self._ended = False
        #: The final status (``None`` until the operation is over).
        self.status: Status | None = None
        #: C-GET / C-MOVE: the final :class:`Progress`.
        self.result: Progress | None = None

    def __aiter__(self) -> Responses[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._iter is None:
                if self._on_start is not None:
                    self._on_start()
                self._iter = self._stream.__aiter__()
            try:
                msg = await self._iter.__anext__()
            except asyncio.CancelledError:
                raise  # not over: aclose (or leaving ``async with``) still sends C-CANCEL
            except BaseException:
                self._end()
                raise
            item = self._convert(msg)
            if msg is self._stream.final:
                if isinstance(item, Progress):
                    self.result = item
                self._end()
            if item is not None:
                return item
            if self._ended:
                raise StopAsyncIteration

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        final = self._stream.final
        if final is not None:
            self.status = response_status(final.command.status, final.command.error_comment)
            if self.result is None:  # left early (C-CANCEL): the final counters all the same
                item = self._convert(final)
                if isinstance(item, Progress):
                    self.result = item
        elif self.status is None:
            self.status = Status(Code.CANNOT_UNDERSTAND, "no final response: the association ended")
        if self._on_end is not None:
            self._on_end()

    async def aclose(self) -> None:
        """Stop: C-CANCEL if the operation is still running, then its final response."""
        if self._ended:
            return
        try:
            if self._iter is not None:
                await self._stream.aclose()
        finally:
            if self._iter is None:
                self._ended = True
                self.status = Status(Code.CANCEL, "not started")
            self._end()

    async def __aenter__(self) -> Responses[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------
# SCU
# ---------------------------------------------------------------------------


def c_find(
    assoc: DIMSEProvider, query: Dataset, model: str = "study", *, priority: int = 0, timeout: float | None = None
) -> Responses[Dataset]:
    """C-FIND: yields each pending identifier as a ``Dataset``; ``status`` at the end."""
    sop_class = model_uid(model, "find")
    ctx = assoc.context_for(sop_class)
    cmd = Command(CommandField.C_FIND_RQ, affected_sop_class_uid=sop_class, priority=priority)
    stream = assoc.request_stream(ctx, cmd, encode_dataset(query, ctx.transfer_syntax), timeout)

    def convert(msg: Message) -> Dataset | None:
        if msg.command.status in PENDING and msg.dataset is not None:
            return decode_identifier(msg.dataset, ctx.transfer_syntax)
        return None

    return Responses(stream, convert)


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
    status = response_status(cmd.status, cmd.error_comment)
    return Progress(status, cmd.remaining, cmd.completed, cmd.failed, cmd.warning, failed_list)


def _retrieve(
    assoc: DIMSEProvider,
    op: CommandField,
    query: Dataset,
    model: str,
    priority: int,
    destination: str | None,
    store: StoreHandler | None = None,
    timeout: float | None = None,
) -> Responses[Progress]:
    sop_class = model_uid(model, "get" if op == CommandField.C_GET_RQ else "move")
    ctx = assoc.context_for(sop_class)
    cmd = Command(op, affected_sop_class_uid=sop_class, priority=priority, move_destination=destination)
    stream = assoc.request_stream(ctx, cmd, encode_dataset(query, ctx.transfer_syntax), timeout)

    def convert(msg: Message) -> Progress:
        return _progress(msg, ctx)

    previous: list[StoreHandler | None] = []

    def start() -> None:
        previous.append(assoc.store_handler)
        assoc.store_handler = store

    def end() -> None:
        assoc.store_handler = previous[0]

    if store is None:
        return Responses(stream, convert)
    return Responses(stream, convert, on_start=start, on_end=end)


def c_get(
    assoc: DIMSEProvider,
    query: Dataset,
    model: str = "study",
    *,
    priority: int = 0,
    store: StoreHandler | None = None,
    timeout: float | None = None,
) -> Responses[Progress]:
    """C-GET: yields :class:`Progress`; the instances arrive as C-STORE sub-operations on
    this association (we must have the SCP role for their storage classes) and go to
    ``store`` if given, else to the AE's C-STORE handler."""
    return _retrieve(assoc, CommandField.C_GET_RQ, query, model, priority, None, store, timeout)


def c_move(
    assoc: DIMSEProvider,
    query: Dataset,
    destination: str,
    model: str = "study",
    *,
    priority: int = 0,
    timeout: float | None = None,
) -> Responses[Progress]:
    """C-MOVE to ``destination`` (an AE title the peer knows): yields :class:`Progress`."""
    return _retrieve(assoc, CommandField.C_MOVE_RQ, query, model, priority, destination, timeout=timeout)


# ---------------------------------------------------------------------------
# SCP
# ---------------------------------------------------------------------------


class QueryRequest(Request):
    """A C-FIND / C-GET / C-MOVE request as seen by its handler."""

    __slots__ = ("cancel_seen", "identifier", "operation")

    def __init__(self, assoc: DIMSEProvider, operation: Operation, identifier: Dataset):
        super().__init__(assoc, operation.message)
        self.operation = operation
        self.identifier = identifier
        #: The handler read :attr:`cancelled` as true (or called :meth:`cancel`): if it
        #: ends now, it may have stopped early, so the final status is Cancel.
        self.cancel_seen = False

    @property
    def model(self) -> str:
        """The information model's SOP class UID."""
        return self.command.affected_sop_class_uid or ""

    @property
    def level(self) -> str:
        return str(self.identifier.get("QueryRetrieveLevel", ""))

    @property
    def cancelled(self) -> bool:
        """Whether the peer sent C-CANCEL for this request."""
        if self.operation.cancelled:
            self.cancel_seen = True
        return self.operation.cancelled

    def cancel(self) -> None:
        self.operation.cancelled = self.cancel_seen = True


class RetrieveRequest(QueryRequest):
    __slots__ = ()

    @property
    def move_destination(self) -> str | None:
        return self.command.move_destination


#: A C-FIND / C-GET / C-MOVE handler: an async generator over the request.
QueryHandler = Callable[[Any], Any]


@dataclass(slots=True)
class MoveRoute:
    """How a C-MOVE SCP reaches destinations: AE title -> (host, port), and a way to associate."""

    known_aes: Mapping[str, tuple[str, int]]
    associate: Callable[..., Awaitable[Any]]
    concurrency: int = 4


#: Identifiers larger than this (or deflated) are decoded in a worker thread.
_DECODE_ON_LOOP = 64 << 10


async def _decode(assoc: DIMSEProvider, op: Operation, cls: type[QueryRequest]) -> QueryRequest | Status:
    data, syntax = op.message.dataset or b"", op.context.transfer_syntax
    try:
        if len(data) > _DECODE_ON_LOOP or syntax == DeflatedExplicitVRLittleEndian:
            identifier = await asyncio.to_thread(decode_received, data, syntax)
        else:
            identifier = decode_received(data, syntax)
    except InflationLimit as exc:
        assoc.log.warning("identifier refused", command=op.command.name, error=str(exc))
        return Status(Code.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Identifier refused: inflates past the limit")
    except Exception as exc:
        assoc.log.warning("cannot decode identifier", command=op.command.name, error=repr(exc))
        return Status(Code.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Identifier does not match SOP class")
    return cls(assoc, op, identifier)


async def _respond(
    assoc: DIMSEProvider,
    op: Operation,
    status: Status,
    identifier: Dataset | None = None,
    counters: tuple[int | None, int, int, int] | None = None,
) -> None:
    rsp = response(op.command, status)
    if counters is not None:
        rsp.remaining, rsp.completed, rsp.failed, rsp.warning = counters
    payload = encode_dataset(identifier, op.context.transfer_syntax) if identifier is not None else None
    await assoc.send(op.context.id, rsp, payload)


def _unsupported(op: Operation) -> Status:
    return Status(Code.SOP_CLASS_NOT_SUPPORTED, f"{op.command.name[:-3]} not supported")


async def scp_c_find(assoc: DIMSEProvider, op: Operation, handler: QueryHandler | None = None) -> None:
    """Run the C-FIND handler: a pending response per yielded identifier (PS3.4 C.4.1)."""
    request = await _decode(assoc, op, QueryRequest)
    if isinstance(request, Status) or handler is None:
        await _respond(assoc, op, request if isinstance(request, Status) else _unsupported(op))
        return
    try:
        status = await _find_responses(assoc, op, request, handler(request))
    except AssociationError:
        raise
    except Exception as exc:
        status = failure_status(CommandField.C_FIND_RQ, exc, assoc)
    await _respond(assoc, op, status)


async def _find_responses(assoc: DIMSEProvider, op: Operation, request: QueryRequest, agen: Any) -> Status:
    """Send a pending response per match; after a C-CANCEL stop at the next match.

    Cancel (0xFE00, "matching terminated due to cancel", PS3.4 C.4.1.1.4) only when
    matching was cut short: a match was left unsent, or the handler ended after it saw
    ``request.cancelled``. A C-CANCEL read after the last match went out changes
    nothing: every match was sent, the final status is Success (PS3.7 §9.3.2.3)."""
    try:
        async for item in agen:
            if op.cancelled:
                return Status(Code.CANCEL)  # this match is left unsent
            code, ident = item if isinstance(item, tuple) else (Code.PENDING, item)
            await _respond(assoc, op, Status(code), ident)
            await asyncio.sleep(0)  # let the loop read a C-CANCEL that may have arrived
    finally:
        await agen.aclose()
    return Status(Code.CANCEL if request.cancel_seen else Code.SUCCESS)


def _item_uid(item: Any) -> str:
    if isinstance(item, Unavailable | StoredFile):
        return item.sop_instance_uid
    if isinstance(item, Dataset):
        return str(item.get("SOPInstanceUID", ""))
    try:
        with open(os.fspath(item), "rb") as fp:
            meta = read_file_meta(fp)
        return meta.sop_instance_uid if meta else ""
    except OSError:
        return ""


def _final_status(cancelled: bool, remaining: int, completed: int, failed: int, warning: int) -> Status:
    """The final C-GET / C-MOVE status from the counters (PS3.4 C.4.2.1.5, C.4.3.1.4)."""
    if cancelled and remaining:
        return Status(Code.CANCEL)
    if failed and not completed and not warning:
        return Status(Code.OUT_OF_RESOURCES_SUBOPERATIONS, "Unable to perform sub-operations")
    if failed or warning:
        return Status(Code.SUBOPERATIONS_WARNING, "Sub-operations complete, one or more failures or warnings")
    return Status(Code.SUCCESS)


class _Items:
    """The items of a C-GET / C-MOVE taken one at a time by the sub-operation workers:
    a list, or the handler's generator itself (announced by :class:`Matches`)."""

    def __init__(self, items: list[Any] | AsyncIterator[Any], total: int):
        self.total = total
        self._list = list(reversed(items)) if isinstance(items, list) else None
        self._iter = items if not isinstance(items, list) else None
        self._lock = asyncio.Lock()
        self.ended = False
        #: What the handler raised while yielding (the items not sent stay remaining).
        self.error: Exception | None = None

    async def next(self) -> tuple[bool, Any]:
        """(True, the next item), or (False, None) when there are no more."""
        if self._list is not None:
            return (True, self._list.pop()) if self._list else (False, None)
        async with self._lock:  # one generator step at a time
            if self.ended or self._iter is None:
                return False, None
            try:
                return True, await anext(self._iter)
            except StopAsyncIteration:
                self.ended = True
            except AssociationError:
                raise
            except Exception as exc:
                self.ended = True
                self.error = exc
            return False, None

    async def rest(self) -> list[Any]:
        """Every item not taken yet."""
        out: list[Any] = []
        while True:
            more, item = await self.next()
            if not more:
                return out
            out.append(item)


async def _run_suboperations(
    assoc: DIMSEProvider,
    op: Operation,
    items: list[Any] | _Items,
    store: Callable[[Any], Awaitable[Status]],
    concurrency: int = 1,
) -> None:
    """C-STORE every item with ``store``, answering pending responses with the four
    counters, then the final response (PS3.4 C.4.2.3 / C.4.3.3)."""
    source = items if isinstance(items, _Items) else _Items(items, len(items))
    total = source.total
    completed = failed = warning = 0
    failed_uids: list[str] = []

    async def worker() -> None:
        nonlocal completed, failed, warning
        while not op.cancelled and assoc.is_established:
            more, item = await source.next()
            if not more:
                return
            try:
                if isinstance(item, Unavailable):
                    assoc.log.warning(
                        "sub-operation not possible", sop_instance=item.sop_instance_uid, error=item.reason
                    )
                    category = StatusCategory.FAILURE
                else:
                    category = (await store(item)).category
            except NoAcceptedContext as exc:
                assoc.log.warning("sub-operation not possible", error=str(exc))
                category = StatusCategory.FAILURE
            except AssociationError as exc:
                if not assoc.is_established:
                    raise
                # The C-MOVE sub-association ended (the destination aborted): this and
                # every later sub-operation fail, and the final response still goes out.
                assoc.log.warning("sub-operation failed: sub-association ended", error=str(exc))
                category = StatusCategory.FAILURE
            except Exception as exc:
                where = (
                    {"sop_instance": item.sop_instance_uid, "path": str(item)} if isinstance(item, StoredFile) else {}
                )
                assoc.log.warning("sub-operation failed", **where, error=repr(exc))
                category = StatusCategory.FAILURE
            if category is StatusCategory.SUCCESS:
                completed += 1
            elif category is StatusCategory.WARNING:
                warning += 1
            else:
                failed += 1
                failed_uids.append(await asyncio.to_thread(_item_uid, item))
            remaining = max(total - completed - failed - warning, 0)  # more than counted: stored meanwhile
            if remaining and not op.cancelled:
                # The association's send lock keeps concurrent workers' responses whole and in order.
                await _respond(assoc, op, Status(Code.PENDING), None, (remaining, completed, failed, warning))

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total or 1)))))
    remaining = max(total - completed - failed - warning, 0)
    status = _final_status(op.cancelled, remaining, completed, failed, warning)
    if source.error is not None and not op.cancelled:  # the handler failed part way
        status = failure_status(op.command.command_field, source.error, assoc)
    final_ident = None
    if failed_uids:
        final_ident = Dataset()
        final_ident.FailedSOPInstanceUIDList = [u for u in failed_uids if u] or [""]
    # Remaining is only meaningful in pending and cancel responses (PS3.7 §9.3.3.2).
    counters = (remaining if int(status) == Code.CANCEL else None, completed, failed, warning)
    await _respond(assoc, op, status, final_ident, counters)


async def _scp_retrieve(
    assoc: DIMSEProvider,
    op: Operation,
    handler: QueryHandler | None,
    perform: Callable[[QueryRequest, list[Any] | _Items, Matches | None], Awaitable[None]],
    check: Callable[[], Status | None] = lambda: None,
) -> None:
    """Shared C-GET / C-MOVE SCP flow: decode, refuse early, then ``perform`` the
    sub-operations: on the handler's items as it yields them when it announced them
    with :class:`Matches` first, else on the items collected first."""
    request = await _decode(assoc, op, RetrieveRequest)
    if isinstance(request, Status) or handler is None:
        await _respond(assoc, op, request if isinstance(request, Status) else _unsupported(op))
        return
    refusal = check()
    if refusal is not None:
        await _respond(assoc, op, refusal)
        return
    agen = handler(request)
    try:
        try:
            first = await anext(agen, _NONE)
            matches = first if isinstance(first, Matches) else None
            items: list[Any] | _Items
            if matches is not None:
                items = _Items(agen, matches.count)
            else:
                items = [] if first is _NONE else [first]
                if items and not request.cancelled:
                    async for item in agen:
                        items.append(item)
                        if request.cancelled:
                            break
        except AssociationError:
            raise
        except Exception as exc:
            await _respond(assoc, op, failure_status(op.command.command_field, exc, assoc))
            return
        await perform(request, items, matches)
    finally:
        await agen.aclose()


_NONE = object()


async def scp_c_get(assoc: DIMSEProvider, op: Operation, handler: QueryHandler | None = None) -> None:
    """C-GET SCP: the handler's instances go back as C-STORE sub-operations on this
    association (PS3.4 C.4.3)."""

    async def store(item: Any) -> Status:
        return await c_store(assoc, item)

    async def perform(request: QueryRequest, items: list[Any] | _Items, _matches: Matches | None) -> None:
        await _run_suboperations(assoc, op, items, store)

    await _scp_retrieve(assoc, op, handler, perform)


async def scp_c_move(
    assoc: DIMSEProvider, op: Operation, handler: QueryHandler | None = None, route: MoveRoute | None = None
) -> None:
    """C-MOVE SCP: look up the destination, open a second association, C-STORE the
    handler's instances with the move originator fields set (PS3.4 C.4.2)."""
    dest_title = (op.command.move_destination or "").strip()
    destination = route.known_aes.get(dest_title) if route is not None else None

    def check() -> Status | None:
        if destination is None:
            assoc.log.warning("unknown move destination", destination=dest_title)
            return Status(Code.MOVE_DESTINATION_UNKNOWN, f"Move destination unknown: {dest_title}"[:64])
        return None

    async def perform(request: QueryRequest, items: list[Any] | _Items, matches: Matches | None) -> None:
        assert destination is not None and route is not None
        if isinstance(items, _Items) and (matches is None or matches.kinds is None):
            items = await items.rest()  # no kinds announced: the files are inspected first
        if not (items.total if isinstance(items, _Items) else items):
            await _respond(assoc, op, Status(Code.SUCCESS), None, (None, 0, 0, 0))
            return
        kinds = matches.kinds if isinstance(items, _Items) and matches is not None else None
        await _move(assoc, op, items, dest_title, destination, route, kinds)

    await _scp_retrieve(assoc, op, handler, perform, check)


async def _move(
    assoc: DIMSEProvider,
    op: Operation,
    items: list[Any] | _Items,
    title: str,
    address: tuple[str, int],
    route: MoveRoute,
    kinds: tuple[tuple[str, str], ...] | None = None,
) -> None:
    if kinds is not None:  # announced by the handler (Matches): nothing is read ahead
        inspected: list[FileInfo | str] = [FileInfo("", c, ts, 0) for c, ts in kinds]
    else:
        listed = items if isinstance(items, list) else await items.rest()
        items = listed
        inspected = await asyncio.to_thread(
            lambda: [
                _dataset_item(i) if isinstance(i, Dataset) else inspect_file(os.fspath(i))
                for i in listed
                if not isinstance(i, Unavailable)
            ]
        )
    specs: list[ContextSpec] = plan_contexts([x for x in inspected if isinstance(x, FileInfo)])
    originator = (assoc.peer_ae, op.command.message_id or 0)
    try:
        sub = await _associate_unless_cancelled(op, route, address, title, specs)
    except AssociationError as exc:
        await _unreachable(assoc, op, items if isinstance(items, list) else await items.rest(), title, address, exc)
        return
    if sub is None:  # C-CANCEL while the sub-association was being set up: nothing sent
        total = items.total if isinstance(items, _Items) else len(items)
        await _respond(assoc, op, Status(Code.CANCEL), None, (total, 0, 0, 0))
        return
    try:

        async def store(item: Any) -> Status:
            status: Status = await sub.c_store(item, move_originator=originator)
            return status

        await _run_suboperations(assoc, op, items, store, concurrency=route.concurrency)
    finally:
        if sub.is_established:
            await sub.release()
        else:
            sub.abort("move sub-association ended")


async def _associate_unless_cancelled(
    op: Operation, route: MoveRoute, address: tuple[str, int], title: str, specs: list[ContextSpec]
) -> Any:
    """The C-MOVE sub-association, or ``None`` when the peer sends C-CANCEL before it is
    established (PS3.4 C.4.2.3: the SCP stops, Cancel): a destination slow to answer
    (up to the ACSE timeout) does not hold the cancel; the half-open association is aborted."""
    if op.cancelled:
        return None
    connecting = asyncio.ensure_future(
        route.associate(address[0], address[1], title, contexts=specs, async_ops=(route.concurrency, 1))
    )

    def cancel() -> None:
        connecting.cancel()  # nothing when already done

    op.on_cancel = cancel
    try:
        return await connecting
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not op.cancelled or (task is not None and task.cancelling()):
            raise  # this task itself is cancelled (the association ended)
        return None
    finally:
        op.on_cancel = None
        if not connecting.done():
            connecting.cancel()


async def _unreachable(
    assoc: DIMSEProvider, op: Operation, items: list[Any], title: str, address: tuple[str, int], exc: Exception
) -> None:
    """The destination is known but no association to it could be made (refused,
    rejected, no answer): every sub-operation failed, 0xA702 Refused: Out of Resources -
    Unable to perform sub-operations, with the counters and the Failed SOP Instance UID
    List (PS3.4 C.4.2.1.5, C.4.2.3.1; as DCMTK's dcmqrscp). 0xA801 (Move Destination
    unknown) is only for a title not configured at all."""
    uids = await asyncio.to_thread(lambda: [_item_uid(i) for i in items])
    assoc.log.warning(
        "cannot reach move destination; every sub-operation failed",
        destination=title,
        address=f"{address[0]}:{address[1]}",
        failed=len(items),
        error=str(exc)[:200],
    )
    ident = Dataset()
    ident.FailedSOPInstanceUIDList = [u for u in uids if u] or [""]
    status = Status(Code.OUT_OF_RESOURCES_SUBOPERATIONS, f"Cannot reach {title}: {exc}"[:64])
    await _respond(assoc, op, status, ident, (None, 0, len(items), 0))


def _dataset_item(ds: Dataset) -> FileInfo:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return FileInfo("", str(ds.SOPClassUID), ts or ExplicitVRLittleEndian, 0)
